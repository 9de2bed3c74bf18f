"""Paper-style tables and the perplexity plot from metrics files."""
import csv
import json

import pytest

from omniquant import paper
from omniquant.tables import bits, impossible, load_metrics, table1, table2, table3, table_packed, tableA1, write_tables


def _write(root, setting, method, suffix="", **values):
    path = root / "m" / setting / f"{method}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": "m", "setting": setting, "method": method} | values))


@pytest.fixture
def metrics(tmp_path):
    root = tmp_path / "metrics"
    _write(root, "w3a16g128", "omniquant", wikitext2_ppl=9.5, quant_seconds=30.0, peak_mem_gb=1.5,
           calib_nsamples=32, calib_seqlen=512, calib_epochs=6, wikitext2_windows=40, wikitext2_total_windows=148)
    _write(root, "fp16", "fp", wikitext2_ppl=5.0, ptb_ppl=7.0)
    _write(root, "w3a16g128", "rtn", wikitext2_ppl=12.25, quant_seconds=2.0)
    _write(root, "w2a16g64", "rtn", wikitext2_ppl=8.8e5)
    _write(root, "w4a4", "rtn", wikitext2_ppl=99.0)
    _write(root, "w4a4", "rtn", ".zeroshot", piqa_acc=0.6, piqa_acc_norm=0.7, boolq_acc=0.5,
           hellaswag_derived_acc=0.3, hellaswag_derived_acc_norm=0.4, zeroshot_limit=50)
    _write(root, "fp16", "fp", ".zeroshot", piqa_acc=0.7, boolq_acc=0.5, zeroshot_limit=50)
    _write(root, "fp16", "fp", ".zeroshot_full", piqa_acc=0.8, boolq_acc=0.6, zeroshot_limit=None)
    _write(root, "w3a16g128", "omniquant", ".packed", packed_wikitext2_ppl=9.5, packed_bytes=3 * 2**20,
           fp_bytes=12 * 2**20, bits_per_weight=3.57)
    return root


def test_setting_names_parse():
    assert bits("w3a16g128") == (3, 16, 128) and bits("w4a4") == (4, 4, None) and bits("fp16") == (16, 16, None)


def test_table1_rows_in_paper_order_with_the_papers_column(metrics):
    ppl = load_metrics(metrics).ppl
    t = table1(ppl)
    assert [r[:2] for r in t.rows] == [["fp16", "fp"], ["w3a16g128", "rtn"], ["w3a16g128", "omniquant"],
                                       ["w2a16g64", "rtn"]]  # w4a4 is weight-activation: not in Table 1
    assert t.rows[1] == ["w3a16g128", "rtn", "12.25", "–", f"{paper.TABLE1_WIKITEXT2[('w3a16g128', 'rtn')]:.2f}"]
    assert t.rows[3][2] == "8.8e5"
    assert "paper LLaMA-2-7B WikiText-2" in t.columns[-1]
    assert any("first 40 of 148" in n for n in t.notes)


def test_table2_shows_the_chosen_metric_and_the_papers_rows(metrics):
    zs = load_metrics(metrics).zeroshot
    acc, norm = table2(zs, "acc"), table2(zs, "acc_norm")
    ours = {tuple(r[:2]): r[2:] for r in acc.rows}
    assert ours[("w4a4", "rtn")][:6] == ["60.0", "–", "–", "50.0", "30.0", "–"]
    assert ours[("w4a4", "rtn")][6:] == ["46.7", "–", "–", "50"]  # mean of the present tasks, LAMBADA, docs/task
    fp_rows = [r for r in acc.rows if r[:2] == ["fp16", "fp"]]  # first-50 run, then the full-set run
    assert [(r[2], r[-1]) for r in fp_rows] == [("70.0", "50"), ("80.0", "full")]
    assert [r[-1] for r in acc.rows if "paper" not in r[1]] == ["50", "50", "full"]
    normed = {tuple(r[:2]): r[2:] for r in norm.rows}
    assert normed[("w4a4", "rtn")][:6] == ["70.0", "–", "–", "50.0", "40.0", "–"]  # boolq has no acc_norm
    assert ("w4a4", "omniquant (paper, LLaMA-1-7B)") in ours


def test_packed_table_puts_packed_beside_fake_quant_perplexity(metrics):
    records = load_metrics(metrics)
    assert len(records.ppl) == 5  # packed and zero-shot records are not perplexity rows
    t = table_packed(records.packed, records.ppl)
    assert t.rows == [["m", "w3a16g128", "omniquant", "9.50", "9.50", "3.0", "12.0", "3.57"]]


def test_tableA1_lists_quantized_cells_with_their_budget(metrics):
    ppl = load_metrics(metrics).ppl
    rows = tableA1(ppl).rows
    assert ["m", "w3a16g128", "omniquant", "30", "1.50", "32 × 512", "6"] in rows
    assert all(r[2] != "fp" for r in rows)


@pytest.mark.parametrize("values, problem", [
    ({"wikitext2_ppl": 1.0}, "wikitext2_ppl=1.0 is impossible (<= 1)"),
    ({"wikitext2_ppl": 0.5}, "wikitext2_ppl=0.5 is impossible (<= 1)"),
    ({"wikitext2_ppl": float("nan")}, "wikitext2_ppl=nan is impossible (not finite)"),
    ({"packed_wikitext2_ppl": float("inf")}, "packed_wikitext2_ppl=inf is impossible (not finite)"),
    ({"wikitext2_ppl": 9.0, "wikitext2_windows": 0}, "wikitext2_windows=0 is impossible (no windows)"),
    ({"piqa_acc": float("nan")}, "piqa_acc=nan is impossible (not finite)"),
    ({"zeroshot_avg": float("nan")}, "zeroshot_avg=nan is impossible (not finite)"),
])
def test_impossible_figures_are_named(values, problem):
    assert impossible({"model": "m", "setting": "w4a4", "method": "rtn"} | values) == problem


def test_records_with_impossible_figures_are_skipped_with_one_line_each(metrics, capsys):
    _write(metrics, "w4a4", "gptq", wikitext2_ppl=1.0, wikitext2_windows=0)  # what max_windows=-1 used to write
    _write(metrics, "w4a4", "awq", ".zeroshot", piqa_acc=float("nan"))
    records = load_metrics(metrics)
    assert [m["method"] for m in records.ppl if m["setting"] == "w4a4"] == ["rtn"]
    assert [m["method"] for m in records.zeroshot if m["setting"] == "w4a4"] == ["rtn"]
    assert capsys.readouterr().out.splitlines() == [
        f"omniquant: skipped {metrics / 'm/w4a4/awq.zeroshot.json'}: piqa_acc=nan is impossible (not finite)",
        f"omniquant: skipped {metrics / 'm/w4a4/gptq.json'}: wikitext2_ppl=1.0 is impossible (<= 1)"]
    assert impossible(records.ppl[0]) is None


def test_only_the_given_models_metrics_are_read(metrics):
    (metrics / "m").rename(metrics / "tiny-llama")
    _write(metrics, "w4a4", "rtn", wikitext2_ppl=50.0)  # model "m" again
    assert [m["wikitext2_ppl"] for m in load_metrics(metrics, ["m"]).ppl] == [50.0]
    assert load_metrics(metrics, []).ppl == [] and len(load_metrics(metrics).ppl) == 6


def test_write_tables_writes_markdown_csv_and_plot(metrics, tmp_path):
    written = write_tables(metrics, tmp_path / "results")
    assert {p.name for p in written} == {"table1.md", "table1.csv", "table2.md", "table2.csv", "tableA1.md",
                                         "tableA1.csv", "table_packed.md", "table_packed.csv", "table3.md", "table3.csv", "ppl_vs_bits.png"}
    with open(tmp_path / "results" / "table1.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["setting", "method", "m WikiText-2"] and len(rows) == 5
    assert (tmp_path / "results" / "ppl_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results" / "table2.md").read_text().startswith("### Table 2")


def test_tables_stage_logs_to_mlflow(metrics, make_cfg, tmp_path, monkeypatch):
    import mlflow

    from omniquant.stages.tables import tables

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    written = tables(make_cfg(f"paths.out={metrics.parent}", "mlflow.enabled=true", "grid.models=[m]"))
    assert (metrics.parent / "results" / "table1.md") in written  # grid.results of the default grid
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["omniquant"], output_format="list")[0]
    assert run.info.run_name == "grid" and run.data.tags["omniquant.role"] == "parent"  # the cells' parent run
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "tables")}
    assert {"tables/table1.md", "tables/ppl_vs_bits.png", "tables/table2.json"} <= names


def test_tables_stage_without_metrics_is_a_clear_error(make_cfg, tmp_path):
    from omniquant.stages.tables import tables
    from omniquant.errors import UserError

    with pytest.raises(UserError, match="run the evaluation stages first"):
        tables(make_cfg(f"paths.out={tmp_path / 'empty'}"))


def test_table3_rows_per_variant_with_skips_and_the_tvm_check():
    run = {"prefill_tok_s": 100.0, "decode_tok_s": {"b1_n128": 20.0, "b8_n128": 90.0}, "peak_mem_gb": 0.5,
           "weight_bytes": 3 * 2**20, "roofline_frac": {"b1_n128": 0.25, "b8_n128": 0.1}, "device": "cpu X"}
    speed = [{"model": "m", "setting": "w3a16g128", "method": "omniquant",
              "variants": {"packed": run, "torch_int4": {"skipped": "4-bit only"}}}]
    mlc = [{"model": "m", "setting": "w3a16g128", "method": "omniquant", "llvm_status": "ok", "llvm_build_s": 12.0,
            "llvm_prefill_max_abs_err": 2e-6, "llvm_decode_max_abs_err": 3e-6, "cuda_status": "skipped: no GPU",
            "mlc_route": "fake-quant-fp16", "mlc_quantization": "w3a16g128asym"}]
    t = table3(speed, mlc)
    assert t.columns[4:7] == ["prefill tok/s", "decode tok/s b1_n128", "decode tok/s b8_n128"]
    assert t.rows[0] == ["m", "w3a16g128", "omniquant", "packed", "100.0", "20.0", "90.0", "–", "0.50", "3.0",
                         "25.0", "cpu X"]
    assert t.rows[1][-1] == "skipped: 4-bit only"
    assert any("logits max abs error prefill 2.0e-06" in n and "CUDA skipped: no GPU" in n for n in t.notes)
    assert "measured once, before the median was taken (older runs): m w3a16g128 omniquant." in t.notes
    speed[0]["variants"]["packed"] |= {"bandwidth_samples_gb_s": [30.0, 35.0, 50.0]}  # a run that sampled it
    assert not any("measured once" in n for n in table3(speed, mlc).notes)


def test_table3_shows_a_cells_decode_in_turns_with_the_setting_before_it(tmp_path):
    run = {"prefill_tok_s": 100.0, "decode_tok_s": {"b1_n128": 250.0}, "peak_mem_gb": 0.1, "weight_bytes": 2**20,
           "roofline_frac": {"b1_n128": 0.6}, "device": "cpu X"}
    speed = [{"model": "m", "setting": s, "method": "omniquant", "variants": {"packed": run, "packed_a8": run}}
             for s in ("w4a16g128", "w2a16g64")]
    turns = {"model": "m", "setting": "w2a16g64", "method": "omniquant", "variant": "packed_a8",
             "against": "w4a16g128", "rounds": 7, "batch": 1, "new_tokens": 128, "ratio": 1.25,
             "median_tok_s": {"w4a16g128": 251.5, "w2a16g64": 310.0}}
    folder = tmp_path / "m" / "w2a16g64"
    folder.mkdir(parents=True)
    (folder / "omniquant.turns.json").write_text(json.dumps(turns))
    records = load_metrics(tmp_path)
    assert records.turns == [turns] and not records.ppl
    t = table3(speed, [], [], records.turns)
    cells = {(r[1], r[3]): r[t.columns.index("in turns: × setting (tok/s)")] for r in t.rows}
    assert cells == {("w4a16g128", "packed"): "–", ("w4a16g128", "packed_a8"): "–", ("w2a16g64", "packed"): "–",
                     ("w2a16g64", "packed_a8"): "1.25× w4a16g128 (310.0 / 251.5)"}
    assert any("packed_a8 decode and that of the setting named, at b1_n128" in n and "(7 rounds)" in n
               for n in t.notes)


def test_table3_llama_cpp_rows_with_their_perplexity_beside_ours_and_the_logits_check():
    check = {"windows": 2, "dataset": "wikitext2", "max_abs_diff": 0.61, "mean_abs_diff": 0.031, "reference_std": 3.1,
             "mean_abs_diff_rel": 0.01, "ppl": 21.9, "reference_ppl": 21.8, "ppl_rel_diff": 0.0046,
             "tolerance": {"mean_abs_diff_rel": 0.05, "ppl_rel_diff": 0.01}, "within_tolerance": True}
    run = {"prefill_tok_s": 900.0, "decode_tok_s": {"b1_n128": 60.0}, "decode_skipped": {"b8_n128": "batch 8 > 1"},
           "peak_mem_gb": 0.2, "weight_bytes": 92 * 2**20, "roofline_frac": {"b1_n128": 0.4}, "device": "cpu X",
           "n_threads": 2, "gguf": {"file": "SmolLM2-135M-Instruct.Q4_1.gguf", "bytes": 92 * 2**20, "sha256": "ab"},
           "logits_reference": "the FP checkpoint", "wikitext2_ppl": 21.95, "wikitext2_windows": 40, "logits_check": check}
    speed = [{"model": "m", "setting": "w4a16g32", "method": "omniquant", "variants": {
        "llama_cpp_source": run, "llama_cpp_export": {"skipped": "no llama.cpp"}}}]
    ppl = [{"model": "m", "setting": "fp16", "method": "fp", "wikitext2_ppl": 21.8}]
    t = table3(speed, [], ppl)
    assert t.rows[0][3:6] == ["llama.cpp (source GGUF)", "900.0", "60.0"]
    assert t.rows[1][3] == "llama.cpp (our Q4_1 export)" and t.rows[1][-1] == "skipped: no llama.cpp"
    note = next(n for n in t.notes if "llama.cpp (source GGUF)" in n)
    assert "wikitext2 21.95 over 40 windows (ours 21.80)" in note and "2 threads, batch 1 only" in note
    assert "max abs 0.610, mean abs 0.0310 (1.0 % of our logits' std 3.10)" in note
    assert "within the tolerance (mean_abs_diff_rel ≤ 0.05, ppl_rel_diff ≤ 0.01)" in note


def test_table1_shows_mean_and_std_over_seed_runs_and_the_paper_recipe_row(metrics):
    _write(metrics, "w3a16g128", "omniquant", ".seed3", wikitext2_ppl=10.5)
    _write(metrics, "w3a16g128", "omniquant", ".seed4", wikitext2_ppl=11.5)
    _write(metrics, "w3a16g128", "omniquant-paper", wikitext2_ppl=11.0)
    records = load_metrics(metrics)
    assert len(records.seed) == 2 and all(m["method"] == "omniquant" for m in records.seed)
    t = table1(records.ppl, records.seed)
    rows = {tuple(r[:2]): r[2:] for r in t.rows}
    assert rows[("w3a16g128", "omniquant")][0] == "10.50 ± 1.00 (3)"  # 9.5, 10.5, 11.5: sample std 1
    assert rows[("w3a16g128", "rtn")][0] == "12.25"  # no seed runs: the cell's value alone
    order = [r[1] for r in t.rows if r[0] == "w3a16g128"]
    assert order.index("omniquant-paper") < order.index("omniquant")
    assert any("two standard deviations" in n for n in t.notes)

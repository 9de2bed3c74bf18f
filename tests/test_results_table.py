import json

from pipelines.results_table import render, render_zeroshot


def test_renders_rows_in_setting_and_method_order(tmp_path):
    for setting, method, ppl in (("w3a16g128", "omniquant", 9.5), ("fp16", "fp", 5.0), ("w3a16g128", "rtn", 12.25)):
        path = tmp_path / "m" / setting / f"{method}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": "m", "setting": setting, "method": method, "wikitext2_ppl": ppl,
                                    "wikitext2_windows": 40, "quant_seconds": 3.0}))
    lines = render(tmp_path).splitlines()
    assert [line.split(" | ")[1:3] for line in lines[2:]] == [["fp16", "fp"], ["w3a16g128", "rtn"],
                                                              ["w3a16g128", "omniquant"]]
    assert "| 12.25 | 40 | – | – | 3 | – |" in lines[3]


def test_zeroshot_table_uses_the_chosen_metric_and_skips_ppl_files(tmp_path):
    cell = tmp_path / "m" / "w4a4"
    cell.mkdir(parents=True)
    (cell / "rtn.json").write_text(json.dumps({"model": "m", "setting": "w4a4", "method": "rtn", "wikitext2_ppl": 9.0}))
    (cell / "rtn.zeroshot.json").write_text(json.dumps({
        "model": "m", "setting": "w4a4", "method": "rtn", "piqa_acc": 0.6, "piqa_acc_norm": 0.7, "boolq_acc": 0.5,
        "zeroshot_limit": 50, "zeroshot_seconds": 12.0}))
    acc, norm = render_zeroshot(tmp_path).splitlines(), render_zeroshot(tmp_path, "acc_norm").splitlines()
    assert len(acc) == 3 and acc[2].startswith("| m | w4a4 | rtn | 60.0 | – | – | 50.0 | – | – | 55.0 | – | 50 | 12 |")
    assert norm[2].startswith("| m | w4a4 | rtn | 70.0 | – | – | 50.0 | – | – | 60.0 |")  # boolq has no acc_norm
    assert len(render(tmp_path).splitlines()) == 3  # the perplexity table ignores the zero-shot file

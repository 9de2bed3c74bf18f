"""Stages end to end on the tiny model, and the one-line errors for bad input."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from omniquant.errors import install_signal_handlers
from omniquant.layout import record_file
from omniquant.metrics import machine, read_json
from omniquant.models import load_model
from omniquant.arch import adapter_of
from omniquant.quantizer import dequantize_weight
from omniquant.stages.act_stats import act_stats
from omniquant.stages.bench_speed import bench_speed
from omniquant.stages.calib_data import calib_data
from omniquant.stages.eval_ppl import eval_ppl
from omniquant.stages.mlc_compile import CUDA_NOT_IMPLEMENTED, NO_CUDA, cuda_status, mlc_compile
from omniquant.stages.pack import pack
from omniquant.stages.prepare_model import prepare_model
from omniquant.stages.quantize import quantize
from omniquant.stages.run_cell import run_cell
from omniquant.stages.speed_turns import speed_turns
from pipelines._app import unknown_group_option

from conftest import CONF, REPO

SMOKE = ("model=tiny-llama", "profile=smoke")


def test_stage_chain_writes_on_grid_checkpoint_and_metrics(make_cfg, data_root, tmp_path):
    cfg = make_cfg(*SMOKE, "quant=w3a16g128", "method=rtn", f"data.root={data_root}")
    prepare_model(cfg)
    calib = calib_data(cfg)
    assert load_file(str(calib))["input_ids"].shape == (4, 64)
    qdir = quantize(cfg)
    assert not qdir.with_name(qdir.name + ".partial").exists()
    assert read_json(record_file(qdir))["quant"] == {"name": "w3a16g128", "wbits": 3, "abits": 16, "group_size": 128,
                                                     "symmetric": False, "act": None}
    model, _ = load_model(str(qdir), torch.float32, torch.device("cpu"))
    qparams = load_file(str(qdir / "qparams.safetensors"))
    assert qparams["model.layers.0.self_attn.q_proj.scales"].shape == (64, 1)  # 64 cols, one padded g128
    adapter = adapter_of(model)
    for i, block in enumerate(adapter.decoder_layers(model)):
        for view in adapter.layout(block, model.config).quantized.values():
            scales = qparams[f"model.layers.{i}.{view.packed_key}.scales"]
            zeros = qparams[f"model.layers.{i}.{view.packed_key}.zeros"]
            w = view.weight(block).detach()
            idx = torch.arange(w.shape[1]) // 128
            codes = torch.round(w / scales[:, idx]) + zeros[:, idx]
            assert codes.min() >= 0 and codes.max() <= 7  # 3-bit codes
            assert torch.equal(dequantize_weight(codes, scales, zeros, 128), w)  # exactly on the grid
    metrics = eval_ppl(cfg)
    saved = read_json(tmp_path / "metrics/tiny-llama/w3a16g128/rtn.json")
    assert saved == metrics
    for key in ("model", "setting", "method", "wikitext2_ppl", "wikitext2_windows", "ptb_ppl",
                "ptb_windows", "quant_seconds", "peak_rss_gb"):
        assert key in saved
    assert (saved["model"], saved["setting"], saved["method"]) == ("tiny-llama", "w3a16g128", "rtn")
    assert saved["wikitext2_windows"] == 2 and saved["wikitext2_ppl"] > 1
    assert saved["quant_machine"] == saved["eval_machine"] == machine()  # float results depend on the CPU


def test_run_cell_logs_to_mlflow(make_cfg, data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = make_cfg(*SMOKE, "quant=fp16", "method=fp", f"data.root={data_root}", "mlflow.enabled=true")
    metrics = run_cell(cfg)
    import mlflow

    runs = mlflow.search_runs(experiment_names=["omniquant"])
    assert sorted(runs["tags.mlflow.runName"]) == ["grid", "tiny-llama/fp16/fp"]
    parent = runs[runs["tags.mlflow.runName"] == "grid"].iloc[0]
    run = runs[runs["tags.mlflow.runName"] == "tiny-llama/fp16/fp"].iloc[0]
    assert run["tags.mlflow.parentRunId"] == parent["run_id"]  # nested under the grid's parent run
    assert run["metrics.wikitext2_ppl"] == pytest.approx(metrics["wikitext2_ppl"])
    assert run["params.quant.wbits"] == "16" and run["params.model.name"] == "tiny-llama"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"])}
    assert {"metrics.json", "config"} <= artifacts


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stage_signals_unwind_like_ctrl_c(signum):
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a non-interactive shell
    try:
        install_signal_handlers()
        with pytest.raises(KeyboardInterrupt, match=signal.Signals(signum).name):
            os.kill(os.getpid(), signum)
            time.sleep(1)  # the handler runs between bytecodes
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_forked_children_of_a_stage_die_on_sigterm():
    """lm-eval's bootstrap pool is forked and terminated by SIGTERM: a worker must die, not raise (which can
    leave the pool's queue lock held and hang the stage)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        install_signal_handlers()
        pid = os.fork()
        if pid == 0:  # the child: wait to be killed
            time.sleep(30)
            os._exit(0)
        time.sleep(0.2)
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_unknown_group_option_is_reported():
    assert unknown_group_option(["method=rtn", "quant=w4a16g128,w3a16g128"], CONF) is None
    assert "unknown method 'foo'" in unknown_group_option(["method=foo"], CONF)
    assert "available" in unknown_group_option(["quant=w4a16g128,w9"], CONF)
    assert unknown_group_option(["eval/zeroshot=default"], CONF) is None
    assert "unknown eval/zeroshot 'full'; available: default" in unknown_group_option(["eval/zeroshot=full"], CONF)


def _run_stage(stage, tmp_path, *overrides, env_extra=None):
    env = os.environ | {"OMNIQUANT_CACHE_DIR": str(tmp_path / "cache")} | (env_extra or {})
    cmd = [sys.executable, "-m", f"pipelines.{stage}", *SMOKE, f"paths.out={tmp_path / 'out'}",
           f"paths.models={tmp_path / 'models'}", "mlflow.enabled=false", f"hydra.run.dir={tmp_path / 'hydra'}",
           *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_missing_data_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run_stage("run_cell", tmp_path, "method=fp", "quant=fp16", f"data.root={tmp_path / 'empty'}")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing data file" in lines[0] and "wiki.test.raw" in lines[0], proc.stderr
    assert not (tmp_path / "out" / "metrics").exists()


def test_saved_weight_activation_checkpoint_evaluates_like_in_memory(make_cfg, data_root):
    """quantize → save → load → re-attach activation quant gives the in-memory model's perplexity."""
    cfg = make_cfg(*SMOKE, "quant=w4a4", "method=omniquant", f"data.root={data_root}")
    prepare_model(cfg)
    calib_data(cfg)
    act_stats(cfg)
    qdir = quantize(cfg)
    assert (qdir / "omni_parameters.safetensors").is_file()
    assert read_json(record_file(qdir))["quant"] == {"name": "w4a4", "wbits": 4, "abits": 4, "group_size": None,
                                                     "symmetric": False,
                                                     "act": {"bits": 4, "per_token": True, "symmetric": False}}
    staged = eval_ppl(cfg)
    in_memory = run_cell(cfg)
    assert staged["wikitext2_ppl"] == pytest.approx(in_memory["wikitext2_ppl"], rel=1e-6)
    assert staged["calib_epochs"] == 1 and staged["calib_nsamples"] == 4


SWEEP_CELLS = ["tiny-llama/w3a16g128/rtn", "tiny-llama/w4a16g128/rtn"]


def _sweep(tmp_path, data_root, *launcher: str) -> str:
    """Run a 2-cell tiny sweep (``quant=w4a16g128,w3a16g128``) with ``launcher`` overrides into ``tmp_path/sweep``
    and check what every launcher must give: metrics in the sweep dir only, one MLflow parent run with both cell
    runs nested under it, each with its perplexity. Returns the sweep's output."""
    env = os.environ | {"OMNIQUANT_CACHE_DIR": str(tmp_path / "cache"),
                        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("OMNIQUANT_MLFLOW_PARENT_ID", None)
    cmd = [sys.executable, "-m", "pipelines.run_cell", "-m", *launcher, *SMOKE, "method=rtn",
           "quant=w4a16g128,w3a16g128", f"data.root={data_root}", f"paths.models={tmp_path / 'models'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    before = sorted((REPO / "metrics").rglob("*.json"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(p.relative_to(tmp_path / "sweep") for p in (tmp_path / "sweep").rglob("metrics/**/*.json"))
    assert [p.as_posix() for p in written] == ["0/metrics/tiny-llama/w4a16g128/rtn.json",
                                               "1/metrics/tiny-llama/w3a16g128/rtn.json"]
    assert sorted((REPO / "metrics").rglob("*.json")) == before  # DVC-owned metrics untouched

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["omniquant"])
    parents = runs[runs["tags.omniquant.role"] == "parent"]
    assert len(parents) == 1 and parents.iloc[0]["tags.mlflow.runName"].startswith("sweep ")
    cells = runs[runs["tags.omniquant.role"].isna()].sort_values("tags.mlflow.runName")
    assert list(cells["tags.mlflow.runName"]) == SWEEP_CELLS
    assert set(cells["tags.mlflow.parentRunId"]) == {parents.iloc[0]["run_id"]}
    logged = dict(zip(cells["tags.mlflow.runName"], cells["metrics.wikitext2_ppl"]))
    for path in written:  # <job>/metrics/<cell>.json
        cell = path.relative_to(path.parts[0], "metrics").with_suffix("").as_posix()
        assert read_json(tmp_path / "sweep" / path)["wikitext2_ppl"] == pytest.approx(logged[cell])
    return proc.stdout + proc.stderr


def test_joblib_multirun_sweep_nests_cell_runs_and_leaves_dvc_outputs_alone(tmp_path, data_root):
    """``-m`` with the joblib launcher: two cells in parallel, one MLflow parent run, outputs in the sweep dir."""
    assert "Joblib.Parallel" in _sweep(tmp_path, data_root, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")


@pytest.mark.slow
def test_submitit_local_sweep_nests_cell_runs_from_job_processes(tmp_path, data_root):
    """``-m`` with SLURM's launcher, local executor: each cell a submitit job in its own process, nested likewise."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra-submitit-launcher is not installed: pip install -e '.[slurm]'")
    assert "Submitit 'local' sweep output dir" in _sweep(tmp_path, data_root, "hydra/launcher=submitit_local")
    logs = sorted(p.name for p in (tmp_path / "sweep" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2, logs  # one job (process) per cell


@pytest.mark.parametrize("quant", ["w4a16g128", "w3a16g128"])
def test_pack_stage_packed_model_matches_fake_quant(make_cfg, data_root, tmp_path, quant):
    """pack: a file holding no full-precision linear weights, whose model scores the fake-quant perplexity."""
    cfg = make_cfg(*SMOKE, f"quant={quant}", "method=rtn", f"data.root={data_root}")
    prepare_model(cfg)
    quantize(cfg)
    fake = eval_ppl(cfg)
    packed = pack(cfg)
    assert packed["packed_wikitext2_ppl"] == pytest.approx(fake["wikitext2_ppl"], rel=1e-4)
    assert packed["packed_bytes"] < packed["fp_bytes"] and 3 < packed["bits_per_weight"] < int(quant[1]) + 1
    saved = read_json(tmp_path / f"metrics/tiny-llama/{quant}/rtn.packed.json")
    assert saved["packed_bytes"] == (tmp_path / f"artifacts/packed/tiny-llama/{quant}/rtn/model.packed.safetensors").stat().st_size
    stored = load_file(str(tmp_path / f"artifacts/packed/tiny-llama/{quant}/rtn/model.packed.safetensors"))
    assert not any(k.endswith("proj.weight") for k in stored)  # no full-precision linear weights
    # the same with 8-bit embeddings and head: smaller, and its perplexity cost recorded
    assert saved["packed_int8_bytes"] < saved["packed_bytes"]
    assert saved["packed_int8_wikitext2_ppl"] == pytest.approx(fake["wikitext2_ppl"], rel=0.05)


def test_speed_turns_stage_times_two_cells_packed_checkpoints_in_turns(make_cfg, data_root, tmp_path):
    """speed_turns: a cell's packed_a8 decode and another setting's, one run of each a round."""
    from omniquant.errors import UserError
    from omniquant.kernels import cpu as cpu_kernels

    if cpu_kernels.unavailable() is not None:
        pytest.skip(f"CPU kernels: {cpu_kernels.unavailable()}")
    for quant in ("w4a16g128", "w3a16g128"):
        cfg = make_cfg(*SMOKE, f"quant={quant}", "method=rtn", f"data.root={data_root}")
        prepare_model(cfg)
        quantize(cfg)
        pack(cfg)
    turns = (*SMOKE, "quant=w3a16g128", "method=rtn", "bench=smoke", "bench.turns.rounds=3")
    record = speed_turns(make_cfg(*turns, "bench.turns.against=w4a16g128"))
    assert read_json(tmp_path / "metrics/tiny-llama/w3a16g128/rtn.turns.json") == record
    assert (record["setting"], record["against"], record["variant"]) == ("w3a16g128", "w4a16g128", "packed_a8")
    assert list(record["runs"]) == ["w4a16g128", "w3a16g128"] and all(len(r) == 3 and min(r) > 0
                                                                        for r in record["runs"].values())
    assert record["ratio"] == record["ratio_to_first"]["w3a16g128"]
    assert (record["batch"], record["new_tokens"]) == (1, 4)
    int8 = tmp_path / "artifacts/packed/tiny-llama/w3a16g128/rtn/model.packed-int8-embeddings.safetensors"
    assert record["checkpoints"]["w3a16g128"] == {"file": int8.name, "bytes": int8.stat().st_size}
    with pytest.raises(UserError, match="bench.turns.against is not set"):
        speed_turns(make_cfg(*turns))
    with pytest.raises(UserError, match="is this cell's own setting"):
        speed_turns(make_cfg(*turns, "bench.turns.against=w3a16g128"))
    with pytest.raises(UserError, match="tiny-llama/w2a16g64/rtn: run their pack stages"):
        speed_turns(make_cfg(*turns, "bench.turns.against=w2a16g64"))


def test_pack_refuses_weight_activation_settings(make_cfg, data_root):
    from omniquant.errors import UserError

    with pytest.raises(UserError, match="not a weight-only setting"):
        pack(make_cfg(*SMOKE, "quant=w4a4", "method=rtn", f"data.root={data_root}"))


def test_mlc_compile_and_bench_speed_stages(make_cfg, data_root, tmp_path):
    """pack → mlc_compile (MLC artifacts, TVM llvm build checked against PyTorch) → bench_speed."""
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install -e '.[mlc]')")
    cfg = make_cfg(*SMOKE, "quant=w4a16g128", "method=rtn", f"data.root={data_root}", "bench=smoke",
                   "bench.llama_cpp.variants=[]")  # tests/stages/test_bench_speed.py runs those
    prepare_model(cfg)
    quantize(cfg)
    pack(cfg)
    built = mlc_compile(cfg)
    assert built["llvm_status"] == "ok" and built["llvm_prefill_max_abs_err"] < 1e-4
    assert built["cuda_status"] == (CUDA_NOT_IMPLEMENTED if torch.cuda.is_available() else NO_CUDA)
    assert (tmp_path / "artifacts/mlc/tiny-llama/w4a16g128/rtn/mlc-llm/mlc-chat-config.json").is_file()
    speed = bench_speed(cfg)
    saved = read_json(tmp_path / "metrics/tiny-llama/w4a16g128/rtn.speed.json")
    assert saved["device"] == speed["device"] and set(saved["variants"]) == {
        "fp", "packed", "packed_int8", "packed_a8", "packed_hf", "torch_int4", "tvm", "tvm_int8"}
    from omniquant.kernels import cpu as cpu_kernels

    if cpu_kernels.unavailable() is not None:  # no CPU kernels here: skipped, saying why
        assert saved["variants"].pop("packed_a8") == {"skipped": cpu_kernels.unavailable()}
    for variant in saved["variants"].values():
        assert variant["prefill_tok_s"] > 0 and set(variant["decode_tok_s"]) == {"b1_n4", "b2_n4"}
        assert 0 < variant["roofline_frac"]["b1_n4"]


@pytest.mark.parametrize("gpu,expected", [(True, "skipped: the TVM CUDA build is not implemented yet"),
                                          (False, "skipped: no CUDA GPU on this machine")])
def test_cuda_status_says_why_the_cuda_build_was_skipped(monkeypatch, gpu, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert cuda_status() == expected

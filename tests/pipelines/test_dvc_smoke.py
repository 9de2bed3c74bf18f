"""`dvc repro` of the real dvc.yaml on the tiny model, in a temporary git repo."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow  # ≈ 7 min on 2 cores: .ci/run runs it after the default suite
@pytest.mark.skipif(shutil.which("dvc") is None and not (REPO / ".venv/bin/dvc").exists(), reason="dvc not installed")
def test_dvc_repro_smoke_grid(tmp_path, data_root):
    work = tmp_path / "repo"
    work.mkdir()
    for item in ("conf", "pipelines", "omniquant", "dvc.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / item)
    env = os.environ | {
        "OMNIQUANT_DATA_DIR": str(data_root),
        "OMNIQUANT_CACHE_DIR": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONPATH": str(work),
    }
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd):
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(sys.executable, "-m", "pipelines.compose_params", "grid=smoke")
    run(*dvc, "repro")
    results = work / "artifacts" / "smoke" / "results"  # the smoke grid's tables stay out of the tracked results/
    assert not (work / "results").exists()
    cells = [("w4a16g128", "rtn"), ("w4a16g128", "omniquant"), ("w4a4", "rtn"), ("w4a4", "smoothquant"),
             ("w4a4", "omniquant"), ("fp16", "fp")]
    for setting, method in cells:
        metrics = json.loads((work / "metrics" / "tiny-llama" / setting / f"{method}.json").read_text())
        assert (metrics["model"], metrics["setting"], metrics["method"]) == ("tiny-llama", setting, method)
        assert metrics["wikitext2_windows"] == 2 and metrics["wikitext2_ppl"] > 1
    for setting, method in (("fp16", "fp"), ("w4a4", "omniquant")):  # the smoke grid's zero-shot cells
        zs = json.loads((work / "metrics" / "tiny-llama" / setting / f"{method}.zeroshot.json").read_text())
        assert zs["winogrande_n"] == 2 and zs["zeroshot_limit"] == 2 and 0 <= zs["zeroshot_avg"] <= 1
    assert not (work / "metrics" / "tiny-llama" / "w4a4" / "rtn.zeroshot.json").exists()
    for method in ("rtn", "omniquant"):  # the smoke grid's pack cells
        packed = json.loads((work / "metrics" / "tiny-llama" / "w4a16g128" / f"{method}.packed.json").read_text())
        fake = json.loads((work / "metrics" / "tiny-llama" / "w4a16g128" / f"{method}.json").read_text())
        assert packed["packed_wikitext2_ppl"] == pytest.approx(fake["wikitext2_ppl"], rel=1e-4)
    assert "| tiny-llama | w4a16g128 | omniquant |" in (results / "table_packed.md").read_text()
    speed = json.loads((work / "metrics/tiny-llama/w4a16g128/omniquant.speed.json").read_text())
    assert speed["variants"]["packed"]["decode_tok_s"]["b1_n4"] > 0
    mlc = json.loads((work / "metrics/tiny-llama/w4a16g128/omniquant.mlc.json").read_text())
    assert mlc["llvm_status"] == "ok" or mlc["llvm_status"].startswith("skipped: ")
    assert "| tiny-llama | w4a16g128 | omniquant | packed |" in (results / "table3.md").read_text()
    assert "| fp16 | fp |" in (results / "table1.md").read_text()  # the tables stage ran last
    assert (results / "ppl_vs_bits.png").is_file() and (results / "table2.csv").is_file()
    assert (work / "dvc.lock").is_file()
    assert (work / "artifacts/act_stats/tiny-llama/act_stats.safetensors").is_file()
    assert (work / "artifacts/quantized/tiny-llama/w4a4/omniquant/omni_parameters.safetensors").is_file()
    assert "up to date" in run(*dvc, "repro")  # a second run re-runs nothing
    shown = run(*dvc, "metrics", "show", "--json")
    assert "wikitext2_ppl" in shown

"""The MLflow UI: real cell runs compared in `mlflow server` on loopback, rendered by headless Chromium.

The screenshot lands in ``results/screenshots/mlflow_compare.png`` (gitignored) for people to look at.
"""
from __future__ import annotations

import pytest

from conftest import REPO
from omniquant.mlflow_ui import NO_CHROMIUM, api, chromium, experiment_id, screenshot_compare, serve

SCREENSHOT = REPO / "results" / "screenshots" / "mlflow_compare.png"
CELLS = [("fp16", "fp"), ("w4a16g128", "rtn"), ("w3a16g128", "rtn")]


@pytest.fixture
def server(tmp_path, make_cfg, data_root, monkeypatch):
    """Three tiny cells logged by the pipeline, served by ``mlflow server`` on a free loopback port."""
    from omniquant.stages.run_cell import run_cell

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for quant, method in CELLS:
        run_cell(make_cfg("model=tiny-llama", "profile=smoke", f"quant={quant}", f"method={method}",
                          f"data.root={data_root}", "mlflow.enabled=true"))
    with serve(uri) as base:
        yield base


@pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)
def test_compare_page_shows_the_cell_runs(server):
    experiment = experiment_id(server, "omniquant")
    runs = api(server, "runs/search", {"experiment_ids": [experiment]})["runs"]
    cells = [r for r in runs if r["info"]["run_name"] != "grid"]
    names = sorted(r["info"]["run_name"] for r in cells)
    assert names == sorted(f"tiny-llama/{q}/{m}" for q, m in CELLS)
    for run in cells:  # stable flattened params and one metric vocabulary across cells
        params = {p["key"] for p in run["data"]["params"]}
        assert {"quant.wbits", "quant.abits", "method.name", "model.name", "eval.zeroshot.metric"} <= params
        assert "wikitext2_ppl" in {m["key"] for m in run["data"]["metrics"]}

    screenshot_compare(server, experiment, cells, ["wikitext2_ppl"], SCREENSHOT)  # checks the page names them all
    assert SCREENSHOT.stat().st_size > 20_000

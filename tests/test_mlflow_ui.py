"""The MLflow UI: real cell runs compared in `mlflow server` on loopback, rendered by headless Chromium.

The screenshot lands in ``results/screenshots/mlflow_compare.png`` (gitignored) for people to look at.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = REPO / "results" / "screenshots" / "mlflow_compare.png"
CELLS = [("fp16", "fp"), ("w4a16g128", "rtn"), ("w3a16g128", "rtn")]
# pipeline-ecosystem.md section 2; --virtual-time-budget lets the single-page app render before the shot
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1100", "--virtual-time-budget=20000"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    """MLflow REST call: GET, or POST with a JSON ``body``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def _chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url],
                              capture_output=True, text=True, timeout=180)


@pytest.fixture
def server(tmp_path, make_cfg, data_root, monkeypatch):
    """Three tiny cells logged by the pipeline, served by ``mlflow server`` on a free loopback port."""
    from omniquant.stages.run_cell import run_cell

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for quant, method in CELLS:
        run_cell(make_cfg("model=tiny-llama", "profile=smoke", f"quant={quant}", f"method={method}",
                          f"data.root={data_root}", "mlflow.enabled=true"))
    port = _free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey workers on 2 cores
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", uri, "--default-artifact-root", str(tmp_path / "mlruns"),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                    if resp.read().strip() == b"OK":
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not answer /health within 60 s")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium; "
                                              ".ci/run installs it)")
def test_compare_page_shows_the_cell_runs(server):
    experiment = _api(server, "experiments/get-by-name?experiment_name=omniquant")["experiment"]
    runs = _api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    cells = [r for r in runs if r["info"]["run_name"] != "grid"]
    names = sorted(r["info"]["run_name"] for r in cells)
    assert names == sorted(f"tiny-llama/{q}/{m}" for q, m in CELLS)
    for run in cells:  # stable flattened params and one metric vocabulary across cells
        params = {p["key"] for p in run["data"]["params"]}
        assert {"quant.wbits", "quant.abits", "method.name", "model.name", "eval.zeroshot.metric"} <= params
        assert "wikitext2_ppl" in {m["key"] for m in run["data"]["metrics"]}

    ids = json.dumps([r["info"]["run_id"] for r in cells], separators=(",", ":"))
    url = f"{server}/#/compare-runs?runs={ids}&experiments=[\"{experiment['experiment_id']}\"]"
    dom = _chromium(url, "--dump-dom").stdout
    assert f"Comparing {len(cells)} Runs" in dom
    assert all(name in dom for name in names) and "wikitext2_ppl" in dom
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    _chromium(url, f"--screenshot={SCREENSHOT}")
    assert SCREENSHOT.read_bytes()[:4] == b"\x89PNG" and SCREENSHOT.stat().st_size > 20_000

"""The MLflow UI, headless: ``mlflow server`` on a free loopback port, its pages rendered by Debian's Chromium.

    python -m omniquant.mlflow_ui OUT.png [--sweep PARENT_RUN_ID] [--experiment omniquant]

screenshots the compare view of a ``-m`` sweep's cell runs (the latest sweep parent run unless
``--sweep`` names one) in the store ``MLFLOW_TRACKING_URI`` names (default ``sqlite:///mlflow.db``),
after checking that the rendered page names every run and their perplexities.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from omniquant.errors import UserError, exit_on_user_error
from omniquant.tracking import DEFAULT_TRACKING_URI, PARENT_TAG, ROLE_TAG

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]
NO_CHROMIUM = "Debian chromium is not installed (apt-get install chromium; .ci/run installs it)"
# The compare page of MLflow 3.17 (pinned), made to show the metrics in one screen: the assistant panel
# closed, the plot and the parameters collapsed, only the metrics that differ between the runs.
CLICKS = ['[data-component-id="mlflow.assistant.chat_panel.close"]', '[aria-label="collapse Visualizations"]',
          '[aria-label="collapse Parameters"]', '[aria-label="Metrics - Show diff only"]']


def chromium() -> str | None:
    """The Chromium executable on PATH, if any."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(base: str, path: str, body: dict | None = None) -> dict:
    """MLflow REST call: GET, or POST with a JSON ``body``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


@contextmanager
def serve(tracking_uri: str) -> Iterator[str]:
    """``mlflow server`` over ``tracking_uri`` on a free loopback port; yields its base URL."""
    port = _free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no huey workers on 2 cores
    with tempfile.TemporaryDirectory() as artifacts:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                                 "--backend-store-uri", tracking_uri, "--default-artifact-root", artifacts,
                                 "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(base)
            yield base
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _wait_healthy(base: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.read().strip() == b"OK":
                    return
        except OSError:
            time.sleep(0.5)
    raise UserError(f"mlflow server did not answer {base}/health within {seconds:.0f} s")


def _group_alive(group: int) -> bool:
    """Whether any process of process group ``group`` is still running."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class DevTools:
    """One headless Chromium page driven over the DevTools pipe (fds 3 and 4, NUL-terminated JSON)."""

    def __init__(self, width: int = 1400, height: int = 1000, timeout: float = 120) -> None:
        exe = chromium()
        if exe is None:
            raise UserError(NO_CHROMIUM)
        self._profile = tempfile.TemporaryDirectory()
        to_child, self._send = os.pipe()
        self._recv, from_child = os.pipe()
        self._pid = os.posix_spawn(exe, [exe, *FLAGS, f"--user-data-dir={self._profile.name}"], os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, to_child, 3), (os.POSIX_SPAWN_DUP2, from_child, 4),  # where Chromium looks
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)],
            setsid=True)  # its own process group: close() ends the helpers too
        os.close(to_child)
        os.close(from_child)
        self._timeout, self._next, self._buffer, self._session = timeout, 0, b"", None
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params: Any) -> dict:
        """Send one DevTools command (to the page once attached) and return its result."""
        self._next += 1
        message = {"id": self._next, "method": method, "params": params} | (
            {"sessionId": self._session} if self._session else {})
        os.write(self._send, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self._timeout
        while True:
            reply = json.loads(self._read(deadline))
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise UserError(f"chromium: {method}: {reply['error'].get('message')}")
                return reply["result"]

    def _read(self, deadline: float) -> bytes:
        while b"\0" not in self._buffer:
            if not select.select([self._recv], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise UserError(f"chromium did not answer within {self._timeout:.0f} s")
            chunk = os.read(self._recv, 1 << 20)
            if not chunk:
                raise UserError("chromium exited before answering")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return message

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page."""
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            error = reply["exceptionDetails"].get("exception", {}).get("description", "error").splitlines()[0]
            raise UserError(f"chromium: {error} in {expression[:80]}")
        return reply["result"].get("value")

    def wait_for_texts(self, texts: list[str], seconds: float = 60) -> None:
        """Wait until the page's text holds every one of ``texts``; one-line error naming the missing ones."""
        deadline = time.monotonic() + seconds
        check = f"{json.dumps(texts)}.filter(t => !(document.body?.innerText ?? '').includes(t))"
        while (missing := self.evaluate(check)) and time.monotonic() < deadline:
            time.sleep(0.5)
        if missing:
            raise UserError(f"the page {self.evaluate('location.href')} does not show {', '.join(missing)}")

    def screenshot(self, out: Path) -> None:
        """Save the viewport as PNG ``out``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """End Chromium and every helper process it started, then delete its profile."""
        os.close(self._send)
        os.killpg(self._pid, signal.SIGTERM)
        os.waitpid(self._pid, 0)
        os.close(self._recv)
        deadline = time.monotonic() + 10  # helpers still writing into the profile would make its removal fail
        while _group_alive(self._pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(self._pid):  # (or zombies nobody reaps, which write nothing)
            os.killpg(self._pid, signal.SIGKILL)
            time.sleep(0.5)
        self._profile.cleanup()

    def __enter__(self) -> "DevTools":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def screenshot_compare(base: str, experiment_id: str, runs: list[dict], metrics: list[str], out: Path) -> None:
    """Open the compare view of ``runs`` (REST run objects), check it names every run and ``metrics``,
    and save a screenshot of its run details and metrics (:data:`CLICKS`) as PNG ``out``."""
    ids = json.dumps([r["info"]["run_id"] for r in runs], separators=(",", ":"))
    with DevTools() as page:
        page.call("Page.navigate", url=f"{base}/#/compare-runs?runs={ids}&experiments=[\"{experiment_id}\"]")
        page.wait_for_texts([f"Comparing {len(runs)} Runs", *(r["info"]["run_name"] for r in runs), *metrics])
        missing = page.evaluate(f"{json.dumps(CLICKS)}.filter(s => {{ const e = document.querySelector(s); "
                                "if (e) e.click(); return !e; })")
        if missing:
            raise UserError(f"the compare page has no {', '.join(missing)}: not the MLflow 3.17 UI?")
        time.sleep(2)  # let the sections fold and the metrics table re-render
        page.screenshot(out)


def experiment_id(base: str, name: str) -> str:
    """The id of experiment ``name``; one-line error if the store has none."""
    try:
        return api(base, f"experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
    except urllib.error.HTTPError as err:
        raise UserError(f"no MLflow experiment {name!r} in this store: log runs first") from err


def sweep_runs(base: str, experiment: str, parent: str | None) -> list[dict]:
    """The cell runs nested under sweep parent run ``parent`` (None: the latest sweep parent)."""
    if parent is None:
        found = api(base, "runs/search", {"experiment_ids": [experiment], "max_results": 1,
                                          "filter": f"tags.`{ROLE_TAG}` = 'parent' and attributes.run_name LIKE 'sweep %'",
                                          "order_by": ["attributes.start_time DESC"]}).get("runs", [])
        if not found:
            raise UserError("no sweep parent run in this store: run a -m sweep first (or pass --sweep RUN_ID)")
        parent = found[0]["info"]["run_id"]
    children = api(base, "runs/search", {"experiment_ids": [experiment],
                                         "filter": f"tags.`{PARENT_TAG}` = '{parent}'"}).get("runs", [])
    if not children:
        raise UserError(f"run {parent} has no nested cell runs")
    return sorted(children, key=lambda r: r["info"]["run_name"])


def shared_perplexities(runs: list[dict]) -> list[str]:
    """The ``*_ppl`` metric names every run has."""
    names = [{m["key"] for m in r["data"].get("metrics", []) if m["key"].endswith("_ppl")} for r in runs]
    return sorted(set.intersection(*names))


def main(argv: list[str] | None = None) -> None:
    """Screenshot a sweep's compare view (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m omniquant.mlflow_ui", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--sweep", default=None, help="the sweep's parent run id (default: the latest sweep)")
    p.add_argument("--experiment", default="omniquant")
    args = p.parse_args(argv)
    with serve(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI) as base:
        experiment = experiment_id(base, args.experiment)
        runs = sweep_runs(base, experiment, args.sweep)
        screenshot_compare(base, experiment, runs, shared_perplexities(runs), args.out)
    print(f"{args.out}: {len(runs)} runs: {', '.join(r['info']['run_name'] for r in runs)}")


if __name__ == "__main__":
    exit_on_user_error(main)()

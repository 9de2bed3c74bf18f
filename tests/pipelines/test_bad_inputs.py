"""Wrong flags, kills, corrupt state and concurrent runs through the real entry points (issue 17).

Each bad value is one ``omniquant:`` line on stderr, exit code 2, no traceback and nothing written under
the output root (not even Hydra's run folder); interrupts are one line with 130/143 and resume; stale or
corrupt state and caches are discarded with one line saying why."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omniquant.errors import UserError
from pipelines._app import check_overrides

from conftest import REPO

SMOKE = ("model=tiny-llama", "profile=smoke", "mlflow.enabled=false")
SLOW_OMNIQUANT = ("quant=w4a4", "method=omniquant", "method.epochs=200")  # a second or more per block


def _cmd(root: Path, stage: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", f"pipelines.{stage}", *SMOKE, f"paths.out={root / 'out'}",
            f"paths.models={root / 'models'}", f"paths.cache={root / 'cache'}", f"hydra.run.dir={root / 'out' / 'hydra'}",
            *overrides]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1"}


def _run(root: Path, *overrides: str, stage: str = "run_cell") -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(root, stage, *overrides), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)


def _lines(stream: str) -> list[str]:
    return [line for line in stream.splitlines() if line.startswith("omniquant:")]


def _one_line(proc: subprocess.CompletedProcess, code: int, alone: bool = True) -> str:
    """The one ``omniquant:`` line on stderr; ``alone``: stderr holds nothing else (else progress bars may
    precede it, as in an interrupted run)."""
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = _lines(proc.stderr)
    assert len(lines) == 1 and (not alone or len(proc.stderr.strip().splitlines()) == 1), proc.stderr[-2000:]
    return lines[0]


BAD = [  # (overrides, what the one line says)
    (["eval.max_windows=-1"], "eval.max_windows=-1 is invalid: allowed an integer >= 1 or null"),
    (["eval.max_windows=0"], "eval.max_windows=0 is invalid"),
    (["eval.max_windows={wikitext2: -1}"], "eval.max_windows.wikitext2=-1 is invalid"),
    (["eval.seqlen=-5"], "eval.seqlen=-5 is invalid: allowed an integer >= 2"),
    (["eval.seqlen=4096"], "the model's context is 512 tokens"),
    (["eval.datasets=[wiki]"], "eval.datasets=['wiki'] is invalid"),
    (["quant.group_size=0"], "quant.group_size=0 is invalid: allowed an integer >= 1 or null"),
    (["quant.group_size=-7"], "quant.group_size=-7 is invalid"),
    (["quant.wbits=9"], "quant.wbits=9 is invalid: allowed 2..8, or 16 for full precision"),
    (["quant.wbits=1"], "quant.wbits=1 is invalid"),
    (["quant=w4a4", "quant.abits=32"], "quant.abits=32 is invalid"),
    (["quant=fp16", "method=rtn"], "quantizes nothing"),
    (["method=fp"], "use quant=fp16"),
    (["method=gptq", "quant=w4a4", "quant.wbits=16"], "method=gptq quantizes weights"),
    (["method=omniquant", "method.nan_retries=-1"], "method.nan_retries=-1 is invalid: allowed an integer >= 0"),
    (["method=omniquant", "method.epochs=-1"], "method.epochs=-1 is invalid"),
    (["method=omniquant", "method.lwc_lr=inf"], "method.lwc_lr=inf is invalid: allowed a finite number > 0"),
    (["method=omniquant", "method.let_lr=-1"], "method.let_lr=-1 is invalid"),
    (["method=omniquant", "method.batch_size=0"], "method.batch_size=0 is invalid"),
    (["method=omniquant", "method.nan_policy=ignore"], "method.nan_policy=ignore is invalid: allowed one of raise, retry"),
    (["method=gptq", "method.percdamp=-0.1"], "method.percdamp=-0.1 is invalid"),
    (["method=smoothquant", "quant=w4a4", "method.alpha=2"], "method.alpha=2 is invalid: allowed a number in [0, 1]"),
    (["data.calib.nsamples=0"], "data.calib.nsamples=0 is invalid: allowed an integer >= 1"),
    (["data.calib.seqlen=0"], "data.calib.seqlen=0 is invalid: allowed an integer >= 2"),
    (["data.calib.seqlen=1024"], "data.calib.seqlen=1024 is invalid: the model's context is 512"),
    (["device=tpu"], "device=tpu is invalid: allowed auto, cpu, cuda or cuda:<index>"),
    (["dtype=int8"], "dtype=int8 is invalid"),
    (["seed=-1"], "seed=-1 is invalid"),
    (["method.foo=1"], "Could not override 'method.foo'"),
    (["quant=w9"], "unknown quant 'w9'"),
    (["model=no-such-model"], "unknown model 'no-such-model'"),
    (["method=no-such-method"], "unknown method 'no-such-method'"),
    (["model=hf", "model.path=/no/such/model"], "/no/such/model does not exist"),
    (["model.tiny.hidden_size=0"], "model.tiny.hidden_size=0 is invalid"),
    (["bench.batches=[0]"], "bench.batches=[0] is invalid"),
    (["bench.turns.against=w9"], "bench.turns.against=w9 is invalid"),
    (["bench.turns.rounds=0"], "bench.turns.rounds=0 is invalid"),
    (["eval.zeroshot.limit=0"], "eval.zeroshot.limit=0 is invalid"),
    (["grid.models=[nope]"], "grid.models=['nope'] is invalid"),
]


ROWS = {  # the rows, through the real entry point (a subprocess each); the rest in-process below
    "eval.max_windows=-1", "eval.seqlen=-5", "method=omniquant method.nan_retries=-1",
    "method=omniquant method.lwc_lr=inf", "method=omniquant method.let_lr=-1", "data.calib.nsamples=0",
    "data.calib.seqlen=0", "eval.max_windows=0", "device=tpu", "method.foo=1",
}


@pytest.mark.parametrize("overrides,expected", [b for b in BAD if " ".join(b[0]) in ROWS],
                         ids=[" ".join(o) for o, _ in BAD if " ".join(o) in ROWS])
def test_a_bad_value_is_one_line_and_nothing_is_written(tmp_path, overrides, expected):
    line = _one_line(_run(tmp_path, "method=rtn", *overrides), 2)
    assert line.startswith("omniquant: error: ") and expected in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_every_bad_value_is_refused_before_hydra_starts(overrides, expected):
    """What the entry points run first (:func:`pipelines._app.check_overrides`), in-process."""
    with pytest.raises(UserError) as err:
        check_overrides([*SMOKE, "method=rtn", *overrides])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_stages_other_than_run_cell_validate_too(tmp_path):
    for stage in ("quantize", "eval_ppl", "calib_data"):
        assert "eval.max_windows=-1 is invalid" in _one_line(_run(tmp_path, "eval.max_windows=-1", stage=stage), 2)
    assert not (tmp_path / "out").exists()


def test_cli_flags_are_validated(tmp_path):
    for args, expected in ((["ppl", str(tmp_path), "--max-windows", "-1"], "--max-windows=-1 is invalid"),
                           (["quantize", str(tmp_path), str(tmp_path / "q"), "--wbits", "9"], "--wbits=9 is invalid"),
                           (["quantize", str(tmp_path), str(tmp_path / "q"), "--wbits", "4", "--group-size", "0"],
                            "--group-size=0 is invalid")):
        proc = subprocess.run([sys.executable, "-m", "omniquant.cli", *args], cwd=REPO, capture_output=True, text=True)
        assert expected in _one_line(proc, 2)
    assert not list(tmp_path.iterdir())


def test_the_setting_name_comes_from_the_values(tmp_path, data_root):
    proc = _run(tmp_path, "quant=w4a16g128", "quant.group_size=32", "method=rtn")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "make this setting w4a16g32" in proc.stdout
    metrics = tmp_path / "out" / "metrics" / "tiny-llama"
    assert [p.name for p in metrics.iterdir()] == ["w4a16g32"]


def _start(root: Path, *overrides: str) -> subprocess.Popen:
    """A slow OmniQuant cell in the background (``overrides`` after :data:`SLOW_OMNIQUANT`)."""
    return subprocess.Popen(_cmd(root, "run_cell", *SLOW_OMNIQUANT, *overrides), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _state(root: Path) -> Path:
    return root / "out" / "artifacts" / "state" / "tiny-llama" / "w4a4" / "omniquant"


def _interrupted(root: Path, signum: int = signal.SIGTERM, *overrides: str) -> str:
    """Start a slow OmniQuant cell, stop it once block 0 is saved; returns its one stderr line."""
    proc = _start(root, *overrides)
    _wait_for(_state(root) / "progress.json", proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return _one_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), 128 + signum, alone=False)


@pytest.mark.slow  # real calibration runs in subprocesses: `pytest -m slow` (CI runs it)
def test_an_interrupt_is_one_line_and_the_run_resumes(tmp_path, data_root):
    line = _interrupted(tmp_path, signal.SIGTERM)
    assert line == "omniquant: interrupted at block 2 of 2; run the same command to resume", line
    proc = _run(tmp_path, *SLOW_OMNIQUANT, "method.epochs=1")  # another config: starts over, saying why
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "was made with another method; starting over" in proc.stdout
    assert not _state(tmp_path).exists()  # finished: its own state removed


@pytest.mark.slow  # real calibration runs in subprocesses: `pytest -m slow` (CI runs it)
def test_state_of_other_weights_is_discarded_with_a_reason(tmp_path, data_root):
    assert _interrupted(tmp_path, signal.SIGINT).startswith("omniquant: interrupted at block 2 of 2;")
    proc = _run(tmp_path, *SLOW_OMNIQUANT, "method.epochs=1", "model.tiny.seed=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepared model" in proc.stdout and "seed=0" in proc.stdout and "rebuilding" in proc.stdout
    assert "was made with another act_stats, method, weights; starting over" in proc.stdout


@pytest.mark.slow  # real calibration runs in subprocesses: `pytest -m slow` (CI runs it)
def test_corrupt_state_is_discarded_with_a_reason(tmp_path, data_root):
    _interrupted(tmp_path)
    state, saved = _state(tmp_path), tmp_path / "saved-state"
    shutil.copytree(state, saved)
    for damage, reason in ((lambda: block.write_bytes(block.read_bytes()[:1000]), "unreadable block_000.safetensors"),
                           (lambda: block.write_bytes(b"\x07" * 64), "unreadable block_000.safetensors"),
                           (lambda: (state / "progress.json").write_text("{not json"), "no readable progress.json")):
        shutil.rmtree(state, ignore_errors=True)
        shutil.copytree(saved, state)
        block = state / "block_000.safetensors"
        damage()
        proc = _run(tmp_path, *SLOW_OMNIQUANT, "method.epochs=1")
        assert proc.returncode == 0, proc.stderr[-2000:]
        said = [line for line in proc.stdout.splitlines() if "resume state" in line]
        assert len(said) == 1 and reason in said[0] and said[0].endswith("starting over"), proc.stdout[-2000:]


@pytest.mark.slow  # real calibration runs in subprocesses: `pytest -m slow` (CI runs it)
def test_a_second_run_of_the_same_cell_is_refused_naming_the_holder(tmp_path, data_root):
    first = _start(tmp_path, "method.epochs=5000")  # still running when the second one starts
    lock = tmp_path / "out" / "artifacts" / "locks" / "tiny-llama" / "w4a4" / "omniquant" / "quantize.lock"
    try:
        _wait_for(lock, first)
        while not lock.read_text().strip():
            time.sleep(0.1)
        line = _one_line(_run(tmp_path, *SLOW_OMNIQUANT, "method.epochs=5000"), 2, alone=False)
        assert f"quantize of tiny-llama/w4a4/omniquant is being run by pid {first.pid}" in line, line
        assert lock.read_text().strip() == str(first.pid) and first.poll() is None  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143


@pytest.mark.slow  # real calibration runs in subprocesses: `pytest -m slow` (CI runs it)
def test_a_damaged_checkpoint_is_one_line(tmp_path, data_root):
    assert _run(tmp_path, "method=rtn").returncode == 0  # prepares the tiny model
    weights = tmp_path / "models" / "tiny-llama" / "model.safetensors"
    data = weights.read_bytes()
    for damaged in (data[: len(data) // 2], b"garbage" * 10):
        weights.write_bytes(damaged)
        assert "could not load the weights in" in _one_line(_run(tmp_path, "method=rtn"), 2, alone=False)


def test_a_launcher_whose_plugin_is_missing_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "hydra_plugins.hydra_submitit_launcher" else real(name, *a))
    with pytest.raises(UserError) as err:
        check_overrides(["-m", *SMOKE, "method=rtn", "hydra/launcher=submitit_local"])
    assert str(err.value) == ("hydra/launcher=submitit_local needs the hydra_submitit_launcher plugin, from the slurm "
                              "extra: pip install -e '.[slurm]'")
    check_overrides(["-m", *SMOKE, "method=rtn", "hydra/launcher=joblib"])  # installed: Hydra takes over

"""The `omniquant` CLI on the tiny model: quantize, pack and export, bad flags, overlapping and interrupted outputs."""
import json
import signal
import subprocess
import sys

import pytest
import torch

from omniquant import cli
from omniquant.export.common import QPARAMS_FILE
from omniquant.layout import record_file
from omniquant.models import load_model
from omniquant.models.tiny import tiny_model
from omniquant.packed import load_packed_model
from omniquant.setting import QuantSetting
from omniquant.stages.prepare_model import prepare_model
from omniquant.stages.quantize import quantize


@pytest.fixture
def quantized(make_cfg, data_root):
    cfg = make_cfg("model=tiny-llama", "profile=smoke", "quant=w4a16g32", "method=rtn", f"data.root={data_root}")
    prepare_model(cfg)
    return quantize(cfg)


def test_pack_and_export_commands(quantized, tmp_path, capsys):
    cli.main(["pack", str(quantized), str(tmp_path / "model.packed.safetensors")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["packed_bytes"] > 0
    fake, _ = load_model(str(quantized), torch.float32, torch.device("cpu"))
    packed = load_packed_model(tmp_path / "model.packed.safetensors")
    ids = torch.arange(12).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, fake(ids).logits, rtol=1e-4, atol=1e-4)
    for fmt in ("compressed-tensors", "gguf"):
        cli.main(["export", str(quantized), str(tmp_path / fmt), "--format", fmt])
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["format"] == fmt
    assert (tmp_path / "compressed-tensors" / "config.json").is_file()
    assert list((tmp_path / "gguf").glob("*.gguf"))


def test_export_of_a_setting_the_format_cannot_hold_is_one_clear_line(quantized, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", str(quantized), str(tmp_path / "awq"), "--format", "awq"])
    assert exit_info.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("omniquant: error: awq export cannot represent setting w4a16g32")
    assert "Traceback" not in errors[0] and not list(tmp_path.glob("awq*"))  # no output, no temporary one


def test_commands_read_the_setting_from_the_quant_record(quantized, tmp_path, capsys):
    assert cli._stage_setting(str(quantized)) == QuantSetting(4, 16, 32, symmetric=False)
    record = json.loads(record_file(quantized).read_text())
    record["quant"]["symmetric"] = True
    record_file(quantized).write_text(json.dumps(record))
    assert cli._stage_setting(str(quantized)).symmetric  # not re-parsed from the name
    del record["quant"]
    record_file(quantized).write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        cli.main(["pack", str(quantized), str(tmp_path / "model.packed.safetensors")])
    assert "does not record the quantization setting" in capsys.readouterr().err


@pytest.fixture
def tiny_dir(tmp_path):
    """The tiny Llama saved as an HF checkpoint."""
    model, tok = tiny_model()
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _one_line_error(capsys, code: int, exit_info) -> str:
    err = capsys.readouterr().err
    assert exit_info.value.code == code and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("omniquant")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["quantize", "M", "OUT", "--wbits", "9"], "--wbits=9 is invalid: allowed 2..8, or 16 for full precision"),
    (["quantize", "M", "OUT", "--wbits", "4", "--abits", "1"], "--abits=1 is invalid: allowed 2..8, or 16 for full precision"),
    (["quantize", "M", "OUT", "--wbits", "4", "--group-size", "0"], "--group-size=0 is invalid: allowed an integer >= 1"),
    (["quantize", "M", "OUT", "--wbits", "4", "--group-size", "x"], "--group-size=x is invalid: allowed an integer >= 1"),
    (["ppl", "M", "--max-windows", "-1"], "--max-windows=-1 is invalid: allowed an integer >= 1"),
    (["ppl", "M", "--seqlen", "1"], "--seqlen=1 is invalid: allowed an integer >= 2"),
])
def test_numeric_flags_are_checked_before_anything_runs(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert _one_line_error(capsys, 2, exit_info) == f"omniquant: error: {message}"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out", ["{model}", "{model}/q", "{model}/.."])
def test_quantize_refuses_an_output_that_overlaps_the_model(out, tiny_dir, capsys):
    before = sorted(p.name for p in tiny_dir.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["quantize", str(tiny_dir), out.format(model=tiny_dir), "--wbits", "4"])
    assert "overlaps the input" in _one_line_error(capsys, 2, exit_info)
    assert sorted(p.name for p in tiny_dir.iterdir()) == before


def test_quantize_writes_a_quantize_stage_directory(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    cli.main(["quantize", str(tiny_dir), str(out), "--wbits", "4", "--group-size", "32"])
    record = json.loads(record_file(out).read_text())
    assert record["setting"] == "w4a16g32" and record["method"] == "rtn" and record["quant_seconds"] >= 0
    assert QuantSetting.from_record(record["quant"]) == QuantSetting(4, 16, 32)
    assert (out / QPARAMS_FILE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["q", "tiny"]
    cli.main(["pack", str(out), str(tmp_path / "model.packed.safetensors")])
    cli.main(["export", str(out), str(tmp_path / "ct"), "--format", "compressed-tensors"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["written"] == str(tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "model.packed.safetensors", "q", "tiny"]


INTERRUPT_IN_SAVE = """
import os, signal, sys, time
from transformers import PreTrainedTokenizerBase
from omniquant import cli

def save_pretrained(self, *args, **kwargs):  # the weights are written: the folder is half a checkpoint
    os.kill(os.getpid(), int(sys.argv[1]))
    time.sleep(30)

PreTrainedTokenizerBase.save_pretrained = save_pretrained
cli.main(sys.argv[2:])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_quantize_leaves_no_partial_output(signum, tiny_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old").write_text("the previous output")
    proc = subprocess.run([sys.executable, "-c", INTERRUPT_IN_SAVE, str(int(signum)), "quantize", str(tiny_dir),
                           str(out), "--wbits", "4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signum and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("omniquant")] == [
        "omniquant: interrupted; run the same command again"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "tiny"]  # no *.partial-<pid> left
    assert [p.name for p in out.iterdir()] == ["old"]  # the previous output is replaced only when complete


def test_speed_command_sweeps_bits_in_one_run_and_plots(quantized, tmp_path, capsys):
    out, plot = tmp_path / "speed.json", tmp_path / "speed.png"
    cli.main(["speed", str(quantized), str(out), "--settings", "w4a16g32", "w2a16g32", "--new-tokens", "2",
              "--repeats", "1", "--plot", str(plot)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"written": str(out), "plot": str(plot)}
    sweep = json.loads(out.read_text())
    assert set(sweep["settings"]) == {"w4a16g32", "w2a16g32"} and "fp" in sweep and "llama_cpp" not in sweep
    four, two = sweep["settings"]["w4a16g32"], sweep["settings"]["w2a16g32"]
    assert two["bits_per_weight"] < four["bits_per_weight"]
    assert four["packed_int8"]["bytes_per_step"] < four["packed"]["bytes_per_step"]
    assert four["packed"]["decode_tok_s"]["b1_n2"] > 0 and "step_ms" in four["packed_int8"]
    assert plot.stat().st_size > 0
    with pytest.raises(SystemExit) as err:
        cli.main(["speed", str(quantized), str(out), "--gguf", str(tmp_path / "missing.gguf")])
    assert err.value.code == 2 and "no such file" in capsys.readouterr().err


def test_turns_command_times_packed_checkpoints_in_turns(tmp_path, capsys):
    from omniquant.bench import random_packed_model
    from omniquant.kernels import cpu as cpu_kernels
    from omniquant.models.tiny import tiny_llama

    if cpu_kernels.unavailable() is not None:
        pytest.skip(f"CPU kernels: {cpu_kernels.unavailable()}")
    config = tiny_llama()[0].config
    files = [str(random_packed_model(config, QuantSetting(bits, 16, 32), tmp_path / f"w{bits}.st", embedding_bits=8)["path"])
             for bits in (4, 2)]
    out = tmp_path / "turns.json"
    cli.main(["turns", str(out), *files, "--new-tokens", "2", "--repeats", "3"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"written": str(out)}
    turns = json.loads(out.read_text())
    assert list(turns["runs"]) == files and all(len(r) == 3 and min(r) > 0 for r in turns["runs"].values())
    assert turns["ratio_to_first"][files[0]] == 1.0 and turns["isa"] == cpu_kernels.a8_isa()
    assert turns["bytes"][files[1]] < turns["bytes"][files[0]]
    with pytest.raises(SystemExit) as err:
        cli.main(["turns", str(out), files[0], str(tmp_path / "missing.st")])
    assert err.value.code == 2 and "no such checkpoint file" in capsys.readouterr().err
    (tmp_path / "notes.st").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as err:
        cli.main(["turns", str(out), str(tmp_path / "notes.st")])
    message = capsys.readouterr().err
    assert err.value.code == 2 and "not a packed checkpoint" in message and "Traceback" not in message

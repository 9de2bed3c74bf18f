"""The `omniquant` CLI's pack and export commands on a quantize-stage output of the tiny model."""
import json

import pytest
import torch

from omniquant import cli
from omniquant.layout import record_file
from omniquant.models import load_model
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
    assert "Traceback" not in errors[0] and not (tmp_path / "awq").exists()


def test_commands_read_the_setting_from_the_quant_record(quantized, tmp_path, capsys):
    assert cli._stage_setting(str(quantized)) == QuantSetting("w4a16g32", 4, 16, 32, symmetric=False)
    record = json.loads(record_file(quantized).read_text())
    record["quant"]["symmetric"] = True
    record_file(quantized).write_text(json.dumps(record))
    assert cli._stage_setting(str(quantized)).symmetric  # not re-parsed from the name
    del record["quant"]
    record_file(quantized).write_text(json.dumps(record))
    with pytest.raises(SystemExit):
        cli.main(["pack", str(quantized), str(tmp_path / "model.packed.safetensors")])
    assert "does not record the quantization setting" in capsys.readouterr().err

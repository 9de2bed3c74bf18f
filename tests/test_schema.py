"""The config schema (one validation of every group) and setting names that come from the values."""
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from omniquant import schema
from omniquant.errors import UserError
from omniquant.setting import QuantSetting

from conftest import CONF


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("overrides", [
    [], ["method=omniquant"], ["method=gptq"], ["method=awq"], ["method=smoothquant", "quant=w4a4"],
    ["method=fp", "quant=fp16"], ["model=tiny-llama", "profile=smoke"], ["profile=paper"], ["grid=cpu"],
    ["grid=smoke"], ["grid=paper"], ["model=tiny-qwen3"], ["quant.group_size=7"], ["eval.max_windows=3"],
])
def test_every_shipped_config_is_valid(overrides):
    schema.validate(_cfg(*overrides))


@pytest.mark.parametrize("overrides, message", [
    (["quant.group_size=0"], "quant.group_size=0 is invalid: allowed an integer >= 1 or null"),
    (["quant.symmetric=3"], "quant.symmetric=3 is invalid: allowed true or false"),
    (["method=omniquant", "method.wd=nan"], "method.wd=nan is invalid: allowed a finite number >= 0"),
    (["method=omniquant", "method.lwc_lr=0"], "method.lwc_lr=0 is invalid: allowed a finite number > 0 or null"),
    (["method=omniquant", "method.let=maybe"], "method.let=maybe is invalid: allowed true or false or null"),
    (["method=awq", "method.n_grid=0"], "method.n_grid=0 is invalid"),
    (["eval.max_windows={wikitext2: 0}"], "eval.max_windows.wikitext2=0 is invalid"),
    (["data.calib.dataset=books"], "data.calib.dataset=books is invalid: allowed one of wikitext2, ptb, c4"),
    (["eval.zeroshot.metric=f1"], "eval.zeroshot.metric=f1 is invalid"),
    (["bench.variants=[gguf]"], "bench.variants=['gguf'] is invalid"),
    (["bench.repeats=0"], "bench.repeats=0 is invalid"),
    (["calibration.epochs=-2"], "calibration.epochs=-2 is invalid"),
    (["device=cuda:x"], "device=cuda:x is invalid"),
    (["model=tiny-llama", "eval.seqlen=513"], "eval.seqlen=513 is invalid: the model's context is 512 tokens"),
    (["quant=w4a4", "method=gptq", "quant.wbits=16"], "method=gptq quantizes weights"),
])
def test_a_wrong_value_names_key_value_and_what_is_allowed(overrides, message):
    with pytest.raises(UserError) as err:
        schema.validate(_cfg(*overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_speed_blocks_in_turns_flag_is_a_boolean():
    cfg = OmegaConf.to_container(_cfg("grid=smoke"))
    cfg["grid"]["speed"]["blocks"][0]["in_turns"] = "yes"
    with pytest.raises(UserError, match=r"^grid.speed.blocks.in_turns=yes is invalid: allowed true or false$"):
        schema.validate(cfg)


def test_cli_flags_parse_with_the_same_rules():
    assert schema.flag(schema.BITS, "--wbits")("16") == 16
    for text, message in (("9", "--wbits=9 is invalid: allowed 2..8, or 16 for full precision"),
                          ("four", "--wbits=four is invalid"), ("2.5", "--wbits=2.5 is invalid")):
        with pytest.raises(UserError, match=message.replace(".", r"\.")):
            schema.flag(schema.BITS, "--wbits")(text)


def test_booleans_are_not_integers():
    with pytest.raises(UserError):
        schema.POSITIVE.check("data.calib.nsamples", True)


@pytest.mark.parametrize("values, name", [
    ((4, 16, 128, False), "w4a16g128"), ((4, 16, 64, False), "w4a16g64"), ((3, 16, None, False), "w3a16"),
    ((4, 4, None, False), "w4a4"), ((16, 16, None, False), "fp16"), ((4, 16, None, True), "w4a16sym"),
    ((16, 4, None, False), "w16a4"), ((4, 16, 7, True), "w4a16g7sym"),
])
def test_the_name_comes_from_the_values_and_parses_back(values, name):
    setting = QuantSetting(*values)
    assert setting.name == name
    assert QuantSetting.parse(name) == setting or name == "fp16"
    assert QuantSetting.from_record(setting.record()) == setting


def test_every_quant_conf_file_is_named_after_its_values():
    for path in sorted((CONF / "quant").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        assert QuantSetting.from_cfg(values).name == values["name"] == path.stem, path


def test_bench_variant_names_are_the_benchmarks():
    from omniquant import bench, llamacpp

    assert set(schema.BENCH_VARIANTS) == set(bench.VARIANTS) - set(llamacpp.VARIANTS)

"""MLC artifacts (omniquant.mlc.artifacts) and the TVM build (omniquant.mlc.tvm_decoder) of Llama and Gemma 3."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from omniquant import methods
from omniquant.errors import UserError
from omniquant.export import quantized_model
from omniquant.mlc import build_tvm, validate_mlc_chat_config, write_mlc_artifacts
from omniquant.mlc.artifacts import CONFIG_FILE
from omniquant.models.tiny import tiny_llama, tiny_model
from omniquant.packed import load_packed_model
from omniquant.packing import save_packed
from omniquant.setting import QuantSetting

GOLDEN = Path(__file__).parent / "mlc-chat-config.golden.json"
TVM_TOLERANCE = 1e-4  # float32 logits of magnitude ~1; measured ~3e-7


def rtn(setting: QuantSetting, **tiny_kwargs):
    """A tiny Llama fake-quantized by RTN, its tokenizer and qparams."""
    model, tok = tiny_llama(**tiny_kwargs)
    return model, tok, methods.quantize(model, setting, "rtn")[1].qparams


def artifacts(tmp_path: Path, setting: QuantSetting):
    model, tok, qparams = rtn(setting, hidden_size=128, intermediate_size=256)
    manifest = write_mlc_artifacts(quantized_model(model, setting, qparams, tok), tmp_path)
    return model, manifest, json.loads((tmp_path / CONFIG_FILE).read_text())


W4G128 = QuantSetting(4, 16, 128)
W3G128 = QuantSetting(3, 16, 128)


def test_awq_route_matches_the_golden_config(tmp_path):
    _, manifest, config = artifacts(tmp_path, W4G128)
    assert config == json.loads(GOLDEN.read_text())
    validate_mlc_chat_config(config)
    assert manifest["route"] == "awq" and "--source-format awq" in manifest["commands"][0]
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["quantization_config"]["quant_method"] == "awq"
    assert all((tmp_path / f).is_file() for f in config["tokenizer_files"])


def test_fake_quant_route_writes_the_fp16_grid(tmp_path):
    model, manifest, config = artifacts(tmp_path, W3G128)
    validate_mlc_chat_config(config)
    assert manifest["route"] == "fake-quant-fp16" and config["quantization"] == "w3a16g128asym"
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert saved.dtype == torch.float16
    path = "model.layers.1.mlp.down_proj"
    assert torch.equal(saved.get_submodule(path).weight, model.get_submodule(path).weight.half())


def test_gemma3_artifacts_take_the_fake_quant_route_with_mlc_s_gemma3_config(tmp_path):
    """MLC reads AWQ checkpoints for Llama only: a Gemma 3 W4A16g128 cell gets the float16 grid."""
    model, tok = tiny_model("gemma3_text", hidden_size=128, intermediate_size=256, head_dim=32)
    qparams = methods.quantize(model, W4G128, "rtn")[1].qparams
    manifest = write_mlc_artifacts(quantized_model(model, W4G128, qparams, tok), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    validate_mlc_chat_config(config)
    assert manifest["route"] == "fake-quant-fp16" and config["quantization"] == "w4a16g128asym"
    assert config["model_type"] == "gemma3_text" and config["model_config"]["is_text_model"]
    text = config["model_config"]["text_config"]
    assert (text["head_dim"], text["query_pre_attn_scalar"], text["sliding_window_size"]) == (32, 16, 8)
    assert text["hidden_activation"] == "gelu_pytorch_tanh" and config["sliding_window_size"] == 8
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    path = "model.layers.0.self_attn.o_proj"
    assert torch.equal(saved.get_submodule(path).weight, model.get_submodule(path).weight.half())
    broken = copy.deepcopy(config)
    broken["model_config"]["text_config"]["head_dim"] = "32"
    with pytest.raises(ValueError, match="model_config.text_config.head_dim: str"):
        validate_mlc_chat_config(broken)


@pytest.mark.parametrize("break_it, message", [
    (lambda c: c.pop("context_window_size"), "missing 'context_window_size'"),
    (lambda c: c.update(vocab_size=True), "config.vocab_size: bool"),
    (lambda c: c["model_config"].update(head_dim="32"), "model_config.head_dim: str"),
    (lambda c: c["conv_template"].update(seps=[]), "one or two separators"),
    (lambda c: c.update(model_type="opt"), "'opt' is not one of llama, gemma3_text"),
])
def test_schema_rejects_broken_configs(break_it, message):
    config = copy.deepcopy(json.loads(GOLDEN.read_text()))
    break_it(config)
    with pytest.raises(ValueError, match=message):
        validate_mlc_chat_config(config)


def test_weight_activation_setting_is_rejected(tmp_path):
    setting = QuantSetting(4, 8, 128)
    model, tok, qparams = rtn(setting)
    with pytest.raises(UserError, match="MLC-LLM runs weight-only"):
        write_mlc_artifacts(quantized_model(model, setting, qparams, tok), tmp_path)


# ------------------------------------------------------------------------------------------ TVM
@pytest.fixture(scope="module")
def tvm_builds(tmp_path_factory):
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install apache-tvm==0.27.0.post1)")
    out = tmp_path_factory.mktemp("tvm")
    reports = {}
    for setting, kv_heads in ((QuantSetting(4, 16, 64), 2), (W3G128, 4)):  # GQA, MHA
        model, _, qparams = rtn(setting, num_key_value_heads=kv_heads)
        packed = save_packed(out / f"{setting.name}.safetensors", model, qparams, setting.weight_spec)
        reports[setting.name] = build_tvm(packed, out)
    return reports


@pytest.mark.parametrize("name", ["w4a16g64", "w3a16g128"])
def test_tvm_logits_match_the_packed_model(tvm_builds, name):
    report = tvm_builds[name]
    assert report["status"] == "ok" and Path(report["library"]).suffix == ".so"
    assert report["prefill_max_abs_err"] < TVM_TOLERANCE
    assert report["decode_max_abs_err"] < TVM_TOLERANCE  # prefill, then the KV cache one token at a time
    assert report["logits_max_abs"] > 0.1  # the comparison is not between near-zero logits


@pytest.mark.parametrize("embedding_bits", [None, 8], ids=["float-embeddings", "8-bit-embeddings"])
def test_tvm_build_of_gemma3_matches_the_packed_model(tmp_path, embedding_bits):
    """Gemma 3's (1 + w) norms before and after attention and MLP, qk-norm, GeGLU, √hidden embedding
    factor, and sliding-window layers with their own rotary table: 24 positions against a window of 8,
    the last 12 decoded one at a time through the KV cache."""
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install apache-tvm==0.27.0.post1)")
    setting = QuantSetting(4, 16, 64)
    model, _ = tiny_model("gemma3_text")
    assert model.config.sliding_window == 8 and "sliding_attention" in model.config.layer_types
    qparams = methods.quantize(model, setting, "rtn")[1].qparams
    packed = save_packed(tmp_path / "gemma3.safetensors", model, qparams, setting.weight_spec, embedding_bits)
    report = build_tvm(packed, tmp_path, seq=24, decode_tokens=12)
    assert report["status"] == "ok" and Path(report["library"]).name.startswith("gemma3_text-")
    assert report["prefill_max_abs_err"] < TVM_TOLERANCE and report["decode_max_abs_err"] < TVM_TOLERANCE
    assert report["logits_max_abs"] > 0.1


def test_tvm_build_refuses_families_it_cannot_run(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install apache-tvm==0.27.0.post1)")
    from omniquant.mlc.tvm_decoder import compile_tvm

    setting = QuantSetting(4, 16, 64)
    model, _ = tiny_model("opt")
    qparams = methods.quantize(model, setting, "rtn")[1].qparams
    packed = load_packed_model(save_packed(tmp_path / "opt.safetensors", model, qparams, setting.weight_spec))
    with pytest.raises(UserError, match="the TVM build runs families with separate q/k/v/o"):
        compile_tvm(packed, tmp_path)


@pytest.mark.parametrize("out_features, scheduled", [(64, True), (40, False)])
def test_cpu_schedule_tiles_linears_whose_outputs_fill_vectors(out_features, scheduled):
    tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed")
    from tvm import relax
    from tvm.relax.frontend import nn

    from omniquant.mlc.schedule import schedule_linears
    from omniquant.mlc.tvm_decoder import QuantLinear

    module = QuantLinear(200, out_features, W3G128.weight_spec)
    mod, _ = module.export_tvm(spec={"forward": {"x": nn.spec.Tensor(["m", 200], "float32")}})
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), schedule_linears(lanes=16)])(mod)
    [func] = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    script = func.script()
    assert bool(func.attrs and func.attrs.get("tirx.is_scheduled")) == scheduled
    assert ("T.parallel" in script and "T.vectorized" in script) == scheduled


def test_tvm_build_of_8_bit_embeddings_matches_the_packed_model(tmp_path):
    pytest.importorskip("tvm", reason="apache-tvm is not installed (pip install apache-tvm==0.27.0.post1)")
    setting = QuantSetting(4, 16, 64)
    model, _, qparams = rtn(setting, num_key_value_heads=2)
    packed = save_packed(tmp_path / "int8.safetensors", model, qparams, setting.weight_spec, embedding_bits=8)
    report = build_tvm(packed, tmp_path)
    assert report["status"] == "ok"
    assert report["prefill_max_abs_err"] < TVM_TOLERANCE and report["decode_max_abs_err"] < TVM_TOLERANCE
    assert report["logits_max_abs"] > 0.1

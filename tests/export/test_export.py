"""Exports (omniquant.export): round trips through each format's own reader, and clear errors."""
from __future__ import annotations

import json

import gguf as gguf_lib
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from omniquant import methods
from omniquant.errors import UserError
from omniquant.export import awq, export, gguf, load_quantized, quantized_model
from omniquant.export.common import QPARAMS_FILE, pack_int32, staged, unpack_int32
from omniquant.models.tiny import tiny_llama
from omniquant.quantizer import quantize_weight
from omniquant.setting import QuantSetting

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def setting(name: str) -> QuantSetting:
    """``w4a16g128``-style names; ``gNone`` is per-channel."""
    w, rest = name[1:].split("a")
    a, _, g = rest.partition("g")
    return QuantSetting(int(w), int(a), None if g in ("", "None") else int(g))


def rtn_model(name: str, **tiny_kwargs):
    """A tiny Llama fake-quantized by RTN, its tokenizer and qparams."""
    model, tok = tiny_llama(**tiny_kwargs)
    result = methods.quantize(model, setting(name), "rtn")[1]
    return model, tok, result.qparams


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ------------------------------------------------------------------------------------------ common
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_matches_compressed_tensors(bits):
    codes = torch.randint(0, 2**bits, (5, 77), generator=torch.Generator().manual_seed(bits))
    packed = pack_int32(codes, bits)
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(packed, pack_to_int32(signed, bits))
    assert torch.equal(unpack_int32(packed, bits, 77), codes.to(torch.uint8))


def test_codes_are_recovered_exactly_and_off_grid_weights_rejected():
    model, tok = tiny_llama()
    path, spec = "model.layers.1.mlp.down_proj", setting("w3a16g32").weight_spec
    codes, scales, zeros = quantize_weight(model.get_submodule(path).weight, spec)  # RTN's integers
    qparams = methods.quantize(model, setting("w3a16g32"), "rtn")[1].qparams
    linear = quantized_model(model, setting("w3a16g32"), qparams, tok).linears[path]
    assert torch.equal(linear.codes, codes) and torch.equal(linear.zeros, zeros.int())
    assert torch.equal(linear.scales, scales)
    with torch.no_grad():
        model.get_submodule(path).weight[0, 0] += 1e-3
    with pytest.raises(UserError, match="down_proj: the weight does not lie on the int3-asym-g32 grid"):
        quantized_model(model, setting("w3a16g32"), qparams, tok)


# ------------------------------------------------------------------------------------------ compressed-tensors
@pytest.mark.parametrize("name", ["w4a16g128", "w3a16g128", "w2a16g128", "w3a16gNone"])
def test_compressed_tensors_round_trip_through_transformers(tmp_path, name):
    model, tok, qparams = rtn_model(name, hidden_size=128, intermediate_size=256)
    model.save_pretrained(tmp_path / "quantized")  # as the quantize stage leaves it
    tok.save_pretrained(tmp_path / "quantized")
    save_file({f"{k}.{kind}": t for k, d in qparams.items() for kind, t in d.items()},
              str(tmp_path / "quantized" / QPARAMS_FILE))
    out = export(load_quantized(tmp_path / "quantized", setting(name)), "compressed-tensors", tmp_path / "ct")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(config)
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight_packed"].dtype == torch.int32
    # transformers 5.23 + compressed-tensors 0.20 load asymmetric pack-quantized only with dequantize=True
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    for key, weight in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], weight), key
    torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=0, atol=1e-6)


def test_compressed_tensors_rejects_what_it_cannot_represent(tmp_path):
    model, tok, qparams = rtn_model("w4a4gNone")
    with pytest.raises(UserError, match="per-\\(token, head\\)"):
        export(quantized_model(model, setting("w4a4gNone"), qparams), "compressed-tensors", tmp_path)
    model, tok, qparams = rtn_model("w4a16g128")  # hidden_size 64: one partial group
    with pytest.raises(UserError, match="w4a16g128.*q_proj has 64 input features.*group_size=128"):
        export(quantized_model(model, setting("w4a16g128"), qparams), "compressed-tensors", tmp_path)
    model, _ = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3].abs_().add_(0.1)  # one row, all positive: zero point < 0
    qparams = methods.quantize(model, setting("w4a16gNone"), "rtn")[1].qparams
    with pytest.raises(UserError, match="self_attn.q_proj has zero points in \\[-"):
        export(quantized_model(model, setting("w4a16gNone"), qparams), "compressed-tensors", tmp_path)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ AWQ
def test_awq_round_trip_through_own_reader(tmp_path):
    model, tok, qparams = rtn_model("w4a16g128", hidden_size=128, intermediate_size=256)
    qm = quantized_model(model, setting("w4a16g128"), qparams, tok)
    out = export(qm, "awq", tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128,
                                             "zero_point": True, "modules_to_not_convert": ["lm_head"]}
    tensors = load_file(str(out / "model.safetensors"))
    restored, _ = tiny_llama(hidden_size=128, intermediate_size=256)
    state = {k: t.float() for k, t in tensors.items() if not k.endswith(("qweight", "qzeros", "scales"))}
    for path, linear in qm.linears.items():
        qweight, qzeros, scales = (tensors[f"{path}.{k}"] for k in ("qweight", "qzeros", "scales"))
        assert qweight.shape == (linear.codes.shape[1], linear.codes.shape[0] // 8) and scales.dtype == torch.float16
        codes, zeros, fp16_scales = awq.unpack(qweight, qzeros, scales)
        assert torch.equal(codes, linear.codes) and torch.equal(zeros, linear.zeros)
        assert torch.equal(fp16_scales, linear.scales.half())
        state[f"{path}.weight"] = awq.dequantize(qweight, qzeros, scales)
    restored.load_state_dict(state)
    torch.testing.assert_close(logits(restored), logits(model), rtol=0, atol=2e-3)


def test_awq_nibble_order():
    """Output channels 0..7 of one input land in one word as AutoAWQ packs them: nibble k holds channel ORDER[k]."""
    qweight, qzeros = awq.pack(torch.arange(8, dtype=torch.uint8)[:, None], torch.zeros(8, 1, dtype=torch.int32))
    assert qweight.item() == 0x75316420 and qzeros.item() == 0


# ------------------------------------------------------------------------------------------ GGUF
def test_gguf_q4_1_round_trip(tmp_path):
    model, tok, qparams = rtn_model("w4a16g32", num_key_value_heads=2)
    qm = quantized_model(model, setting("w4a16g32"), qparams, tok)
    path = export(qm, "gguf", tmp_path)
    reader = gguf_lib.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["!", '"', "#"]
    tensors = {t.name: t for t in reader.tensors}
    names = gguf_lib.get_tensor_name_map(gguf_lib.MODEL_ARCH.LLAMA, 2)
    heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 2}
    worst = 0.0
    for module, linear in qm.linears.items():
        t = tensors[names.get_name(f"{module}.weight", try_suffixes=(".weight",))]
        assert t.tensor_type == gguf_lib.GGMLQuantizationType.Q4_1
        w = torch.from_numpy(gguf_lib.quants.dequantize(t.data, t.tensor_type))
        n = heads.get(module.split(".", 3)[3])
        if n:  # undo llama.cpp's rotary row order
            w = w[torch.argsort(gguf.rope_rows(w.shape[0], n))]
        idx = torch.arange(w.shape[1]) // 32
        s, z = linear.scales[:, idx], linear.zeros[:, idx]
        bound = (linear.codes * s + (z * s).abs()) * 2.0**-11 + 2.0**-24  # half an fp16 ulp of d·q and of m
        error = (w - model.get_submodule(module).weight).abs()
        assert (error <= bound).all(), module
        worst = max(worst, (error / s).max().item())
    assert 0 < worst < 0.02  # measured ≈0.009 of a step: fp16 d and m, not bit-exact
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    torch.testing.assert_close(logits(loaded.eval()), logits(model), rtol=0, atol=2e-3)


@pytest.mark.parametrize("fmt,name", [("awq", "w3a16g128"), ("awq", "w4a16g64"), ("awq", "w4a4g128"),
                                      ("gguf", "w4a16g128"), ("gguf", "w3a16g32"), ("gguf", "w4a4g32")])
def test_awq_and_gguf_reject_other_settings(tmp_path, fmt, name):
    model, tok, qparams = rtn_model(name, hidden_size=128, intermediate_size=256)
    with pytest.raises(UserError, match=f"{fmt} export cannot represent setting {name}"):
        export(quantized_model(model, setting(name), qparams), fmt, tmp_path)


def test_unknown_format_is_a_user_error(tmp_path):
    model, tok, qparams = rtn_model("w4a16g32")
    with pytest.raises(UserError, match="unknown; available: compressed-tensors, awq, gguf"):
        export(quantized_model(model, setting("w4a16g32"), qparams), "exl2", tmp_path)


def test_staged_folders_replace_the_output_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with staged(out, ".partial-1") as staging:
            (staging / "half").write_text("written")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old"]
    with staged(out, ".partial-1") as staging:
        (staging / "new").write_text("complete")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["new"]

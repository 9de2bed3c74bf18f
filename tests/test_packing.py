"""Bit packing (omniquant.packing) and models rebuilt from packed files (omniquant.packed)."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaForCausalLM

from omniquant.arch import adapter_of
from omniquant.block import merge_qparams
from omniquant.models.tiny import tiny_llama, tiny_model
from omniquant.packed import Int8Embedding, Int8Linear, PackedLinear, bits_per_weight, byte_counts, load_packed_model
from omniquant.packing import (
    codes_from_weight,
    int8_rows,
    load_packed,
    pack_codes,
    pack_weight,
    read_qparams,
    save_packed,
    unpack_codes,
)
from omniquant.quantizer import QuantSpec, dequantize_weight, fake_quantize, quantize_weight


def fake_quantize_model(model: nn.Module, spec: QuantSpec) -> dict[str, dict[str, torch.Tensor]]:
    """Fake-quantize every quantized block weight in place (RTN); returns the qparams the pipeline would save."""
    adapter = adapter_of(model)
    qparams = {}
    with torch.no_grad():
        for i, layer in enumerate(adapter.decoder_layers(model)):
            layout = adapter.layout(layer, model.config)
            per_role = {}
            for role, view in layout.quantized.items():
                w = view.weight(layer)
                codes, scales, zeros = quantize_weight(w, spec)
                w.copy_(dequantize_weight(codes, scales, zeros, spec.group_size))
                per_role[role] = (scales, zeros)
            qparams |= {f"{adapter.layers}.{i}.{key}": d for key, d in merge_qparams(layout, per_role).items()}
    return qparams


def token_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("length", [1, 32, 45, 96])
def test_unpack_inverts_pack(bits, length):
    gen = torch.Generator().manual_seed(100 * bits + length)
    codes = torch.randint(0, 2**bits, (3, length), generator=gen).to(torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, -(-length // 32) * bits)
    assert torch.equal(unpack_codes(words, bits, length), codes)


def test_documented_bit_positions():
    assert pack_codes(torch.arange(8), 4).tolist() == [0x76543210, 0, 0, 0]
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[0], codes[17], codes[31] = 0b111, 0b101, 0b100
    low_0_15, low_16_31, high = pack_codes(codes, 3).tolist()  # 3-bit: 32 codes in 3 words
    assert (low_0_15, low_16_31) == (0b11, 0b01 << 2)
    assert high % 2**32 == 1 | 1 << 17 | 1 << 31


def test_out_of_range_codes_and_zeros_raise():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\]"):
        pack_codes(torch.tensor([8]), 3)
    spec = QuantSpec(4, 32)
    codes, scales, zeros = quantize_weight(torch.rand(2, 32) + 1, spec)  # all-positive group: zero point < 0
    assert zeros.min() < 0
    with pytest.raises(ValueError, match=r"zero points must lie in \[0, 15\]"):
        pack_weight(codes, scales, zeros, spec)
    codes, scales, zeros = quantize_weight(torch.randn(2, 32), spec)
    with pytest.raises(ValueError, match="zero points"):
        pack_weight(codes, scales, zeros + 16, spec)


def test_weight_off_its_grid_is_rejected():
    spec = QuantSpec(3, 32)
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    _, scales, zeros = quantize_weight(w, spec)
    with pytest.raises(ValueError, match="does not lie on the int3-asym-g32 grid"):
        codes_from_weight(w, scales, zeros, spec)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec(2, 128), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(4, None), QuantSpec(8, 32),
     QuantSpec(3, 64, symmetric=True), QuantSpec(4, 128, symmetric=True)],
    ids=lambda s: s.tag,
)
def test_dequantized_packed_weight_is_the_fake_quantized_weight(spec):
    w = torch.randn(24, 160, generator=torch.Generator().manual_seed(spec.bits))  # 160: short last group
    codes, scales, zeros = quantize_weight(w, spec)
    packed = pack_weight(codes, scales, zeros, spec)
    assert torch.equal(packed.codes(), codes) and torch.equal(packed.zeros(), zeros)
    fq = fake_quantize(w, spec)
    assert torch.equal(packed.dequantize(), fq)
    for dtype in (torch.float32, torch.float16):  # bf16's 8-bit mantissa cannot hold an 8-bit grid
        assert torch.equal(codes_from_weight(fq.to(dtype), scales, zeros, spec), codes)
    groups = scales.shape[1]
    words = 24 * 5 * spec.bits + -(-24 * groups // 32) * spec.bits  # codes + zero points, int32 each
    assert packed.nbytes == 4 * words + 4 * 24 * groups
    assert packed.bits_per_weight == 8 * packed.nbytes / (24 * 160)


@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(3, 64), QuantSpec(2, 128), QuantSpec(4, None)],
                         ids=lambda s: s.tag)
def test_packed_model_matches_fake_quantized_model(tmp_path, tiny, spec):
    model, _ = tiny
    qparams = fake_quantize_model(model, spec)
    packed = load_packed_model(save_packed(tmp_path / "packed.safetensors", model, qparams, spec))
    adapter = adapter_of(packed)
    layers = [layer.get_submodule(module) for layer in adapter.decoder_layers(packed)
              for module in dict.fromkeys(v.module for v in adapter.layout(layer, packed.config).quantized.values())]
    assert len(layers) == 7 * packed.config.num_hidden_layers and len(qparams) == len(layers)
    assert all(isinstance(lin, PackedLinear) and not hasattr(lin, "weight") for lin in layers)
    ids = token_ids(model.config.vocab_size)
    with torch.no_grad():
        expected, got = model(ids).logits, packed(ids).logits
    if any(lin.int4_cpu for lin in layers):  # torch's int4 kernel: same weights, other float rounding
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    else:  # dequantize + F.linear: the fake-quantized model's arithmetic exactly
        assert torch.equal(got, expected)


def test_packed_file_is_much_smaller_than_fp32(tmp_path):
    fp32 = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_llama()[0].state_dict().items()}, str(fp32))
    sizes = {}
    for bits in (4, 3, 2):
        model, _ = tiny_llama()
        spec = QuantSpec(bits, 64)
        path = save_packed(tmp_path / f"w{bits}.safetensors", model, fake_quantize_model(model, spec), spec)
        sizes[bits] = path.stat().st_size
        packed = load_packed_model(path)
        assert bits < bits_per_weight(packed) < bits + 0.6  # fp32 scale: 32/64, zero point: bits/64 (+ padding)
        counts = byte_counts(packed)
        assert counts["total"] == counts["packed_linears"] + counts["other"] < sizes[bits]
    # fp32 embeddings and lm_head (a quarter of the tiny model's fp32 bytes) are kept as they are
    assert sizes[2] < sizes[3] < sizes[4] < 0.4 * fp32.stat().st_size


def test_tied_embeddings_are_stored_once(tmp_path):
    config = copy.deepcopy(tiny_llama()[0].config)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    spec = QuantSpec(3, 32)
    path = save_packed(tmp_path / "tied.safetensors", model, fake_quantize_model(model, spec), spec)
    tensors, header = load_packed(path)
    assert header["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head.weight" not in tensors
    ids = token_ids(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(load_packed_model(path)(ids).logits, model(ids).logits)


def _with_int8_embeddings(model: nn.Module) -> nn.Module:
    """The model with its embedding and LM head weights replaced by their 8-bit rows ``q·s``."""
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            q, s = int8_rows(module.weight)
            module.weight.copy_(q.float() * s[:, None])
    return model


def test_int8_rows_round_to_the_nearest_step():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    q, s = int8_rows(w)
    assert q.dtype == torch.int8 and s.shape == (64,) and q.abs().max() == 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_8_bit_embeddings(tmp_path, tied):
    config = copy.deepcopy(tiny_llama()[0].config)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    spec = QuantSpec(4, 64)
    qparams = fake_quantize_model(model, spec)
    plain = save_packed(tmp_path / "plain.safetensors", model, qparams, spec)
    path = save_packed(tmp_path / "int8.safetensors", model, qparams, spec, embedding_bits=8)
    tensors, header = load_packed(path)
    stored = "model.embed_tokens" if tied else "lm_head"
    assert header["int8"] == {"model.embed_tokens": "model.embed_tokens", "lm_head": stored}
    assert not any(k.endswith("embed_tokens.weight") or k == "lm_head.weight" for k in tensors)
    assert ("lm_head.int8_weight" in tensors) == (not tied)
    assert path.stat().st_size < plain.stat().st_size
    packed = load_packed_model(path)
    assert isinstance(packed.get_input_embeddings(), Int8Embedding)
    assert type(packed.get_output_embeddings()) is Int8Linear
    reference = _with_int8_embeddings(model)
    ids = token_ids(config.vocab_size)  # 32 rows: the dequantizing paths, the reference's arithmetic exactly
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, reference(ids).logits)
        one = ids[:1, :1]  # a decoding row: the int8 kernel for the head
        torch.testing.assert_close(packed(one).logits, reference(one).logits, rtol=1e-5, atol=1e-5)


def test_8_bit_embeddings_keep_a_scaled_embedding_s_factor(tmp_path):
    model, _ = tiny_model("gemma3_text")  # Gemma 3 multiplies the looked-up rows by √hidden
    factor = float(model.get_input_embeddings().embed_scale)
    assert factor == model.config.hidden_size ** 0.5
    spec = QuantSpec(4, 64)
    path = save_packed(tmp_path / "int8.safetensors", model, fake_quantize_model(model, spec), spec, embedding_bits=8)
    assert load_packed(path)[1]["embed_scale"] == {"model.embed_tokens": factor}
    packed = load_packed_model(path)
    assert packed.get_input_embeddings().embed_scale == factor
    reference = _with_int8_embeddings(model)
    ids = token_ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def test_embedding_bits_must_be_8():
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="embedding_bits must be one of"):
        save_packed("unused.safetensors", model, {}, QuantSpec(4, 64), embedding_bits=4)


def test_load_rejects_other_safetensors_files(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not an omniquant-packed v1 file"):
        load_packed(path)


def test_read_qparams_inverts_the_pipeline_layout(tmp_path):
    scales, zeros = torch.rand(4, 2), torch.ones(4, 2)
    save_file({"model.layers.0.mlp.up_proj.scales": scales, "model.layers.0.mlp.up_proj.zeros": zeros},
              str(tmp_path / "qparams.safetensors"))
    qparams = read_qparams(tmp_path / "qparams.safetensors")
    assert list(qparams) == ["model.layers.0.mlp.up_proj"]
    assert torch.equal(qparams["model.layers.0.mlp.up_proj"]["scales"], scales)

"""The CPU kernels of omniquant.kernels.cpu (built on first use) and PackedLinear's CPU dispatch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from omniquant.kernels import cpu
from omniquant.packed import CPU_MATMUL_MAX_ROWS, PackedLinear
from omniquant.packing import PackedWeight, pack_weight
from omniquant.quantizer import QuantSpec, quantize_weight

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")

# 576 inputs: SmolLM2's hidden size; with groups of 128 its last group is short (64 codes)
LAYOUTS = [QuantSpec(4, 128), QuantSpec(3, 128), QuantSpec(2, 64), QuantSpec(4, 32), QuantSpec(3, None),
           QuantSpec(2, 64, symmetric=True), QuantSpec(5, 64), QuantSpec(7, 32)]


def packed(spec: QuantSpec, out: int = 40, cols: int = 576) -> PackedWeight:
    gen = torch.Generator().manual_seed(spec.bits * 1000 + (spec.group_size or 0))
    return pack_weight(*quantize_weight(torch.randn(out, cols, generator=gen), spec), spec)


def rows_of(n: int, cols: int = 576) -> torch.Tensor:
    return torch.randn(n, cols, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: s.tag)
def test_dequantize_is_bit_identical_to_the_reference(spec):
    weight = packed(spec)
    assert torch.equal(cpu.dequantize(weight), weight.dequantize())


@pytest.mark.parametrize("spec", LAYOUTS, ids=lambda s: s.tag)
def test_matmul_matches_the_dequantized_weight(spec):
    weight = packed(spec)
    zs = cpu.zero_scales(weight)
    reference = weight.dequantize().double()
    for n in (1, 2, 3, 7):  # the 4-, 2- and 1-row passes and their mixes
        x = rows_of(n)
        expected = x.double() @ reference.T
        got = cpu.matmul(x, weight, zs)
        assert got.shape == (n, weight.out_features) and got.dtype == torch.float32
        # float32 accumulation of 576 terms: a few ulps of the largest partial sums
        assert (got.double() - expected).abs().max() <= 1e-5 * (x.double().abs() @ reference.abs().T).max()


def test_matmul_keeps_leading_dimensions():
    weight = packed(QuantSpec(4, 128))
    x = rows_of(6).reshape(2, 3, 576)
    y = cpu.matmul(x, weight, cpu.zero_scales(weight))
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, F.linear(x, weight.dequantize()), rtol=1e-5, atol=1e-4)


def test_int8_matmul_matches_the_scaled_weight():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (300, 64), generator=gen, dtype=torch.int8)
    scales = torch.rand(300, generator=gen)
    x = rows_of(5, 64)
    expected = x.double() @ (q.double() * scales.double()[:, None]).T
    assert (cpu.int8_matmul(x, q, scales).double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_supported_layouts():
    assert cpu.supports(packed(QuantSpec(3, 128)))
    assert not cpu.supports(packed(QuantSpec(4, 16)))  # groups must cover whole 32-code blocks
    assert not cpu.supports(packed(QuantSpec(4, None), cols=200))  # in_features too
    assert not cpu.supports(packed(QuantSpec(8, 128)))  # codes of 1 to 7 bits


def test_a_cpu_without_avx2_is_named_as_the_reason(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("flags : fpu sse2\n")
    monkeypatch.setattr(cpu, "CPUINFO", info)
    cpu._build.cache_clear()
    try:
        assert "no AVX2/FMA" in cpu.unavailable()
    finally:
        cpu._build.cache_clear()


@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(3, 128), QuantSpec(2, 64)], ids=lambda s: s.tag)
def test_packed_linear_decodes_with_the_fused_kernel_and_prefills_bit_exactly(spec):
    layer = PackedLinear(packed(spec), bias=torch.randn(40))
    decode, prefill = rows_of(CPU_MATMUL_MAX_ROWS), rows_of(CPU_MATMUL_MAX_ROWS + 1)
    assert layer.path(decode) == "cpu_matmul" and layer.path(prefill) == "cpu_dequantize"
    torch.testing.assert_close(layer(decode), F.linear(decode, layer.dequantized_weight(), layer.bias),
                               rtol=1e-5, atol=1e-4)
    # prefill and perplexity: the kernels' dequantization, so the fake-quantized arithmetic exactly
    assert torch.equal(layer(prefill), F.linear(prefill, layer.dequantized_weight(), layer.bias))


def test_decode_helpers_match_the_torch_ops():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 64, generator=gen), torch.rand(64, generator=gen) + 0.5
    reference = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(cpu.rms_norm(x, w, 1e-6), reference)
    gate_up = torch.randn(2, 1, 40, generator=gen)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(cpu.glu(gate_up, False), F.silu(gate) * up)
    torch.testing.assert_close(cpu.glu(gate_up, True), F.gelu(gate, approximate="tanh") * up)


@pytest.mark.parametrize("d, pos", [(8, 6), (64, 14), (72, 9)])  # keys 5, 13, 8: whole fours and the rest
def test_attend_rotates_caches_and_attends_like_sdpa(d, pos):
    gen = torch.Generator().manual_seed(6)
    b, heads, kv, max_len = 2, 4, 2, 16
    k_cache, v_cache = torch.randn(b, kv, max_len, d, generator=gen), torch.randn(b, kv, max_len, d, generator=gen)
    qkv = torch.randn(b, (heads + 2 * kv) * d, generator=gen)
    angle = torch.rand(d // 2, generator=gen)
    cos, sin = angle.cos(), angle.sin()
    k0, v0 = k_cache.clone(), v_cache.clone()
    out = cpu.attend(qkv, cos, sin, k_cache, v_cache, pos, 2, d ** -0.5, heads)

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1)

    q, k, v = qkv.view(b, heads + 2 * kv, d).split((heads, kv, kv), dim=1)
    k0[:, :, pos], v0[:, :, pos] = rotate(k), v
    torch.testing.assert_close(k_cache, k0)  # the new position written, rotated; the others untouched
    torch.testing.assert_close(v_cache, v0)
    expected = F.scaled_dot_product_attention(rotate(q)[:, :, None], k0[:, :, 2:pos + 1], v0[:, :, 2:pos + 1],
                                              scale=d ** -0.5, enable_gqa=True)
    torch.testing.assert_close(out, expected.reshape(b, heads * d), rtol=1e-5, atol=1e-5)


def test_decode_helpers_keep_nan_and_saturate_exp():
    gate_up = torch.tensor([[float("nan"), 200.0, -200.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    silu = cpu.glu(gate_up, False)[0]
    assert silu[0].isnan() and silu[1] == 200.0 and -1e-30 < silu[2] < 0 and silu[3] == 0.0  # e^x clamped, finite
    qkv = torch.zeros(1, 3 * 8)
    qkv[0, 0] = float("nan")
    k_cache, v_cache = torch.zeros(1, 1, 4, 8), torch.ones(1, 1, 4, 8)
    out = cpu.attend(qkv, torch.ones(4), torch.zeros(4), k_cache, v_cache, 2, 0, 1.0, 1)
    assert out.isnan().all()  # a NaN query poisons its head instead of being dropped by the softmax's max

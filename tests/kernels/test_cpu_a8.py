"""The int8-activation kernels, on every path this CPU runs (AVX-512 VNNI, AVX2), against the rounded input
times the dequantized weight."""
from __future__ import annotations

import pytest
import torch

from omniquant.kernels import cpu
from omniquant.packing import int8_rows, pack_weight
from omniquant.quantizer import QuantSpec

from test_cpu_kernels import LAYOUTS, packed, rows_of

pytestmark = pytest.mark.skipif(cpu.unavailable() is not None, reason=f"CPU kernels: {cpu.unavailable()}")
ISAS = cpu.a8_isas() if cpu.unavailable() is None else ()


def test_round_activations_is_int8_per_block_of_32():
    x = rows_of(3, 96)
    x[0, :32] = 0  # an all-zero block stays zero
    r = cpu.round_activations(x)
    blocks, rounded = x.reshape(3, 3, 32), r.reshape(3, 3, 32)
    a = blocks.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(a > 0, rounded / torch.where(a > 0, a, 1), 0)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() <= 127
    assert (r - x).abs().max() <= (a / 2 * 1.001).max()
    assert torch.equal(r[0, :32], torch.zeros(32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", [s for s in LAYOUTS if s.bits <= 7], ids=lambda s: s.tag)
@pytest.mark.parametrize("cols", [576, 1536])
def test_matmul_a8_is_the_rounded_input_times_the_weight(spec, cols, isa):
    weight = packed(spec, out=70, cols=cols)
    reference = weight.dequantize().double()
    for n in (1, 3, 9):  # 8 rows of x a pass: 9 takes two
        x = rows_of(n, cols)
        expected = cpu.round_activations(x).double() @ reference.T
        scale = (x.double().abs() @ reference.abs().T).max()
        for layout in (None, cpu.a8_layout(weight)):  # made by the call, and made once by the caller
            got = cpu.matmul_a8(x, weight, layout, isa)
            assert got.shape == (n, 70) and got.dtype == torch.float32
            assert (got.double() - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group, cols", [(32, 576), (64, 576), (256, 1536), (512, 640), (192, 768)])
def test_a8_gives_the_product_at_any_group_size(group, cols, bits, isa):
    weight = packed(QuantSpec(bits, group), out=36, cols=cols)
    x = rows_of(2, cols)
    expected = cpu.round_activations(x).double() @ weight.dequantize().double().T
    scale = (x.double().abs() @ weight.dequantize().double().abs().T).max()
    got = cpu.matmul_a8(x, weight, cpu.a8_layout(weight), isa)
    assert (got.double() - expected).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", [QuantSpec(4, 128), QuantSpec(3, 128), QuantSpec(2, 64)], ids=lambda s: s.tag)
def test_a8_rows_taken_together_give_what_each_row_gives_alone(spec, isa):
    weight = packed(spec, out=70, cols=576)  # tiles of 16 rows; 70 leaves a padded tile
    x = rows_of(2, 576)
    together = cpu.matmul_a8(x, weight, cpu.a8_layout(weight), isa)
    codes, zeros = weight.codes(), weight.zeros()
    for n in range(70):
        row = pack_weight(codes[n:n + 1], weight.scales[n:n + 1], zeros[n:n + 1], spec)
        alone = cpu.matmul_a8(x, row, cpu.a8_layout(row), isa)
        assert torch.equal(together[:, n:n + 1], alone)


@pytest.mark.parametrize("bits", range(1, 8))
def test_a8_fields_hold_each_step_code_once_in_bits_bytes(bits):
    fields = cpu.a8_fields(bits)
    used = torch.zeros(bits, 8, dtype=torch.int64)  # [vec, bit of the byte]
    held = torch.zeros(8, bits, dtype=torch.int64)  # [step, bit of the code]
    for vec, pos, width, step, offset in fields:
        assert 0 <= pos - offset <= 7 and pos + width <= 8  # a field read in place is its bits times 2^(0..7)
        used[vec, pos:pos + width] += 1
        held[step, offset:offset + width] += 1
    assert (used == 1).all() and (held == 1).all()  # 8 codes of `bits` bits fill `bits` bytes, each bit once
    whole = [f for f in fields if f[2] == bits]
    assert len(whole) == min(8, 8 // bits * bits)  # whole codes where they fit
    assert len(fields) == {1: 8, 2: 8, 3: 10, 4: 8}.get(bits, len(fields))  # 3 bits: 10 dot products, planes 16


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7])
def test_a8_layout_puts_a_tile_row_in_each_int32_lane(bits):
    weight = packed(QuantSpec(bits, 64), out=21, cols=192)  # 2 tiles, the second padded; 6 blocks, 3 groups
    a8 = cpu.a8_layout(weight)
    assert a8.codes.shape == (2, 6, 64 * bits) and a8.codes.dtype == torch.uint8  # the codes' size, plus padding
    codes, zs = weight.codes().long(), cpu.zero_scales(weight)
    data = a8.codes.long()
    for n in (0, 7, 16, 20):
        tile, lane = divmod(n, 16)
        for k in (0, 5, 31, 32, 101, 191):
            block, step, j = k // 32, k % 32 // 4, k % 4
            code = 0
            for vec, pos, width, at, offset in cpu.a8_fields(bits):
                if at == step:
                    byte = data[tile, block, 64 * vec + 4 * lane + j]
                    code |= (byte >> pos & (1 << width) - 1) << offset
            assert code == codes[n, k]
        assert torch.equal(a8.scales[tile, :, lane], weight.scales[n])
        assert torch.equal(a8.zero_scales[tile, :, lane], zs[n])
    assert not a8.codes[1, :, :].reshape(6, bits, 16, 4)[:, :, 5:].any() and not a8.scales[1, :, 5:].any()  # padding


def test_a8_paths_are_the_ones_this_cpu_runs_and_refuse_the_others():
    assert ISAS[-1] == "avx2" and cpu.a8_isa() == ISAS[0]  # AVX2 is the kernels' floor; the fastest by default
    weight = packed(QuantSpec(4, 32), out=4, cols=64)
    for other in sorted(set(cpu.A8_ISAS) - set(ISAS)) + ["neon"]:
        with pytest.raises(RuntimeError, match=f"path '{other}' does not run on this CPU"):
            cpu.matmul_a8(rows_of(1, 64), weight, isa=other)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_matmul_a8_is_the_rounded_input_times_the_scaled_rows(isa):
    gen = torch.Generator().manual_seed(0)
    q, scales = int8_rows(torch.randn(300, 608, generator=gen))  # 608 = 9.5 chunks of 64: a short last chunk
    for n in (1, 2):
        x = rows_of(n, 608)
        expected = cpu.round_activations(x).double() @ (q.double() * scales.double()[:, None]).T
        got = cpu.int8_matmul_a8(x, q, scales, isa)
        assert (got.double() - expected).abs().max() <= 1e-5 * (x.double().abs() @ (q.double().abs() * scales[:, None]).T).max()


def test_use_int8_activations_routes_decoding_rows_through_the_int8_kernels(tmp_path):
    from omniquant.bench import random_packed_model
    from omniquant.decode import Decoder
    from omniquant.models.tiny import tiny_llama
    from omniquant.packed import Int8Linear, PackedLinear, load_packed_model, use_int8_activations
    from omniquant.setting import QuantSetting

    made = random_packed_model(tiny_llama()[0].config, QuantSetting(4, 16, 64), tmp_path / "w4.st", embedding_bits=8)
    model = load_packed_model(made["path"])
    reference = load_packed_model(made["path"])
    changed = use_int8_activations(model)
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert changed == len(linears) + 1 and isinstance(model.lm_head, Int8Linear) and model.lm_head.int8_activations
    layer = linears[0]
    x = rows_of(1, layer.in_features)
    assert layer.path(x) == "cpu_matmul_a8" and layer.path(rows_of(64, layer.in_features)) == "cpu_dequantize"
    torch.testing.assert_close(layer(x), cpu.matmul_a8(x, layer.packed))
    ids = torch.randint(0, 258, (1, 6), generator=torch.Generator().manual_seed(0))
    got, want = Decoder(model, 16), Decoder(reference, 16)
    assert got.layers[0].qkv.int8_activations  # the stacked q/k/v keep the setting
    cache_got, cache_want = got.cache(1), want.cache(1)
    got(ids, cache_got), want(ids, cache_want)  # prefill: many rows, the dequantizing path in both
    token = torch.tensor([[5]])
    step_got, step_want = got(token, cache_got), want(token, cache_want)
    assert not torch.equal(step_got, step_want)  # another kernel on rounded activations...
    assert (step_got - step_want).abs().max() <= 0.05 * step_want.std()  # ...close to the float one


def test_use_int8_activations_refuses_without_the_kernels(monkeypatch):
    from omniquant.errors import UserError
    from omniquant.models.tiny import tiny_llama
    from omniquant.packed import use_int8_activations

    monkeypatch.setattr(cpu, "unavailable", lambda: "this CPU has no AVX2/FMA (the CPU kernels are written for them)")
    with pytest.raises(UserError, match=r"^int8 activations need the CPU kernels: this CPU has no AVX2/FMA"):
        use_int8_activations(tiny_llama()[0])

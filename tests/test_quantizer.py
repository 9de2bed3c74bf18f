import pytest
import torch

from omniquant.errors import UserError
from omniquant.quantizer import (
    QuantSpec,
    dequantize_weight,
    fake_quantize,
    quantize_activation,
    quantize_weight,
    to_groups,
)


def test_asymmetric_grid_scale_and_zero_point():
    w = torch.tensor([[-1.0, 0.0, 0.9, 2.0]])
    codes, scales, zeros = quantize_weight(w, QuantSpec(bits=2))
    assert scales.item() == pytest.approx(1.0)  # (2 - (-1)) / 3
    assert zeros.item() == 1  # round(1 / 1)
    assert codes.tolist() == [[0, 1, 2, 3]]  # round(w/s) + z, clamped to [0, 3]


def test_symmetric_grid_uses_constant_offset():
    w = torch.tensor([[-3.0, -1.0, 1.0, 2.0]])
    codes, scales, zeros = quantize_weight(w, QuantSpec(bits=3, symmetric=True))
    assert scales.item() == pytest.approx(1.0)  # max|w| / (2^(3-1)-1) = 3/3
    assert zeros.item() == 3
    assert codes.tolist() == [[0, 2, 4, 5]]
    assert codes.max() <= 6  # 2^N - 1 levels: [0, 2^N - 2]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128])
@pytest.mark.parametrize("symmetric", [False, True])
def test_codes_on_grid_and_dequant_matches_fake_quant(bits, group_size, symmetric):
    torch.manual_seed(bits)
    w = torch.randn(16, 576)  # 576 = 4.5 x 128: padded last group with g128
    spec = QuantSpec(bits, group_size, symmetric)
    codes, scales, zeros = quantize_weight(w, spec)
    assert codes.min() >= 0 and codes.max() <= spec.qmax
    n_groups = 1 if group_size is None else -(-576 // group_size)
    assert scales.shape == zeros.shape == (16, n_groups)
    assert torch.equal(dequantize_weight(codes, scales, zeros, group_size), fake_quantize(w, spec))
    err = (fake_quantize(w, spec) - w).abs()
    # nearest grid point; only range ends can sit a rounded zero point away (<= one step)
    assert err.max() <= scales.max() + 1e-6


def test_padding_repeats_last_element_and_strips():
    w = torch.arange(10, dtype=torch.float32).reshape(1, 10)
    groups, pad = to_groups(w, 4)
    assert pad == 2
    assert groups.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    out = fake_quantize(w, QuantSpec(8, 4))
    assert out.shape == w.shape


@pytest.mark.parametrize("bits,group_size", [(2, 64), (3, 128), (4, 32), (4, None)])
def test_on_grid_weights_round_trip_exactly(bits, group_size):
    torch.manual_seed(0)
    rows, cols = 8, 576
    g = group_size or cols
    n_groups = -(-cols // g)
    qmax = 2**bits - 1
    codes = torch.randint(0, qmax + 1, (rows, cols))
    # each group hits both grid ends, so min/max reproduce the grid
    codes[:, ::g] = 0
    codes[:, 1::g] = qmax
    scales = 2.0 ** torch.randint(-8, -2, (rows, n_groups)).float()  # exact in binary
    zeros = torch.randint(0, qmax + 1, (rows, n_groups)).float()
    w = dequantize_weight(codes, scales, zeros, group_size)
    spec = QuantSpec(bits, group_size)
    assert torch.equal(fake_quantize(w, spec), w)
    got_codes, got_scales, got_zeros = quantize_weight(w, spec)
    assert torch.equal(got_codes, codes.to(torch.uint8))
    assert torch.equal(got_scales, scales) and torch.equal(got_zeros, zeros)


def test_straight_through_gradient():
    w = torch.randn(4, 64, requires_grad=True)
    fake_quantize(w, QuantSpec(3, 32)).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_activation_quantization_is_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * torch.arange(1, 6).reshape(1, 5, 1)  # token scales differ
    xq = quantize_activation(x, QuantSpec(4))
    for b in range(2):
        for t in range(5):
            assert len(torch.unique(xq[b, t])) <= 16  # at most 2^4 levels per token


@pytest.mark.parametrize("bits", [1, 9, 16, 3.5])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(UserError, match="bits"):
        QuantSpec(bits)


@pytest.mark.parametrize("group_size", [0, -128])
def test_non_positive_group_size_rejected(group_size):
    with pytest.raises(UserError, match="group_size"):
        QuantSpec(4, group_size)

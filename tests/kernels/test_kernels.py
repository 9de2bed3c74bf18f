"""Low-bit matmul paths: torch's int4 CPU kernel and the reference path in PackedLinear, and the Triton kernels.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module first imports triton

from omniquant import kernels
from omniquant.packed import PackedLinear
from omniquant.packing import PackedWeight, pack_weight
from omniquant.quantizer import QuantSpec, quantize_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not kernels.available(), reason="triton is not installed (pip install triton; it runs here via TRITON_INTERPRET=1)"
)


def packed_weight(spec: QuantSpec, out: int, cols: int, device: str = "cpu") -> PackedWeight:
    gen = torch.Generator().manual_seed(spec.bits * 1000 + (spec.group_size or 0))
    return pack_weight(*quantize_weight(torch.randn(out, cols, generator=gen).to(device), spec), spec)


def inputs(rows: int, cols: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).to(device, dtype)


@pytest.mark.parametrize("cols", [256, 200], ids=["whole-groups", "short-last-group"])
@pytest.mark.parametrize("spec", [QuantSpec(4, 64), QuantSpec(4, 128), QuantSpec(4, 128, symmetric=True)],
                         ids=lambda s: s.tag)
def test_int4_cpu_path_matches_dequantized_reference(spec, cols):
    layer = PackedLinear(packed_weight(spec, 48, cols), bias=torch.randn(48))
    assert layer.int4_cpu
    x16 = inputs(64, cols, torch.bfloat16)  # bfloat16: any number of rows
    assert layer.path(x16) == "int4"
    expected16 = F.linear(x16.float(), layer.dequantized_weight(), layer.bias)
    bf16_bound = 2**-7 * expected16.abs().max().item()  # bfloat16's 8-bit mantissa, outputs and scales
    torch.testing.assert_close(layer(x16).float(), expected16, rtol=0, atol=2 * bf16_bound)


@pytest.mark.parametrize("spec", [QuantSpec(3, 20), QuantSpec(4, 40)], ids=lambda s: s.tag)
def test_layouts_the_cpu_kernels_do_not_take_use_the_dequantized_reference(spec):
    layer = PackedLinear(packed_weight(spec, 48, 120))  # neither in_features nor the group a multiple of 32
    x = inputs(3, 120)
    assert layer.path(x) == "dequantize"
    assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight()))


def test_kernels_package_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` fails, find_spec returns None
    monkeypatch.delitem(sys.modules, "omniquant.kernels.triton_matmul", raising=False)
    module = importlib.reload(kernels)
    assert not module.available()
    with pytest.raises(ImportError):
        module.quant_matmul(inputs(1, 64), packed_weight(QuantSpec(4, 64), 32, 64))


def test_kernel_rejects_unsupported_groups():
    assert not kernels.supports(packed_weight(QuantSpec(4, None), 32, 64))
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quant_matmul(inputs(1, 48), packed_weight(QuantSpec(4, 48), 32, 48))


@needs_triton
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_triton_kernel_matches_dequantized_reference(bits, group):
    # 200 inputs: a short last group, a partial last word and K tiles past the packed row; 40 outputs: a partial N tile
    weight = packed_weight(QuantSpec(bits, group), 40, 200, DEVICE)
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.float16 else {"rtol": 1e-5, "atol": 1e-4}
    for rows, split_k in ((1, 1), (5, 2), (17, None)):  # decode, small batch (split-K), two M tiles
        x = inputs(rows, 200, dtype, DEVICE)
        expected = F.linear(x, weight.dequantize().to(dtype))
        torch.testing.assert_close(kernels.quant_matmul(x, weight, split_k), expected, **tol)


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it is on CUDA: PackedLinear's dispatch on a machine without a GPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def _record_triton_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Input shapes of every :func:`kernels.quant_matmul` call PackedLinear makes (the real kernel still runs,
    under the Triton interpreter for a :class:`CudaLooking` input)."""
    calls, real = [], kernels.quant_matmul

    def spy(x, weight, split_k=None):
        calls.append(tuple(x.shape))
        return real(x.as_subclass(torch.Tensor), weight, split_k)

    monkeypatch.setattr(kernels, "quant_matmul", spy)
    return calls


@pytest.mark.parametrize("device,rows,spec,importable,uses", [
    ("cpu", 2, QuantSpec(3, 128), True, False),  # CPU inputs never take Triton, even where it imports
    ("cpu", 2, QuantSpec(4, 128), True, False),  # (torch's int4 kernel)
    ("cuda", 2, QuantSpec(3, 128), True, True),
    ("cuda", kernels.MAX_ROWS, QuantSpec(4, 64), True, True),
    ("cuda", kernels.MAX_ROWS + 1, QuantSpec(3, 128), True, False),  # prefill: dequantize + dense matmul
    ("cuda", 2, QuantSpec(4, None), True, False),  # per-channel: the kernel needs groups
    ("cuda", 2, QuantSpec(3, 128), False, False),  # Triton not importable
], ids=lambda v: v.tag if isinstance(v, QuantSpec) else str(v))
def test_packed_linear_uses_triton_exactly_where_it_should(monkeypatch, device, rows, spec, importable, uses):
    """Without a GPU the CUDA cases run on :class:`CudaLooking` CPU inputs (the kernel under the interpreter)."""
    if uses and not kernels.available():
        pytest.skip("triton is not installed")
    calls = _record_triton_calls(monkeypatch)
    if not importable:
        monkeypatch.setattr(kernels, "available", lambda: False)
    on_gpu = device == "cuda" and torch.cuda.is_available()
    dtype = torch.float16 if on_gpu else torch.float32
    layer = PackedLinear(packed_weight(spec, 64, 256)).to(DEVICE if on_gpu else "cpu")
    x = inputs(rows, 256, dtype, DEVICE if on_gpu else "cpu")
    if device == "cuda" and not on_gpu:
        x = x.as_subclass(CudaLooking)
    expected = F.linear(x.as_subclass(torch.Tensor), layer.dequantized_weight(dtype))
    torch.testing.assert_close(layer(x).as_subclass(torch.Tensor), expected, rtol=1e-2, atol=1e-2)
    assert calls == ([(rows, 256)] if uses else [])

"""Low-bit GPU kernels on the packed layout of :mod:`omniquant.packing` (Triton, optional).

Triton is imported only when a kernel runs, so this package imports without it. On a machine
without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set before
the first kernel call) on CPU tensors, which is how they are tested.
"""
from __future__ import annotations

import importlib.util

import torch

from omniquant.packing import PackedWeight

MAX_ROWS = 16  # decode and small batches; larger inputs are faster as dequantize + dense matmul
KERNEL_GROUP_MULTIPLE = 32  # a K tile must lie inside one group and cover whole words


def available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def supports(weight: PackedWeight) -> bool:
    """Whether :func:`quant_matmul` handles this weight (grouped, group a multiple of 32)."""
    g = weight.spec.group_size
    return g is not None and g % KERNEL_GROUP_MULTIPLE == 0


def quant_matmul(x: torch.Tensor, weight: PackedWeight, split_k: int | None = None) -> torch.Tensor:
    """``x @ W.T`` with ``W`` dequantized inside the kernel; ``x [..., in]`` → ``[..., out]`` in x's dtype.

    ``split_k`` splits the reduction over that many programs (default: a heuristic that fills the GPU).
    """
    if not supports(weight):
        raise ValueError(f"the Triton kernel needs a group size that is a multiple of {KERNEL_GROUP_MULTIPLE}, "
                         f"got {weight.spec.tag}")
    from omniquant.kernels.triton_matmul import quant_matmul as run  # lazy: Triton is optional

    return run(x, weight, split_k)

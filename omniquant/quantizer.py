"""Uniform affine quantizer: the one place where the integer grid is defined.

Weights ``W`` have PyTorch ``nn.Linear`` layout ``[out, in]``. Groups run along the input
dimension inside each output row. When ``in % group_size != 0`` the last group of each row is
padded by repeating the row's last element, so the padding never widens the group's range;
padding is stripped after quantization.

Asymmetric grid (OmniQuant §1.2): ``q ∈ [0, 2^N-1]``, ``s = clamp((max-min)/(2^N-1), 1e-5, 1e4)``,
``z = round(clamp(-min/s, -1e4, 1e4))``. Symmetric grid: ``s = max(|max|,|min|)/(2^(N-1)-1)``,
``z = 2^(N-1)-1``. Dequantization is ``(q - z)·s``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from omniquant.errors import UserError

SCALE_MIN, SCALE_MAX = 1e-5, 1e4
ZERO_CLAMP = 1e4
FULL_PRECISION_BITS = 16


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    ``group_size=None`` means one scale per output channel (row); for activations the
    quantizer reduces over the last axis (per token).
    """

    bits: int
    group_size: int | None = None
    symmetric: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise UserError(
                f"bits={self.bits!r} is not supported: use an integer from 2 to 8 "
                f"(or {FULL_PRECISION_BITS} for no quantization)"
            )
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise UserError(
                f"group_size={self.group_size!r} is invalid: use a positive integer such as 128, "
                "or null for per-channel quantization"
            )

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def tag(self) -> str:
        grid = "sym" if self.symmetric else "asym"
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits}-{grid}-{group}"


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def to_groups(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, int]:
    """Reshape ``[out, in]`` into ``[out * n_groups, group]`` rows; returns (groups, pad).

    The last group of each row is padded with copies of the row's last element.
    """
    if group_size is None:
        return w.reshape(-1, w.shape[-1]), 0
    rows, cols = w.reshape(-1, w.shape[-1]).shape
    pad = (-cols) % group_size
    flat = w.reshape(rows, cols)
    if pad:
        flat = torch.cat([flat, flat[:, -1:].expand(rows, pad)], dim=1)
    return flat.reshape(-1, group_size), pad


def from_groups(groups: torch.Tensor, shape: torch.Size, pad: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    cols = shape[-1]
    flat = groups.reshape(-1, cols + pad)
    return flat[:, :cols].reshape(shape)


def qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec, round_fn=torch.round
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point from a range (per row of the grouped tensor).

    The zero point is rounded with ``torch.round`` and carries no gradient, as in the
    reference; gradients reach clipping factors only through the scale.
    """
    if spec.symmetric:
        absmax = torch.maximum(xmax.abs(), xmin.abs())
        scale = (absmax / (2 ** (spec.bits - 1) - 1)).clamp(SCALE_MIN, SCALE_MAX)
        zero = torch.full_like(scale, float(2 ** (spec.bits - 1) - 1)).detach()
    else:
        scale = ((xmax - xmin) / spec.qmax).clamp(SCALE_MIN, SCALE_MAX)
        zero = torch.round((-xmin / scale).clamp(-ZERO_CLAMP, ZERO_CLAMP)).detach()
    return scale, zero


def quantize_groups(
    groups: torch.Tensor,
    spec: QuantSpec,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes, scale and zero point for rows of ``groups`` (reduced over the last axis).

    ``clip_max``/``clip_min`` multiply the row max/min (learnable weight clipping). Codes are
    computed with the straight-through round so gradients flow to the input and the scale.
    """
    xmax = groups.amax(dim=-1, keepdim=True)
    xmin = groups.amin(dim=-1, keepdim=True)
    if clip_max is not None:
        xmax = clip_max * xmax
    if clip_min is not None:
        xmin = clip_min * xmin
    scale, zero = qparams(xmin, xmax, spec)
    q = torch.clamp(round_ste(groups / scale) + zero, 0, spec.qmax)
    return q, scale, zero


def fake_quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    clip_max: torch.Tensor | None = None,
    clip_min: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize then dequantize ``w`` on ``spec``'s grid (differentiable via STE)."""
    groups, pad = to_groups(w, spec.group_size)
    q, scale, zero = quantize_groups(groups, spec, clip_max, clip_min)
    return from_groups((q - zero) * scale, w.shape, pad)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes ``[out, in]`` (uint8) plus scales and zeros ``[out, n_groups]`` of ``w``."""
    groups, pad = to_groups(w, spec.group_size)
    q, scale, zero = quantize_groups(groups, spec)
    rows = w.shape[0]
    codes = from_groups(q, w.shape, pad).to(torch.uint8)
    return codes, scale.reshape(rows, -1), zero.reshape(rows, -1)


def dequantize_weight(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """``(q - z)·s`` with scales/zeros of shape ``[out, n_groups]`` broadcast over each group."""
    cols = codes.shape[-1]
    g = group_size or cols
    idx = torch.arange(cols, device=codes.device) // g
    return (codes.to(scales.dtype) - zeros[:, idx]) * scales[:, idx]


def quantize_activation(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-token (last axis) fake quantization of an activation tensor of any rank."""
    q, scale, zero = quantize_groups(x, spec)
    return (q - zero) * scale


@torch.no_grad()
def search_clip(w: torch.Tensor, spec: QuantSpec, candidates: torch.Tensor,
                col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per group of ``w``, the index into ``candidates`` (clip factors applied to both the group's max and
    min, as LWC's ``σ(γ)``, ``σ(β)``) with the lowest quantization error ``Σ c_j (w_j - Q(w)_j)²``.

    ``col_weight`` ``[in]`` weighs each input column (the mean square of that input: the diagonal of the
    layer's Hessian, so the error approximates the output error); ``None`` weighs all columns alike.
    Returns ``[rows * n_groups, 1]`` indices (the first candidate wins ties).
    """
    groups, pad = to_groups(w.float(), spec.group_size)
    cw = torch.ones_like(w, dtype=torch.float32) if col_weight is None else col_weight.float().expand_as(w)
    cw = torch.nn.functional.pad(cw.reshape(-1, w.shape[-1]), (0, pad)).reshape_as(groups)  # padding weighs 0
    best_err = torch.full((groups.shape[0], 1), float("inf"), device=w.device)
    best = torch.zeros((groups.shape[0], 1), dtype=torch.long, device=w.device)
    for k, factor in enumerate(candidates.tolist()):
        clip = torch.full_like(best_err, factor)
        q, scale, zero = quantize_groups(groups, spec, clip, clip)
        err = (cw * (groups - (q - zero) * scale).pow(2)).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, k), best)
    return best

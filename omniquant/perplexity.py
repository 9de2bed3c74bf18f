"""Perplexity with the GPTQ/OmniQuant protocol (reference §4.1).

``n = numel // seqlen`` non-overlapping windows; per window the mean cross-entropy over the
``seqlen - 1`` shifted targets times ``seqlen`` is its NLL; ``ppl = exp(Σ nll / (n·seqlen))``. The
cross-entropy is taken over chunks of the window (:mod:`omniquant.logits`), never over all its logits.
A diverged model's perplexity is reported as it is (NaN, or inf when the exponent overflows).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from omniquant.errors import UserError
from omniquant.logits import nll_sum as window_nll


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    windows: int  # windows evaluated
    total_windows: int  # windows in the full split


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    desc: str = "perplexity",
    progress: bool = True,
) -> Perplexity:
    """Perplexity of ``model`` over ``tokens`` (``[1, L]``), first ``max_windows`` windows only if set;
    raises :class:`UserError` for ``seqlen < 2``, ``max_windows < 1`` or no whole window."""
    if seqlen < 2 or (max_windows is not None and max_windows < 1):
        raise UserError(f"perplexity needs seqlen >= 2 and max_windows >= 1 (or none); got seqlen={seqlen}, "
                        f"max_windows={max_windows}")
    total = tokens.numel() // seqlen
    n = total if max_windows is None else min(total, max_windows)
    if n == 0:
        raise UserError(f"{tokens.numel()} tokens are fewer than one window of seqlen={seqlen}: use a smaller seqlen")
    device = next(model.parameters()).device
    nll_sum = 0.0
    bar = tqdm(range(n), desc=desc, unit="win", disable=not progress, dynamic_ncols=True)
    for i in bar:
        batch = tokens.reshape(-1)[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        nll_sum += window_nll(model, batch) / (seqlen - 1) * seqlen
        bar.set_postfix(ppl=f"{_exp(nll_sum / ((i + 1) * seqlen)):.3f}")
    return Perplexity(ppl=_exp(nll_sum / (n * seqlen)), windows=n, total_windows=total)


def _exp(mean_nll: float) -> float:
    """``exp`` that gives inf where it overflows (NaN stays NaN)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf

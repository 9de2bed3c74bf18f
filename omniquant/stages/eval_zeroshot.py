"""Stage ``eval_zeroshot``: lm-eval zero-shot accuracy of a cell's model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from omniquant import data as datalib
from omniquant import zeroshot
from omniquant.layout import Cell
from omniquant.stages.common import cell_lock, cell_of, device_of, finish, load_evaluated


def zeroshot_root(cfg: DictConfig) -> Path | None:
    zs = cfg.eval.zeroshot
    zeroshot.validate(list(zs.tasks), str(zs.metric))
    return datalib.data_root(cfg.data.root)


def zeroshot_kind(cfg: DictConfig) -> str:
    """Metrics file kind: ``zeroshot`` for first-N-document runs, ``zeroshot_full`` for the full task sets."""
    return "zeroshot" if cfg.eval.zeroshot.limit is not None else "zeroshot_full"


def evaluate_zeroshot(cfg: DictConfig, cell: Cell, model, tokenizer) -> dict[str, Any]:
    """Zero-shot metrics (``<task>_acc``, ``<task>_acc_norm``, ``zeroshot_avg``) for ``eval.zeroshot``.

    With ``eval.zeroshot.resume`` scored requests are cached under ``paths.cache``, keyed by the
    weights' fingerprint, so an interrupted evaluation resumes instead of starting over.
    """
    zs = cfg.eval.zeroshot
    limit = None if zs.limit is None else int(zs.limit)
    cache = None
    if zs.resume:
        key = zeroshot.fingerprint(model, cell.run_name)  # the run name carries the activation setting
        cache = Path(cfg.paths.cache) / "lm_eval" / cell.model / cell.setting.name / cell.method / key
    return zeroshot.evaluate(model, tokenizer, list(zs.tasks), zeroshot_root(cfg), limit=limit,
                             batch_size=int(zs.batch_size), metric=str(zs.metric), device=device_of(cfg),
                             cache=cache)


def eval_zeroshot(cfg: DictConfig) -> dict[str, Any]:
    """Zero-shot accuracy of the cell's model; writes ``metrics/<model>/<setting>/<method>.zeroshot.json``
    (``.zeroshot_full.json`` for the full task sets)."""
    cell = cell_of(cfg)
    zeroshot_root(cfg)
    with cell_lock(cell, zeroshot_kind(cfg)):  # the request cache and the metrics file of this kind
        model, tokenizer, record = load_evaluated(cfg, cell)
        return finish(cfg, cell, evaluate_zeroshot(cfg, cell, model, tokenizer), record, kind=zeroshot_kind(cfg))

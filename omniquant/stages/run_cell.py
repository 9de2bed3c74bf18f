"""Stage ``run_cell``: every stage of one cell in memory (the Hydra multirun entry; DVC's ``eval_fp``)."""
from __future__ import annotations

import shutil
from typing import Any

import torch
from omegaconf import DictConfig

from omniquant import method_names
from omniquant.stages.calib_data import sample_calibration
from omniquant.layout import Cell
from omniquant.stages.common import base_checkpoint, cell_lock, cell_of, check_eval_data, device_of, finish, load
from omniquant.stages.eval_ppl import evaluate_perplexity
from omniquant.stages.eval_zeroshot import evaluate_zeroshot, zeroshot_kind, zeroshot_root
from omniquant.stages.quantize import quantize_in_memory


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """All stages for one cell in memory (Hydra multirun entry); no checkpoint is written."""
    cell = cell_of(cfg)
    with cell_lock(cell, "quantize"), cell_lock(cell, "eval"), cell_lock(cell, zeroshot_kind(cfg)):
        metrics = _run_cell(cfg, cell)
        shutil.rmtree(cell.state_dir, ignore_errors=True)  # finished: resume files no longer needed
    return metrics


def _run_cell(cfg: DictConfig, cell: Cell) -> dict[str, Any]:
    check_eval_data(cfg)
    if cfg.eval.zeroshot.enabled:
        zeroshot_root(cfg)
    model, tokenizer = load(cfg, base_checkpoint(cfg), torch.device("cpu"))
    calib = sample_calibration(cfg, tokenizer) if cell.method in method_names.NEEDS_CALIBRATION else None
    _, record = quantize_in_memory(cfg, cell, model, calib)
    model.to(device_of(cfg))
    metrics = finish(cfg, cell, evaluate_perplexity(cfg, model, tokenizer, cell.model), record)
    if cfg.eval.zeroshot.enabled:
        metrics |= finish(cfg, cell, evaluate_zeroshot(cfg, cell, model, tokenizer), record,
                          kind=zeroshot_kind(cfg))
    return metrics

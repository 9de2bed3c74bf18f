"""Stage ``act_stats``: per-channel activation statistics of the FP model (for LET init), keyed by the
model's source identity and the calibration windows, so that no other model's or windows' statistics
are ever reused."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import load_file

from omniquant import act_stats as act_stats_lib
from omniquant.content import content_hash, save_tensors
from omniquant.errors import UserError
from omniquant.layout import Cell
from omniquant.models.loading import source_key
from omniquant.stages.common import base_checkpoint, cell_of, load


def stats_key(cfg: DictConfig, windows: torch.Tensor) -> dict[str, str]:
    return {"model": source_key(cfg.model), "windows": content_hash(windows)}


def cached_stats(cfg: DictConfig, cell: Cell, windows: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """The act_stats stage's file when it was computed for this model and these windows; else None,
    saying why in one line."""
    path = cell.act_stats_file
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        saved = f.metadata() or {}
    want = stats_key(cfg, windows)
    stale = sorted(k for k in want if saved.get(k) != want[k])
    if stale:
        print(f"omniquant: {path} is for another {' and '.join(stale)}; computing the statistics again")
        return None
    return load_file(str(path))


def act_stats(cfg: DictConfig) -> Path:
    """Per-channel activation statistics of the FP model on the calibration windows (for LET init)."""
    cell = cell_of(cfg)
    if not cell.calib_file.is_file():
        raise UserError(f"{cell.calib_file} not found: run the calib_data stage for {cell.model} first")
    model, _ = load(cfg, base_checkpoint(cfg))
    windows = load_file(str(cell.calib_file))["input_ids"]
    stats = act_stats_lib.collect(model, windows)
    cell.act_stats_file.parent.mkdir(parents=True, exist_ok=True)
    return save_tensors(stats, cell.act_stats_file, stats_key(cfg, windows))

"""Stage ``act_stats``: per-channel activation statistics of the FP model (for LET init)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from omniquant import act_stats as act_stats_lib
from omniquant.errors import UserError
from omniquant.stages.common import base_checkpoint, cell_of, load


def act_stats(cfg: DictConfig) -> Path:
    """Per-channel activation statistics of the FP model on the calibration windows (for LET init)."""
    cell = cell_of(cfg)
    if not cell.calib_file.is_file():
        raise UserError(f"{cell.calib_file} not found: run the calib_data stage for {cell.model} first")
    model, _ = load(cfg, base_checkpoint(cfg))
    stats = act_stats_lib.collect(model, load_file(str(cell.calib_file))["input_ids"])
    cell.act_stats_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell.act_stats_file.with_suffix(".partial")
    save_file(stats, str(tmp))
    tmp.replace(cell.act_stats_file)
    return cell.act_stats_file

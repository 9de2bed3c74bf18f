"""Stage ``prepare_model``: convert, build or validate the model into ``paths.models/<name>``."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from omniquant import models
from omniquant.stages.common import cell_of


def prepare_model(cfg: DictConfig) -> Path:
    """Convert/build/validate the model into ``paths.models/<name>``."""
    cell_of(cfg)
    return models.prepare_model(cfg.model, cfg.paths.models, cfg.paths.cache)

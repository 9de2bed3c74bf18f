"""What every method receives besides the model, and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch


T = TypeVar("T")


@dataclass
class MethodContext:
    """Calibration inputs the stages prepare; a method's own options come in its config mapping."""

    act_stats: dict[str, torch.Tensor] | None = None
    state_dir: Path | None = None  # resume files
    device: torch.device | None = None


@dataclass
class QuantResult:
    qparams: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per stored weight: scales, zeros
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # learned parameters (safetensors)
    record: dict[str, Any] = field(default_factory=dict)  # extra metrics (calibration time, memory, curves)


def method_config(cls: type[T], cfg: Mapping[str, Any]) -> T:
    """A method's knobs (a frozen dataclass) from its config; null or absent keys keep the defaults."""
    return cls(**{f.name: cfg[f.name] for f in fields(cls) if cfg.get(f.name) is not None})


"""What every method receives besides the model, and what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch


@dataclass
class MethodContext:
    setting_overrides: Mapping[str, Any] = field(default_factory=dict)  # quant.<method>: per-setting values
    profile: Mapping[str, Any] = field(default_factory=dict)  # calibration.*: the profile's budget
    act_stats: dict[str, torch.Tensor] | None = None
    state_dir: Path | None = None  # resume files
    saved_params: dict[str, torch.Tensor] | None = None  # learned parameters to rebuild from
    device: torch.device | None = None


@dataclass
class QuantResult:
    qparams: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per linear: scales, zeros
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # learned parameters (safetensors)
    record: dict[str, Any] = field(default_factory=dict)  # extra metrics (calibration time, memory, curves)

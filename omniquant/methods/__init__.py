"""Quantization methods, selected by name: ``quantize_(model, setting, method_cfg, calib)``."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from omniquant.errors import UserError
from omniquant.methods import rtn
from omniquant.setting import QuantSetting

Method = Callable[[nn.Module, QuantSetting, Mapping[str, Any], torch.Tensor | None], dict]


def _fp(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor | None) -> dict:
    """The unquantized reference row."""
    return {}


METHODS: dict[str, Method] = {"fp": _fp, "rtn": rtn.quantize}


def validate(name: str, setting: QuantSetting) -> None:
    """Reject unknown methods and method/setting combinations that make no sense."""
    if name not in METHODS:
        raise UserError(f"method {name!r} is unknown; available: {', '.join(METHODS)}")
    if name == "fp" and setting.quantizes:
        raise UserError(f"method=fp evaluates the unquantized model; use quant=fp16, not quant={setting.name}")
    if name != "fp" and not setting.quantizes:
        raise UserError(f"quant={setting.name} quantizes nothing; use method=fp for the full-precision row")


def quantize_(
    model: nn.Module, setting: QuantSetting, method_cfg: Mapping[str, Any], calib: torch.Tensor | None = None
) -> dict:
    """Quantize ``model`` in place with the configured method; returns per-linear quant params."""
    name = method_cfg["name"]
    validate(name, setting)
    return METHODS[name](model, setting, method_cfg, calib)

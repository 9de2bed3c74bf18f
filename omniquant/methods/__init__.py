"""Quantization methods, selected by name: ``quantize_(model, setting, method_cfg, calib, ctx)``.

A method fake-quantizes the model in place (activation quantization, where the setting has
it, is attached as block wrappers) and returns a :class:`QuantResult`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from omniquant.errors import UserError
from omniquant.methods import awq, fp, gptq, omniquant, rtn, smoothquant
from omniquant.methods.base import MethodContext, QuantResult

__all__ = ["METHODS", "NEEDS_ACT_STATS", "NEEDS_CALIBRATION", "MethodContext", "QuantResult", "quantize_", "validate"]
from omniquant.setting import QuantSetting

Method = Callable[[nn.Module, QuantSetting, Mapping[str, Any], torch.Tensor | None, MethodContext], QuantResult]


# name -> implementation; each lives in omniquant/methods/<name>.py (the DVC cells depend on that file)
METHODS: dict[str, Method] = {"fp": fp.quantize, "rtn": rtn.quantize, "omniquant": omniquant.quantize,
                              "gptq": gptq.quantize, "awq": awq.quantize, "smoothquant": smoothquant.quantize}
NEEDS_CALIBRATION = {"omniquant", "gptq", "awq", "smoothquant"}
NEEDS_ACT_STATS = {"omniquant", "smoothquant"}  # per-channel activation maxima (LET init, smoothing)


def validate(name: str, setting: QuantSetting) -> None:
    """Reject unknown methods and method/setting combinations that make no sense."""
    if name not in METHODS:
        raise UserError(f"method {name!r} is unknown; available: {', '.join(METHODS)}")
    if name == "fp" and setting.quantizes:
        raise UserError(f"method=fp evaluates the unquantized model; use quant=fp16, not quant={setting.name}")
    if name != "fp" and not setting.quantizes:
        raise UserError(f"quant={setting.name} quantizes nothing; use method=fp for the full-precision row")


def quantize_(
    model: nn.Module,
    setting: QuantSetting,
    method_cfg: Mapping[str, Any],
    calib: torch.Tensor | None = None,
    ctx: MethodContext | None = None,
) -> QuantResult:
    """Quantize ``model`` in place with the configured method."""
    name = method_cfg["name"]
    validate(name, setting)
    if name in NEEDS_CALIBRATION and calib is None:
        raise UserError(f"method={name} needs calibration data (the calib_data stage)")
    return METHODS[name](model, setting, method_cfg, calib, ctx or MethodContext())

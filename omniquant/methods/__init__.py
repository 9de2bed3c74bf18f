"""Quantization methods, selected by name, and the one public call :func:`quantize`.

A method fake-quantizes the model in place through the block runner (:mod:`omniquant.runner`;
activation quantization, where the setting has it, is attached as block wrappers) and returns a
:class:`QuantResult`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from omniquant import act_stats as act_stats_lib
from omniquant.errors import UserError
from omniquant.method_names import NAMES, NEEDS_ACT_STATS, NEEDS_CALIBRATION, validate
from omniquant.methods import awq, fp, gptq, omniquant, rtn, smoothquant
from omniquant.methods.base import MethodContext, QuantResult
from omniquant.runner import default_device
from omniquant.setting import QuantSetting

__all__ = ["METHODS", "NEEDS_ACT_STATS", "NEEDS_CALIBRATION", "MethodContext", "QuantResult", "quantize", "validate"]

Method = Callable[[nn.Module, QuantSetting, Mapping[str, Any], torch.Tensor | None, MethodContext], QuantResult]


# name -> implementation; each lives in omniquant/methods/<name>.py
METHODS: dict[str, Method] = {"fp": fp.quantize, "rtn": rtn.quantize, "omniquant": omniquant.quantize,
                              "omniquant-paper": omniquant.quantize_paper, "gptq": gptq.quantize,
                              "awq": awq.quantize, "smoothquant": smoothquant.quantize}
assert tuple(METHODS) == NAMES


def quantize(
    model: nn.Module,
    setting: QuantSetting | str,
    method: str = "omniquant",
    calib: torch.Tensor | None = None,
    *,
    act_stats: dict[str, torch.Tensor] | None = None,
    state_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> tuple[nn.Module, QuantResult]:
    """Quantize ``model`` in place with ``method`` at ``setting`` (e.g. ``"w3a16g128"``); returns the model
    and the method's record.

    ``calib``: calibration windows ``[n, seqlen]`` of token ids (every method but ``rtn`` and ``fp``);
    ``act_stats``: activation statistics (collected from ``calib`` when a method needs them and none are
    given); ``state_dir``: per-block resume files; ``options``: the method's knobs (``conf/method/<name>.yaml``).
    """
    setting = QuantSetting.parse(setting) if isinstance(setting, str) else setting
    validate(method, setting)
    if method in NEEDS_CALIBRATION and calib is None:
        raise UserError(f"method={method} needs calibration data (the calib_data stage)")
    device = None if device is None else torch.device(device)
    if method in NEEDS_ACT_STATS and act_stats is None:
        act_stats = act_stats_lib.collect(model.to(default_device(device)), calib)
        model.to("cpu")
    ctx = MethodContext(act_stats=act_stats, state_dir=None if state_dir is None else Path(state_dir),
                        device=device)
    return model, METHODS[method](model, setting, options, calib, ctx)

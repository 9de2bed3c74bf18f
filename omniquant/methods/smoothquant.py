"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights, then RTN.

Per decoder block, ``s = max|X|^α / max|W|^(1−α)`` per input channel (``max|X|`` over the
calibration tokens of the full-precision model, ``max|W|`` over all consuming linears; ``max|W|``
and ``s`` clamped at 1e-5 as in the reference) is folded exactly into [input_layernorm → q, k, v] and
[post_attention_layernorm → gate, up]: the norm weight is divided by ``s``, the consumers'
columns multiplied. Weights are then RTN-quantized on our grid and activations quantized per
token (:mod:`omniquant.methods.rtn`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from omniquant import act_stats as act_stats_lib
from omniquant.errors import UserError
from omniquant.methods import rtn
from omniquant.methods.base import MethodContext, QuantResult
from omniquant.methods.blockwise import INPUT_GROUPS, method_config
from omniquant.models.architectures import architecture_of, decoder_layers
from omniquant.setting import QuantSetting

SMOOTHED = (("input_layernorm", INPUT_GROUPS[0]), ("post_attention_layernorm", INPUT_GROUPS[2]))


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"smoothquant: alpha={self.alpha} must lie in [0, 1]")


@torch.no_grad()
def smooth_(layer: nn.Module, act_max: Mapping[str, torch.Tensor], alpha: float) -> None:
    """Fold the smoothing scales into ``layer`` (outputs unchanged in full precision).

    ``act_max`` maps a linear's name within the block to max |x| per input channel.
    """
    for norm_name, consumers in SMOOTHED:
        norm = layer.get_submodule(norm_name)
        linears = [layer.get_submodule(name) for name in consumers]
        w_max = torch.cat([lin.weight.abs().float() for lin in linears]).amax(0).clamp(min=1e-5)
        x_max = act_max[consumers[0]].to(w_max.device).float()
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        norm.weight.copy_(norm.weight.float() / s)
        for lin in linears:
            lin.weight.copy_(lin.weight.float() * s)


def quantize(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor,
             ctx: MethodContext) -> QuantResult:
    """Smooth every decoder block, then RTN weights and per-token activations."""
    if setting.act_spec is None:
        raise UserError(f"method=smoothquant is for weight-activation settings; quant={setting.name} keeps "
                        "activations in full precision: use rtn, gptq or awq")
    alpha = method_config(SmoothQuantConfig, cfg).alpha
    stats = act_stats_lib.collect(model, calib) if ctx.act_stats is None else ctx.act_stats
    prefix = architecture_of(model).layers
    for i, layer in enumerate(decoder_layers(model)):
        smooth_(layer, act_stats_lib.for_block(stats, f"{prefix}.{i}"), alpha)
    return rtn.quantize(model, setting, cfg, calib, ctx)

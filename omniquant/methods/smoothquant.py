"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights, then RTN.

Per decoder block, ``s = max|X|^α / max|W|^(1−α)`` per input channel (``max|X|`` over the
calibration tokens of the full-precision model, ``max|W|`` over all consuming linears; ``max|W|``
and ``s`` clamped at 1e-5 as in the reference) is folded exactly into each smoothing pair of the
adapter whose source is a norm ([attention norm → q, k, v], [MLP norm → gate, up]): the norm is
divided by ``s``, the consumers' columns multiplied. Weights are then RTN-quantized on our grid
and activations quantized per token (:func:`omniquant.methods.rtn.rtn_step`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from omniquant import act_stats as act_stats_lib
from omniquant.block import BlockConfig, QuantBlock
from omniquant.errors import UserError
from omniquant.methods.base import MethodContext, QuantResult, method_config
from omniquant.methods.rtn import rtn_step
from omniquant.runner import BlockJob, Runner, StepResult
from omniquant.setting import QuantSetting


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5  # migration strength

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise UserError(f"smoothquant: alpha={self.alpha} must lie in [0, 1]")


@torch.no_grad()
def smooth_(layer: nn.Module, act_max: Mapping[str, torch.Tensor], alpha: float) -> None:
    """Fold the smoothing scales into ``layer`` (outputs unchanged in full precision).

    ``act_max`` maps a module's path within the block to max |x| per input channel.
    """
    block = QuantBlock(layer, BlockConfig(weight=None))
    views = block.layout.views
    for pair in block.layout.pairs:
        if pair.prev in views:
            continue
        w_max = torch.cat([views[c].weight(layer).abs().float() for c in pair.consumers]).amax(0).clamp(min=1e-5)
        x_max = act_max[views[pair.consumers[0]].module].to(w_max.device).float()
        block.fold_(pair, (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5))


def quantize(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor,
             ctx: MethodContext) -> QuantResult:
    """Smooth every decoder block, then RTN weights and per-token activations."""
    alpha = method_config(SmoothQuantConfig, cfg).alpha
    stats = act_stats_lib.collect(model, calib) if ctx.act_stats is None else ctx.act_stats

    def step(job: BlockJob) -> StepResult:
        smooth_(job.layer, act_stats_lib.for_block(stats, job.prefix), alpha)
        return rtn_step(job)

    qparams, _, _ = Runner(model, setting, device=ctx.device).run(step, "smoothquant")
    return QuantResult(qparams=qparams)

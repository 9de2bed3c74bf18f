"""Round-to-nearest: min/max grid per row or group, no calibration; per-token activations if set."""
from __future__ import annotations

from omniquant.block import BlockConfig, QuantBlock
from omniquant.methods.base import QuantResult
from omniquant.runner import BlockJob, Runner, StepResult


def rtn_step(job: BlockJob) -> StepResult:
    """Fake-quantize one layer's weights with RTN (activation quantization attached)."""
    setting = job.runner.setting
    block = QuantBlock(job.layer, BlockConfig(weight=setting.weight_spec, act=setting.act_spec))
    return StepResult(block, block.fuse_())


def quantize(model, setting, cfg, calib, ctx) -> QuantResult:
    """Fake-quantize every decoder-block weight with RTN."""
    qparams, _, _ = Runner(model, setting, device=ctx.device).run(rtn_step, "rtn")
    return QuantResult(qparams=qparams)

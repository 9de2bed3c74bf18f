"""Block-wise OmniQuant calibration (reference §3, paper Algorithm 1), as a step of the block runner.

The runner (:mod:`omniquant.runner`) propagates the FP chain (targets) and the quantized chain (the
quantized block's inputs). Loss ``MSE(F_fp(X_fp), F_q(X_q))`` (+ ``MSE(F_fp(X_q), F_q(X_q))`` with
``aug_loss``). After training, LET is fused and weights fake-quantized. The runner persists each
finished block, so a killed run restarts at the first unfinished block with an identical result.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn

from omniquant import act_stats as act_stats_lib
from omniquant.block import BlockConfig, QuantBlock
from omniquant.errors import UserError
from omniquant.runner import (BlockJob, BlockRecord, Runner, StepResult, default_device, fp_block, input_groups,
                              layer_hessians)
from omniquant.setting import QuantSetting

NAN_POLICIES = ("raise", "retry")
LWC_INITS = ("sigmoid", "search")  # σ(4) everywhere (paper) | per-group clip search
LR_SCHEDULES = ("constant", "cosine")  # constant (paper) | cosine decay to 0 over the block's steps
ROUNDINGS = ("rtn", "gptq")  # final rounding: nearest (paper) | GPTQ on the learned clipping ranges
RoundLayer = Callable[..., StepResult]  # (job, fixed=per-role (scale, zero), layer_h=Hessians or None) -> result


class CalibrationDiverged(UserError):
    """A block's loss became NaN/Inf and the policy could not recover."""


@dataclass(frozen=True)
class CalibConfig:
    epochs: int = 20
    lwc: bool = True
    let: bool = False
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    wd: float = 0.0
    batch_size: int = 1
    aug_loss: bool = False
    alpha: float = 0.5
    weight_stat: str = "abs"  # abs | signed (paper-era)
    tie_rope: bool = True
    amp: str = "auto"  # auto: bf16 autocast on GPU (fp32 for 8-bit settings), fp32 on CPU
    nan_policy: str = "raise"
    nan_retries: int = 3
    lwc_init: str = "sigmoid"
    lr_schedule: str = "constant"
    rounding: str = "rtn"

    def __post_init__(self) -> None:
        for key, allowed in (("nan_policy", NAN_POLICIES), ("lwc_init", LWC_INITS), ("lr_schedule", LR_SCHEDULES),
                             ("rounding", ROUNDINGS)):
            if getattr(self, key) not in allowed:
                raise UserError(f"{key}={getattr(self, key)!r} is unknown; use one of {', '.join(allowed)}")
        if self.weight_stat not in ("abs", "signed"):
            raise UserError(f"let_weight_stat={self.weight_stat!r} is unknown; use abs or signed")
        if self.epochs < 0 or self.batch_size < 1:
            raise UserError(f"epochs={self.epochs}, batch_size={self.batch_size}: need epochs >= 0, batch_size >= 1")


def block_config(setting: QuantSetting, cc: CalibConfig) -> BlockConfig:
    return BlockConfig(weight=setting.weight_spec, act=setting.act_spec, lwc=cc.lwc, let=cc.let, tie_rope=cc.tie_rope)


def _autocast(device: torch.device, setting: QuantSetting, amp: str):
    eight_bit = 8 <= min(setting.wbits, setting.abits) < 16
    if device.type != "cuda" or amp == "off" or (amp == "auto" and eight_bit):
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def _train_block(qblock: QuantBlock, job: BlockJob, targets: list[torch.Tensor], cc: CalibConfig,
                 setting: QuantSetting, device: torch.device) -> None:
    """AdamW on the block's LWC/LET parameters with the NaN policy."""
    i, q_in, record, bar = job.index, job.q_in, job.record, job.bar
    initial = {k: v.detach().clone() for k, v in qblock.state_dict().items() if k.startswith(("lwc.", "let."))}
    lr_scale = 1.0
    for attempt in range(cc.nan_retries + 1):
        groups = [{"params": list(qblock.let.parameters()), "lr": cc.let_lr * lr_scale},
                  {"params": list(qblock.lwc.parameters()), "lr": cc.lwc_lr * lr_scale}]
        groups = [g for g in groups if g["params"]]
        params = [p for g in groups for p in g["params"]]
        if not params:
            return
        opt = torch.optim.AdamW(groups, weight_decay=cc.wd)
        steps = cc.epochs * -(-q_in.shape[0] // cc.batch_size)
        schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cc.lr_schedule == "cosine"
                    else None)
        record.epoch_loss, record.epoch_grad_norm = [], []
        try:
            for epoch in range(cc.epochs):
                losses, norms = [], []
                for start in range(0, q_in.shape[0], cc.batch_size):
                    sl = slice(start, start + cc.batch_size)
                    with _autocast(device, setting, cc.amp):
                        out = qblock(q_in[sl].to(device), **job.kwargs)
                        loss = sum(nn.functional.mse_loss(out.float(), t[sl].to(device).float()) for t in targets)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} in block {i}, epoch {epoch}, "
                                                 f"step {start // cc.batch_size}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norms.append(torch.nn.utils.clip_grad_norm_(params, float("inf")).item())
                    opt.step()
                    if schedule is not None:
                        schedule.step()
                    losses.append(loss.item())
                bad = next((n for n, v in qblock.named_parameters() if v.requires_grad and not v.isfinite().all()), None)
                if bad is not None:
                    raise FloatingPointError(f"non-finite learned parameter {bad} in block {i}, epoch {epoch}")
                record.epoch_loss.append(sum(losses) / len(losses))
                record.epoch_grad_norm.append(sum(norms) / len(norms))
                if bar is not None:
                    bar.set_postfix(block=i, epoch=epoch, loss=f"{record.epoch_loss[-1]:.3e}",
                                    grad=f"{record.epoch_grad_norm[-1]:.2e}")
            return
        except FloatingPointError as err:
            if cc.nan_policy == "raise" or attempt == cc.nan_retries:
                raise CalibrationDiverged(
                    f"{err} (after {attempt} retries); use method.nan_policy=retry or lower the learning rates"
                ) from None
            record.retries += 1
            lr_scale /= 2
            qblock.load_state_dict(initial, strict=False)
            print(f"omniquant: {err}; restored block {i} and retrying with learning rates x{lr_scale:g}")


def calibrate(
    model: nn.Module,
    setting: QuantSetting,
    windows: torch.Tensor,
    cc: CalibConfig,
    stats: dict[str, torch.Tensor] | None = None,
    state_dir=None,
    saved_params: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
    round_layer: RoundLayer | None = None,
) -> tuple[dict, dict[str, torch.Tensor], list[BlockRecord]]:
    """Quantize ``model`` (kept on CPU) in place, block by block.

    Returns ``(qparams, learned_params, block_records)``. ``saved_params`` (a learned-parameter
    file) with ``epochs=0`` rebuilds a previous result without training. ``round_layer`` (needed by
    ``rounding=gptq``) quantizes a layer in place keeping each role's learned scales and zeros.
    """
    device = default_device(device)
    if cc.let and stats is None and saved_params is None:
        raise UserError("LET needs activation statistics: run the act_stats stage first")
    rounding = cc.rounding != "rtn" and setting.weight_spec is not None
    if rounding and round_layer is None:
        raise UserError(f"rounding={cc.rounding} needs its rounding method")
    search = cc.lwc_init == "search" and cc.lwc and setting.weight_spec is not None and saved_params is None
    train = cc.epochs > 0
    bcfg = block_config(setting, cc)

    def step(job: BlockJob) -> StepResult:
        block_stats = {k: act_stats_lib.for_block(stats, job.prefix, k) if stats is not None else None
                       for k in ("act_scales", "act_shifts")}
        qblock = QuantBlock(job.layer, bcfg, block_stats["act_scales"], cc.alpha, cc.weight_stat,
                            block_stats["act_shifts"])
        own = _params_for(saved_params, job.prefix)
        if own:
            qblock.load_state_dict(own, strict=False)
        # the layer's Hessians before training: the search's column weights, and GPTQ's Hessians unless LET
        # changes the inputs (then GPTQ takes them again on the transformed layer)
        layer_h = layer_hessians(job) if search or rounding else None
        if search:
            qblock.init_lwc_search({role: layer_h[g[0]].diagonal() for g in input_groups(qblock) if g[0] in layer_h
                                    for role in g})
        if train:
            targets = [job.fp_out] + ([job.run(fp_block(job.layer), job.q_in)] if cc.aug_loss else [])
            _train_block(qblock, job, targets, cc, setting, device)
        learned = {k: v.detach().cpu().clone() for k, v in qblock.state_dict().items()
                   if k.startswith(("lwc.", "let."))}
        if rounding:
            return replace(round_layer(job, fixed=qblock.fuse_transform_(), layer_h=None if cc.let else layer_h),
                           learned=learned)
        return StepResult(qblock, qblock.fuse_(), learned)

    chains = ("fp", "q") if train else ("q",) if search or rounding else ()
    runner = Runner(model, setting, windows if chains else None, device, chains=chains,
                    forward_batch=cc.batch_size, autocast=lambda: _autocast(device, setting, cc.amp),
                    state_dir=state_dir, key={"method": asdict(cc), "saved_params": saved_params, "act_stats": stats})
    return runner.run(step, f"omniquant {setting.name}")


def _params_for(saved: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor]:
    if not saved:
        return {}
    return {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}

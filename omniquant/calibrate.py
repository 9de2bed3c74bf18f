"""Block-wise OmniQuant calibration (reference §3, paper Algorithm 1), as a step of the block runner.

The runner (:mod:`omniquant.runner`) propagates the FP chain (targets) and the quantized chain (the
quantized block's inputs). Loss ``MSE(F_fp(X_fp), F_q(X_q))`` (+ ``MSE(F_fp(X_q), F_q(X_q))`` with
``aug_loss``). After training, LET is fused and weights fake-quantized. The runner persists each
finished block, so a killed run restarts at the first unfinished block with an identical result.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
from torch import nn

from omniquant import act_stats as act_stats_lib
from omniquant.block import BlockConfig, QuantBlock
from omniquant.errors import UserError
from omniquant.runner import BlockJob, BlockRecord, Runner, StepResult, default_device, fp_block
from omniquant.setting import QuantSetting

NAN_POLICIES = ("raise", "retry")


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

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise UserError(f"nan_policy={self.nan_policy!r} is unknown; use one of {', '.join(NAN_POLICIES)}")
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
) -> tuple[dict, dict[str, torch.Tensor], list[BlockRecord]]:
    """Quantize ``model`` (kept on CPU) in place, block by block.

    Returns ``(qparams, learned_params, block_records)``. ``saved_params`` (a learned-parameter
    file) with ``epochs=0`` rebuilds a previous result without training.
    """
    device = default_device(device)
    if cc.let and stats is None and saved_params is None:
        raise UserError("LET needs activation statistics: run the act_stats stage first")
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
        if train:
            targets = [job.fp_out] + ([job.run(fp_block(job.layer), job.q_in)] if cc.aug_loss else [])
            _train_block(qblock, job, targets, cc, setting, device)
        learned = {k: v.detach().cpu().clone() for k, v in qblock.state_dict().items()
                   if k.startswith(("lwc.", "let."))}
        return StepResult(qblock, qblock.fuse_(), learned)

    runner = Runner(model, setting, windows if train else None, device, chains=("fp", "q") if train else (),
                    forward_batch=cc.batch_size, autocast=lambda: _autocast(device, setting, cc.amp),
                    state_dir=state_dir, key={"method": asdict(cc), "saved_params": saved_params, "act_stats": stats})
    return runner.run(step, f"omniquant {setting.name}")


def _params_for(saved: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor]:
    if not saved:
        return {}
    return {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}

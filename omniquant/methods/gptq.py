"""GPTQ (Frantar et al. 2022): column-wise quantization with second-order error compensation.

Per decoder block and per linear, ``H = 2/n Σ x xᵀ`` over the ``n`` calibration tokens entering
it. Columns are quantized left to right on our grid; each column's error, divided by the
diagonal of the upper Cholesky factor ``U`` of ``(H + λI)⁻¹``, is spread over the columns not yet
quantized through ``U``'s row (lazy batch updates). A group's scale and zero point are set with
:func:`qparams` from the min/max of its current, error-updated columns when its first column
comes up; with static act-order (the default, as in llm-compressor) columns go by decreasing
Hessian diagonal and every group's parameters come from the unquantized weights. With
``true_sequential`` the linears are done in input groups (q/k/v, o, gate/up,
down; the adapter's input groups), each group's Hessian taken with the groups before it already
quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from omniquant.block import BlockConfig, QuantBlock, merge_qparams
from omniquant.errors import UserError
from omniquant.methods.base import MethodContext, QuantResult, method_config
from omniquant.quantizer import QuantSpec, qparams
from omniquant.runner import BlockJob, Runner, StepResult, hessians, input_groups
from omniquant.setting import QuantSetting


@dataclass(frozen=True)
class GPTQConfig:
    percdamp: float = 0.01  # λ = percdamp · mean(diag H)
    block_size: int = 128  # lazy-batch width
    act_order: bool = True  # static act-order: columns by decreasing diag H, group parameters from the unquantized W
    true_sequential: bool = False

    def __post_init__(self) -> None:
        if self.percdamp <= 0 or self.block_size < 1:
            raise UserError(f"gptq: percdamp={self.percdamp}, block_size={self.block_size}: need percdamp > 0, "
                            "block_size >= 1")


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, cfg: GPTQConfig,
         fixed: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantized weight ``[out, in]`` on ``spec``'s grid, with its scales and zeros ``[out, n_groups]``.

    ``fixed``: the groups' scales and zeros to use (e.g. OmniQuant's learned clipping ranges) instead of
    the min/max of the weights."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    rows, cols = w.shape
    g = spec.group_size or cols
    static = cfg.act_order or fixed is not None
    if fixed is None:
        scales = w.new_empty(rows, -(-cols // g))
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = (p.to(w).reshape(rows, -1).clone() for p in fixed)

    def set_group(k: int, current: torch.Tensor) -> None:
        cols_k = current[:, k * g:(k + 1) * g]
        scales[:, k], zeros[:, k] = qparams(cols_k.amin(1), cols_k.amax(1), spec)

    dead = h.diagonal() == 0  # inputs that are always zero
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    if cfg.act_order:
        if fixed is None:
            for k in range(scales.shape[1]):
                set_group(k, w)
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(cols, device=w.device)
    h.diagonal().add_(cfg.percdamp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group_of = (perm // g).tolist()
    # Lazy batches hold whole groups, so a group's min/max sees all updates made so far.
    batch = g * max(1, cfg.block_size // g) if spec.group_size and not static else cfg.block_size
    q = torch.zeros_like(w)
    for i1 in range(0, cols, batch):
        i2 = min(i1 + batch, cols)
        err = w.new_zeros(rows, i2 - i1)
        for j in range(i1, i2):
            if not static and j % g == 0:
                set_group(j // g, w)
            s, z = scales[:, group_of[j]], zeros[:, group_of[j]]
            q[:, j] = (torch.clamp(torch.round(w[:, j] / s) + z, 0, spec.qmax) - z) * s
            e = (w[:, j] - q[:, j]) / u[j, j]
            w[:, j:i2] -= e[:, None] * u[j, j:i2][None]
            err[:, j - i1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return q[:, torch.argsort(perm)], scales, zeros


def gptq_layer(job: BlockJob, cfg: GPTQConfig,
               fixed: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
               layer_h: Mapping[str, torch.Tensor] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ every quantized weight of ``job.layer`` in place, group by group of the adapter (inputs from
    the quantized chain); returns each role's scales and zeros. ``fixed``: per role, the group
    parameters to keep (see :func:`gptq`); ``layer_h``: the layer's Hessians (:func:`layer_hessians`),
    when already taken on its current weights (not with ``true_sequential``)."""
    spec = job.runner.setting.weight_spec
    block = QuantBlock(job.layer, BlockConfig(weight=None))
    block.fused = True  # the layer's own weights, updated as the groups are quantized
    views = block.layout.quantized
    groups = input_groups(block)
    steps = [[g] for g in groups] if cfg.true_sequential else [groups]
    per_role: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in steps:
        h = layer_h if layer_h is not None and not cfg.true_sequential else \
            hessians(job, block, [g[0] for g in step], job.q_in)
        for group in step:
            for role in group:
                weight = views[role].weight(job.layer)
                # an expert no calibration token was routed to: H = I, i.e. round to nearest
                hessian = h.get(group[0], torch.eye(weight.shape[1], device=weight.device))
                try:
                    w, scales, zeros = gptq(weight, hessian, spec, cfg, None if fixed is None else fixed[role])
                except torch.linalg.LinAlgError:
                    raise UserError(f"gptq: the damped Hessian of {job.prefix}.{views[role].name} is not positive "
                                    f"definite; raise method.percdamp (now {cfg.percdamp})") from None
                weight.copy_(w)
                per_role[role] = (scales, zeros)
    return per_role


def gptq_step(job: BlockJob, cfg: GPTQConfig, fixed: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
              layer_h: Mapping[str, torch.Tensor] | None = None) -> StepResult:
    """GPTQ every quantized weight of one layer in place (``fixed``, ``layer_h``: see :func:`gptq_layer`)."""
    per_role = gptq_layer(job, cfg, fixed, layer_h)
    out = QuantBlock(job.layer, BlockConfig(weight=None, act=job.runner.setting.act_spec))
    out.fused = True
    return StepResult(out, merge_qparams(out.layout, per_role))


def quantize(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor,
             ctx: MethodContext) -> QuantResult:
    """GPTQ weights for every decoder-block linear; per-token activations if the setting has them."""
    step = partial(gptq_step, cfg=method_config(GPTQConfig, cfg))
    qparams, _, _ = Runner(model, setting, calib, ctx.device, chains=("q",)).run(step, "gptq")
    return QuantResult(qparams=qparams)

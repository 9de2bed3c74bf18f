"""AWQ (Lin et al. 2023): activation-aware per-input-channel scales, clipping search, then RTN.

Per decoder block (inputs from the full-precision chain, as in AWQ) and per pair
[previous op → consumers], the scale ``s = a^α`` (``a`` = mean |x| per input channel of the
consumers, normalised by ``sqrt(max s · min s)``) is searched over ``α = k / n_grid``; each
candidate quantizes the consumers as ``Q(W·s)/s`` and the ``α`` with the lowest MSE of the
inspected module's output wins (``α = 0`` is plain RTN). The scale is then folded exactly:
the previous op's output channels are divided by ``s``, the consumers' input columns multiplied.
With grouped-query attention the [v_proj → o_proj] scale lives on v_proj's channels and is
repeated over the query heads of each KV group for o_proj. Optionally each group's weights are
then clamped to ``±r·max|w|`` with ``r`` picked per group from ``1, 0.95, …, 0.55`` by the
group's output MSE (not for q/k_proj, as in AWQ); finally RTN on our grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping

import torch
from torch import nn

from omniquant.block import BlockConfig, QuantBlock
from omniquant.errors import UserError
from omniquant.methods.base import MethodContext, QuantResult, method_config
from omniquant.quantizer import QuantSpec, fake_quantize, from_groups, to_groups
from omniquant.runner import BlockJob, Runner, StepResult
from omniquant.setting import QuantSetting

CLIP_GRID, MAX_SHRINK = 20, 0.5  # clip ratios 1 - k/20 for k < 10 (AWQ's auto_clip)
CLIP_TOKENS = 512  # tokens sampled for the clipping search (AWQ's n_sample_token)
CLIP_ROWS = 256  # output rows per clipping-search chunk (bounds memory)
NO_CLIP = ("q", "k")  # AWQ skips clipping the attention-score inputs
FORWARD_BATCH = 8  # calibration windows per forward of a scale-search candidate


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20  # α = 0, 1/n_grid, ..., (n_grid - 1)/n_grid
    clip: bool = True

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise UserError(f"awq: n_grid={self.n_grid} must be >= 1")


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` over ``x`` split along the first (window) axis."""
    return torch.cat([fn(xb) for xb in x.split(FORWARD_BATCH)])


@torch.no_grad()
def search_scale(inspect: Callable[[torch.Tensor], torch.Tensor], consumers: list[torch.Tensor],
                 quantized: list[bool], x: torch.Tensor, spec: QuantSpec, n_grid: int, act_mean: torch.Tensor,
                 expand: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Best ``s = act_mean^α`` for the ``consumers``' weights (fed ``x``) and its ``α``.

    ``expand`` maps ``s`` to the consumers' input channels; ``quantized`` says which consumers are
    fake-quantized (a full-precision router is only scaled). The weights are left as they were.
    """
    originals = [c.detach().clone() for c in consumers]
    ref = batched(inspect, x)
    best: tuple[float, torch.Tensor, float] = (float("inf"), torch.ones_like(act_mean), 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = act_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for consumer, w, q in zip(consumers, originals, quantized):
            consumer.copy_((fake_quantize(w * expand(s), spec) if q else w * expand(s)) / expand(s))
        loss = (batched(inspect, x) - ref).pow(2).mean().item()
        if loss < best[0]:
            best = (loss, s, alpha)
    for consumer, w in zip(consumers, originals):
        consumer.copy_(w)
    return best[1], best[2]


@torch.no_grad()
def _clip_max(wg: torch.Tensor, xg: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group clamp bound ``[rows, n_groups, 1]`` minimising each group's output MSE.

    ``wg`` is ``[rows, n_groups, g]``, ``xg`` ``[tokens, n_groups, g]`` (zero where padded).
    """
    ref = torch.einsum("rng,tng->rtn", wg, xg)
    amax = wg.abs().amax(-1, keepdim=True)
    best, best_err = amax, torch.full(amax.shape[:2], float("inf"), device=wg.device)
    for k in range(int(MAX_SHRINK * CLIP_GRID)):
        bound = amax * (1 - k / CLIP_GRID)
        clipped = torch.minimum(torch.maximum(wg, -bound), bound)
        wq = fake_quantize(clipped.reshape(-1, wg.shape[-1]), spec).view_as(wg)
        err = (torch.einsum("rng,tng->rtn", wq, xg) - ref).pow(2).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[..., None], bound, best)
    return best


@torch.no_grad()
def clip_weight(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` ``[out, in]`` with each group clamped to AWQ's searched ``±r·max|w|`` (inputs ``x [.., in]``)."""
    x = x.reshape(-1, x.shape[-1])
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)]
    groups, pad = to_groups(w, spec.group_size)
    g = groups.shape[-1]
    wg = groups.view(w.shape[0], -1, g)
    xg = nn.functional.pad(x, (0, pad)).view(x.shape[0], -1, g)
    bound = torch.cat([_clip_max(rows, xg, spec) for rows in wg.split(CLIP_ROWS)]).reshape(-1, 1)
    return from_groups(torch.minimum(torch.maximum(groups, -bound), bound), w.shape, pad)


def awq_step(job: BlockJob, cfg: AWQConfig, alphas: dict[str, float]) -> StepResult:
    """Scale search and folding, clipping search, then RTN of one layer in place."""
    setting = job.runner.setting
    spec = setting.weight_spec
    block = QuantBlock(job.layer, BlockConfig(weight=None))
    block.fused = True  # searches read the layer's current weights
    views, pairs = block.layout.views, block.layout.pairs
    inputs: dict[str, list[torch.Tensor]] = {p.name: [] for p in pairs}
    block.taps = {p.consumers[0]: inputs[p.name].append for p in pairs}
    try:
        job.run(block, job.fp_in)
    finally:
        block.taps = {}
    feats = {name: torch.cat(chunks) for name, chunks in inputs.items() if chunks}

    def inspector(pair) -> Callable[[torch.Tensor], torch.Tensor]:
        if pair.inspect == "attention":
            return lambda h: block.attention(h, block.effective(), **job.kwargs)
        if pair.inspect == "mlp":
            return lambda h: block.mlp(h, block.effective())
        return lambda h: block.proj(pair.inspect, h, block.effective())

    for pair in pairs:
        if pair.name not in feats:  # an expert no calibration token was routed to
            continue
        consumers = [views[role].weight(job.layer) for role in pair.consumers]
        quantized = [role not in block.layout.fp_roles for role in pair.consumers]
        x = feats[pair.name]
        act_mean = x.abs().reshape(-1, x.shape[-1]).mean(0)
        expand = block._per_query_head if pair.heads else nn.Identity()
        if pair.heads:  # one statistic per KV channel: mean over the query heads sharing it
            act_mean = act_mean.view(block.n_kv, block.n_rep, block.head_dim).mean(1).flatten()
        s, alphas[f"{job.prefix}.{pair.name}"] = search_scale(inspector(pair), consumers, quantized, x, spec,
                                                              cfg.n_grid, act_mean, expand)
        block.fold_(pair, s)
        feats[pair.name] = x / expand(s)
    if cfg.clip:
        for pair in pairs:
            for role in pair.consumers:
                if pair.name in feats and role not in NO_CLIP and role not in block.layout.fp_roles:
                    weight = views[role].weight(job.layer)
                    weight.copy_(clip_weight(weight, feats[pair.name], spec))
    out = QuantBlock(job.layer, BlockConfig(weight=spec, act=setting.act_spec))
    return StepResult(out, out.fuse_())


def quantize(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor,
             ctx: MethodContext) -> QuantResult:
    """AWQ weights for every decoder-block linear; per-token activations if the setting has them."""
    alphas: dict[str, float] = {}
    step = partial(awq_step, cfg=method_config(AWQConfig, cfg), alphas=alphas)
    qparams, _, _ = Runner(model, setting, calib, ctx.device, chains=("fp",)).run(step, "awq")
    return QuantResult(qparams=qparams, record={"awq_alpha": alphas})

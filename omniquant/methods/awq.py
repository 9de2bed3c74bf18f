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
from omniquant.methods.base import MethodContext, QuantResult
from omniquant.methods.blockwise import INPUT_GROUPS, QParams, Rope, batched, forward, method_config, quantize_blocks
from omniquant.quantizer import QuantSpec, fake_quantize, from_groups, to_groups
from omniquant.setting import QuantSetting

CLIP_GRID, MAX_SHRINK = 20, 0.5  # clip ratios 1 - k/20 for k < 10 (AWQ's auto_clip)
CLIP_TOKENS = 512  # tokens sampled for the clipping search (AWQ's n_sample_token)
CLIP_ROWS = 256  # output rows per clipping-search chunk (bounds memory)
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")  # AWQ skips clipping the attention-score inputs


@dataclass(frozen=True)
class AWQConfig:
    n_grid: int = 20  # α = 0, 1/n_grid, ..., (n_grid - 1)/n_grid
    clip: bool = True

    def __post_init__(self) -> None:
        if self.n_grid < 1:
            raise UserError(f"awq: n_grid={self.n_grid} must be >= 1")


@dataclass(frozen=True)
class Pair:
    """Consumers whose input channels are scaled, and the op that absorbs ``1/s``."""

    name: str
    prev: str
    consumers: tuple[str, ...]
    inspect: str  # module whose output the scale search compares
    kv_heads: bool = False  # scale per v_proj channel, repeated over the query heads for o_proj


PAIRS = (
    Pair("qkv", "input_layernorm", INPUT_GROUPS[0], "self_attn"),
    Pair("out", "self_attn.v_proj", INPUT_GROUPS[1], "self_attn.o_proj", kv_heads=True),
    Pair("fc1", "post_attention_layernorm", INPUT_GROUPS[2], "mlp"),
    Pair("down", "mlp.up_proj", INPUT_GROUPS[3], "mlp.down_proj"),
)


@torch.no_grad()
def search_scale(inspect: Callable[[torch.Tensor], torch.Tensor], consumers: list[nn.Linear], x: torch.Tensor,
                 spec: QuantSpec, n_grid: int, act_mean: torch.Tensor,
                 expand: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Best ``s = act_mean^α`` for ``consumers`` (fed ``x``) and its ``α``.

    ``expand`` maps ``s`` to the consumers' input channels. The weights are left as they were.
    """
    originals = [c.weight.detach().clone() for c in consumers]
    ref = batched(inspect, x)
    best: tuple[float, torch.Tensor, float] = (float("inf"), torch.ones_like(act_mean), 0.0)
    for k in range(n_grid):
        alpha = k / n_grid
        s = act_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for consumer, w in zip(consumers, originals):
            consumer.weight.copy_(fake_quantize(w * expand(s), spec) / expand(s))
        loss = (batched(inspect, x) - ref).pow(2).mean().item()
        if loss < best[0]:
            best = (loss, s, alpha)
    for consumer, w in zip(consumers, originals):
        consumer.weight.copy_(w)
    return best[1], best[2]


@torch.no_grad()
def fold_scale(prev: nn.Module, consumers: list[nn.Linear], s: torch.Tensor, s_in: torch.Tensor) -> None:
    """Divide ``prev``'s output channels by ``s``, multiply the consumers' inputs by ``s_in``."""
    prev.weight.div_(s[:, None] if prev.weight.dim() == 2 else s)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(s)
    for consumer in consumers:
        consumer.weight.mul_(s_in)


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


def _quantize_block(prefix: str, layer: nn.Module, x: torch.Tensor, pe: Rope, spec: QuantSpec, cfg: AWQConfig,
                    alphas: dict[str, float]) -> QParams:
    """Scale search and folding, clipping search, then RTN of one layer in place."""
    qblock = QuantBlock(layer, BlockConfig(weight=spec))
    inputs: dict[str, list[torch.Tensor]] = {p.name: [] for p in PAIRS}
    forward(layer, x, pe, {layer.get_submodule(p.consumers[0]): inputs[p.name].append for p in PAIRS})
    feats = {name: torch.cat(chunks) for name, chunks in inputs.items()}
    attn = layer.self_attn
    for pair in PAIRS:
        module = layer.get_submodule(pair.inspect)
        inspect = (lambda h: attn(h, position_embeddings=pe)[0]) if module is attn else module
        consumers = [layer.get_submodule(name) for name in pair.consumers]
        act_mean = feats[pair.name].abs().reshape(-1, feats[pair.name].shape[-1]).mean(0)
        expand = qblock._per_query_head if pair.kv_heads else nn.Identity()
        if pair.kv_heads:  # one statistic per KV channel: mean over the query heads sharing it
            act_mean = act_mean.view(qblock.n_kv, qblock.n_rep, qblock.head_dim).mean(1).flatten()
        s, alphas[f"{prefix}.{pair.name}"] = search_scale(inspect, consumers, feats[pair.name], spec, cfg.n_grid,
                                                          act_mean, expand)
        fold_scale(layer.get_submodule(pair.prev), consumers, s, expand(s))
        feats[pair.name] = feats[pair.name] / expand(s)
    if cfg.clip:
        for pair in PAIRS:
            for name in pair.consumers:
                if name not in NO_CLIP:
                    weight = layer.get_submodule(name).weight
                    weight.copy_(clip_weight(weight, feats[pair.name], spec))
    return qblock.fuse_()


def quantize(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor,
             ctx: MethodContext) -> QuantResult:
    """AWQ weights for every decoder-block linear; per-token activations if the setting has them."""
    alphas: dict[str, float] = {}
    block = partial(_quantize_block, spec=setting.weight_spec, cfg=method_config(AWQConfig, cfg), alphas=alphas)
    qparams = quantize_blocks(model, setting, calib, ctx, block, "awq", fp_chain=True)
    return QuantResult(qparams=qparams, record={"awq_alpha": alphas})

"""Activation statistics for LET initialisation (reference §2.4).

For the input of every module that holds a block's quantized weights (and the MoE router), as
the architecture adapter lays them out: the running max of |x| per input channel
(``act_scales``) and the EMA shift of the reference (``act_shifts``): the first sample gives
``(max_c + min_c) / 2`` over its tokens, each later sample updates ``0.99·shift + 0.01·new``.
Saved as safetensors keyed ``<layer path>.act_scales`` / ``.act_shifts``.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from omniquant.arch import adapter_of

EMA = 0.99


@torch.no_grad()
def collect(model: nn.Module, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the FP model over ``windows`` ([n, seqlen]) one sample at a time, hooking linear inputs."""
    adapter = adapter_of(model)
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(_module, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            amax = x.abs().amax(0)
            mid = (x.amax(0) + x.amin(0)) / 2
            if f"{name}.act_scales" in stats:
                stats[f"{name}.act_scales"] = torch.maximum(stats[f"{name}.act_scales"], amax)
                stats[f"{name}.act_shifts"] = EMA * stats[f"{name}.act_shifts"] + (1 - EMA) * mid
            else:
                stats[f"{name}.act_scales"], stats[f"{name}.act_shifts"] = amax, mid

        return fn

    for i, layer in enumerate(adapter.decoder_layers(model)):
        modules = dict.fromkeys(v.module for v in adapter.layout(layer, model.config).views.values())
        for name in modules:
            hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook(f"{adapter.layers}.{i}.{name}")))
    device = next(model.parameters()).device
    try:
        for sample in tqdm(windows, desc="act_stats", unit="sample", dynamic_ncols=True):
            model(sample.unsqueeze(0).to(device))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.cpu() for k, v in stats.items()}


def for_block(stats: dict[str, torch.Tensor], prefix: str, kind: str = "act_scales") -> dict[str, torch.Tensor]:
    """``{module path within the block: statistic}`` for the block at ``prefix`` (e.g. model.layers.3);
    ``kind``: act_scales or act_shifts."""
    suffix = f".{kind}"
    return {k[len(prefix) + 1 : -len(suffix)]: v for k, v in stats.items() if k.startswith(prefix + ".") and k.endswith(suffix)}

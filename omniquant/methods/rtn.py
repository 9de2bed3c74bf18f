"""Round-to-nearest: min/max grid per row or group, no calibration; per-token activations if set."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from omniquant.block import BlockConfig, QuantBlock
from omniquant.calibrate import install
from omniquant.methods.base import QuantResult
from omniquant.models.architectures import architecture_of, decoder_layers


@torch.no_grad()
def quantize(model, setting, cfg, calib, ctx) -> QuantResult:
    """Fake-quantize every decoder-block linear weight with RTN."""
    arch = architecture_of(model)
    layers = decoder_layers(model)
    bcfg = BlockConfig(weight=setting.weight_spec, act=setting.act_spec)
    result = QuantResult()
    for i in tqdm(range(len(layers)), desc="rtn", unit="block", dynamic_ncols=True):
        block = QuantBlock(layers[i], bcfg)
        result.qparams |= {f"{arch.layers}.{i}.{name}": d for name, d in block.fuse_().items()}
        install(layers, i, block)
    return result

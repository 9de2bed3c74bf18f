"""Round-to-nearest: min/max grid per row or group, no calibration."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from omniquant.errors import UserError
from omniquant.models.architectures import architecture_of, block_linears, decoder_layers
from omniquant.quantizer import dequantize_weight, quantize_weight
from omniquant.setting import QuantSetting


@torch.no_grad()
def quantize(model: nn.Module, setting: QuantSetting, cfg: Mapping[str, Any], calib: torch.Tensor | None) -> dict:
    """Replace every decoder-block linear weight by its RTN fake-quantized value."""
    if setting.act_spec is not None:
        raise UserError(
            f"method=rtn is weight-only here; {setting.name} quantizes activations: use method=omniquant"
        )
    spec = setting.weight_spec
    arch = architecture_of(model)
    qparams = {}
    layers = decoder_layers(model)
    for i, block in enumerate(tqdm(layers, desc="rtn", unit="block", dynamic_ncols=True)):
        for name, linear in block_linears(block, arch).items():
            codes, scales, zeros = quantize_weight(linear.weight.float(), spec)
            linear.weight.copy_(dequantize_weight(codes, scales, zeros, spec.group_size))
            qparams[f"{arch.layers}.{i}.{name}"] = {"scales": scales, "zeros": zeros}
    return qparams

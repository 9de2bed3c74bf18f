"""compressed-tensors ``pack-quantized`` checkpoints, loaded by transformers (``CompressedTensorsConfig``) and vLLM.

Per quantized linear ``<path>``:

- ``weight_packed`` int32 ``[out, ceil(in·bits/32)]``: the codes of each row packed densely
  (:func:`~omniquant.export.common.pack_int32`);
- ``weight_scale`` ``[out, n_groups]`` in the checkpoint dtype;
- ``weight_zero_point`` int32 ``[ceil(out·bits/32), n_groups]``: the zero points packed the same way
  down each column (along ``out``);
- ``weight_shape`` int64 ``[2]``: ``(out, in)``.

compressed-tensors computes with signed values ``q - 2^(bits-1)`` and zero points
``z - 2^(bits-1)`` and packs them with that offset added back, so the packed bits are exactly our
unsigned codes and zero points, and ``(q - z)·s`` is unchanged. The weights are marked
``symmetric: false`` whatever the setting (a symmetric OmniQuant grid has ``z = 2^(bits-1) - 1``, not
compressed-tensors' implicit 0). 3-bit rows straddle word boundaries: that dense layout is the one
compressed-tensors writes since its June 2026 change (PR #732, before it packed 10 codes per word).

Bit-exact for float32 checkpoints; for float16/bfloat16 ones ``weight_scale`` is stored in that dtype,
so a weight can move by ``|q - z|`` times the scale's rounding error. transformers 5.23 with compressed-tensors 0.20 loads these
asymmetric checkpoints only with ``quantization_config=CompressedTensorsConfig(dequantize=True)``: its
default path lays out the modules on the meta device, where compressed-tensors leaves the zero point
unpacked ``[out, n_groups]``, and then rejects the packed one from the file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from omniquant.export.common import (
    QuantizedModel,
    pack_int32,
    require_weight_only,
    require_whole_groups,
    require_zeros_in_range,
    write_hf_checkpoint,
)

NAME = "compressed-tensors"
FORMAT = "pack-quantized"
VERSION = "0.20.0"  # the compressed-tensors release whose layout this writes and the tests load
ACTIVATIONS = ("compressed-tensors can quantize linear inputs per token, but not OmniQuant's per-(token, head) "
               "quantization of Q, K and V after RoPE, so the exported model would not compute what was evaluated")


def quantization_config(qm: QuantizedModel) -> dict:
    """The ``quantization_config`` entry of ``config.json``."""
    spec = qm.spec
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": False, "group_size": spec.group_size,
               "strategy": "group" if spec.group_size else "channel", "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "version": VERSION,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": FORMAT}},
        "ignore": list(qm.ignored),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def export(qm: QuantizedModel, out: Path) -> Path:
    """Write the checkpoint directory ``out``; returns it."""
    require_weight_only(qm, NAME, ACTIVATIONS)
    require_whole_groups(qm, NAME)
    require_zeros_in_range(qm, NAME)
    bits = qm.spec.bits
    tensors = dict(qm.tensors)
    for name, linear in qm.linears.items():
        tensors[f"{name}.weight_packed"] = pack_int32(linear.codes, bits)
        tensors[f"{name}.weight_scale"] = linear.scales.to(qm.dtype)
        tensors[f"{name}.weight_zero_point"] = pack_int32(linear.zeros.T, bits).T
        tensors[f"{name}.weight_shape"] = torch.tensor(linear.codes.shape)
    return write_hf_checkpoint(qm, out, tensors, quantization_config(qm), qm.dtype)

"""AutoAWQ ``gemm`` checkpoints (4-bit, groups of 128): what vLLM's AWQ and MLC-LLM's ``q4f16_autoawq`` read.

Per quantized linear ``<path>`` (``in x out`` layout, transposed from ``nn.Linear``):

- ``qweight`` int32 ``[in, out/8]`` and ``qzeros`` int32 ``[in/128, out/8]``: eight 4-bit values per
  word along ``out``, value ``k`` of a word at bit ``4k`` holding output channel ``ORDER[k]`` of its
  block of eight (AutoAWQ's interleaved order, the FasterTransformer layout);
- ``scales`` float16 ``[in/128, out]``.

A weight is ``(q - z)·scale``, the integer codes and zero points being ours; only the scales are
rounded to float16. Everything else in the checkpoint is float16 too, as AutoAWQ writes it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from omniquant.export.common import (
    QuantizedModel,
    float_tensors,
    pack_int32,
    require_grid,
    require_weight_only,
    require_whole_groups,
    require_zeros_in_range,
    unpack_int32,
    unsupported,
    write_hf_checkpoint,
)
from omniquant.quantizer import dequantize_weight

NAME = "awq"
BITS, GROUP_SIZE = 4, 128
PER_WORD = 32 // BITS
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])  # channel (within a block of 8) stored at nibble k


def quantization_config(qm: QuantizedModel) -> dict:
    """The ``quantization_config`` entry of ``config.json`` (AutoAWQ's ``to_transformers_dict``)."""
    return {"quant_method": "awq", "version": "gemm", "bits": BITS, "group_size": GROUP_SIZE,
            "zero_point": True, "modules_to_not_convert": list(qm.ignored)}


def _interleave(cols: int) -> torch.Tensor:
    """Column permutation putting each block of eight output channels into AWQ's nibble order."""
    return torch.arange(cols) // PER_WORD * PER_WORD + ORDER.repeat(cols // PER_WORD)


def pack(codes: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qweight``, ``qzeros`` from codes ``[out, in]`` and zero points ``[out, n_groups]``."""
    order = _interleave(codes.shape[0])
    return pack_int32(codes.T[:, order], BITS), pack_int32(zeros.T[:, order], BITS)


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` (uint8), zero points and scales ``[out, n_groups]`` of one AWQ linear."""
    out = scales.shape[1]
    restore = torch.argsort(_interleave(out))
    codes = unpack_int32(qweight, BITS, out)[:, restore].T.contiguous()
    zeros = unpack_int32(qzeros, BITS, out)[:, restore].T.to(torch.int32).contiguous()
    return codes, zeros, scales.T.contiguous()


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The ``nn.Linear`` weight ``[out, in]`` (float32) of one AWQ linear."""
    codes, zeros, scales = unpack(qweight, qzeros, scales)
    return dequantize_weight(codes, scales.float(), zeros.float(), GROUP_SIZE)


def export(qm: QuantizedModel, out: Path) -> Path:
    """Write the checkpoint directory ``out``; returns it."""
    require_weight_only(qm, NAME)
    require_grid(qm, NAME, bits=BITS, group_size=GROUP_SIZE)
    require_whole_groups(qm, NAME)
    require_zeros_in_range(qm, NAME)
    tensors = float_tensors(qm, torch.float16)
    for name, linear in qm.linears.items():
        if linear.codes.shape[0] % PER_WORD:
            raise unsupported(qm, NAME, f"{name} has {linear.codes.shape[0]} output features, not a multiple of "
                                        f"{PER_WORD}")
        tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"] = pack(linear.codes, linear.zeros)
        tensors[f"{name}.scales"] = linear.scales.T.to(torch.float16)
    return write_hf_checkpoint(qm, out, tensors, quantization_config(qm), torch.float16)

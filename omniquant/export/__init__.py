"""Exports of quantized models to formats other engines load, one module per format.

``export(load_quantized(dir, setting), "awq", out)`` writes a quantize-stage output as:

- ``compressed-tensors``: ``pack-quantized`` HF checkpoint (transformers, vLLM), 2..8-bit weights;
- ``awq``: AutoAWQ ``gemm`` HF checkpoint (vLLM, MLC-LLM ``q4f16_autoawq``), 4-bit groups of 128;
- ``gguf``: llama.cpp GGUF with ``Q4_1`` linears, 4-bit groups of 32, Llama models.

Every export takes the integer codes, scales and zeros of the quantize stage as they are (see
:mod:`omniquant.export.common`) and raises :class:`~omniquant.errors.UserError` for a setting its
format cannot represent, before writing anything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from omniquant.arch import adapter_for
from omniquant.errors import UserError
from omniquant.export import awq, compressed_tensors, gguf
from omniquant.export.common import IntLinear, QuantizedModel, load_quantized, quantized_model

__all__ = ["FORMATS", "IntLinear", "QuantizedModel", "export", "load_quantized", "quantized_model"]

# format name -> writer(model, output directory) -> the written directory or file
FORMATS: dict[str, Callable[[QuantizedModel, Path], Path]] = {
    compressed_tensors.NAME: compressed_tensors.export,
    awq.NAME: awq.export,
    gguf.NAME: gguf.export,
}


def export(qm: QuantizedModel, fmt: str, out: str | Path) -> Path:
    """Write ``qm`` in format ``fmt`` under the directory ``out``; returns what was written."""
    if fmt not in FORMATS:
        raise UserError(f"export format {fmt!r} is unknown; available: {', '.join(FORMATS)}")
    adapter_for(qm.config.model_type).require_format(fmt)
    return FORMATS[fmt](qm, Path(out))

"""Stage ``mlc_compile``: MLC-LLM artifacts and our TVM build of a packed cell."""
from __future__ import annotations

import shutil
from typing import Any

import torch
from omegaconf import DictConfig

from omniquant.stages.common import cell_of, finish, require_packed

CUDA_NOT_IMPLEMENTED = "skipped: the TVM CUDA build is not implemented yet"
NO_CUDA = "skipped: no CUDA GPU on this machine"


def cuda_status() -> str:
    """What became of the TVM CUDA build on this machine."""
    return CUDA_NOT_IMPLEMENTED if torch.cuda.is_available() else NO_CUDA


def mlc_compile(cfg: DictConfig) -> dict[str, Any]:
    """MLC-LLM artifacts of the cell and its TVM build (``llvm``; CUDA when a GPU is present), logits
    checked against the PyTorch packed model; writes ``metrics/<model>/<setting>/<method>.mlc.json``."""
    cell = cell_of(cfg)
    require_packed(cell)
    from omniquant import mlc
    from omniquant.export import load_quantized

    shutil.rmtree(cell.mlc_dir, ignore_errors=True)
    manifest = mlc.write_mlc_artifacts(load_quantized(cell.quantized_dir, cell.setting), cell.mlc_llm_dir)
    results = {"mlc_route": manifest["route"], "mlc_quantization": manifest["quantization"]}
    results |= {f"llvm_{k}": v for k, v in mlc.build_tvm(cell.packed_file, cell.tvm_dir).items()}
    results["cuda_status"] = cuda_status()
    return finish(cfg, cell, results, {}, kind="mlc")

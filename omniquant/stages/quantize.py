"""Stage ``quantize``: run the method, save a fake-quantized HF checkpoint and its quant record."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from omniquant import act_stats as act_stats_lib
from omniquant import method_names, methods
from omniquant.errors import UserError
from omniquant.export.common import save_quantized
from omniquant.layout import Cell
from omniquant.methods.base import QuantResult
from omniquant.metrics import machine, peak_rss_gb
from omniquant.stages.act_stats import cached_stats
from omniquant.stages.calib_data import load_windows
from omniquant.stages.common import base_checkpoint, cell_lock, cell_of, device_of, load, spec_of


def _method_inputs(cfg: DictConfig, cell: Cell, model, calib: torch.Tensor | None) -> dict[str, Any]:
    """The keyword arguments of :func:`omniquant.methods.quantize` for the cell: activation statistics,
    resume state, device, and the method's options (its config, the profile's budget, the setting's
    values for it, saved parameters)."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    if cell.method not in method_names.NEEDS_CALIBRATION:
        return options
    if calib is None:
        raise UserError(f"method={cell.method} needs calibration data: run the calib_data stage first")
    overrides = OmegaConf.to_container(cfg.quant.get(method_names.family(cell.method)) or OmegaConf.create({}),
                                     resolve=True)
    stats = None
    if cell.method in method_names.NEEDS_ACT_STATS:
        stats = cached_stats(cfg, cell, calib)
        if stats is None:
            stats = act_stats_lib.collect(model.to(device_of(cfg)), calib)
            model.to("cpu")
    saved = cfg.method.get("resume_params")
    if saved and not Path(saved).is_file():
        raise UserError(f"method.resume_params={saved} does not exist")
    return options | {
        "setting_defaults": overrides,
        "profile": OmegaConf.to_container(cfg.get("calibration") or OmegaConf.create({}), resolve=True),
        "saved_params": load_file(str(saved)) if saved else None,
        "act_stats": stats,
        "state_dir": cell.state_dir if cfg.method.get("resume", True) else None,
        "device": device_of(cfg),
    }


def quantize_in_memory(cfg: DictConfig, cell: Cell, model, calib: torch.Tensor | None) -> tuple[QuantResult, dict]:
    """Run the method on the CPU-resident model; returns its result and the quant record."""
    torch.manual_seed(int(cfg.seed))
    inputs = _method_inputs(cfg, cell, model, calib)
    start = time.perf_counter()
    _, result = methods.quantize(model, cell.setting, cell.method, calib, **inputs)
    seconds = time.perf_counter() - start
    record = {"quant_seconds": seconds, "quant_machine": machine(), "peak_rss_gb": peak_rss_gb()}
    record["peak_mem_gb"] = result.record.get("peak_mem_gb", record["peak_rss_gb"])
    if calib is not None:
        record["calib_nsamples"], record["calib_seqlen"] = int(calib.shape[0]), int(calib.shape[1])
    if "calib" in result.record:  # the effective hyper-parameters after precedence
        record |= {f"calib_{k}": result.record["calib"][k] for k in ("epochs", "batch_size")}
    return result, record | {k: v for k, v in result.record.items() if k != "peak_mem_gb"} | {"spec": spec_of(cfg, cell)}


def quantize(cfg: DictConfig) -> Path:
    """Quantize the model and save a fake-quantized HF checkpoint plus its quant record (which holds the
    full setting under ``quant``: :meth:`~omniquant.setting.QuantSetting.record`).

    For OmniQuant this is the calibration stage: it also saves the learned parameters
    (``omni_parameters.safetensors``), resumable per block from ``artifacts/state``.
    """
    cell = cell_of(cfg)
    with cell_lock(cell, "quantize"):
        return _quantize(cfg, cell)


def _quantize(cfg: DictConfig, cell: Cell) -> Path:
    base = base_checkpoint(cfg)
    calib = load_windows(cfg, cell)
    if cell.method == "fp":
        record = {"quant_seconds": 0.0, "peak_rss_gb": peak_rss_gb(), "checkpoint": str(Path(base).resolve())}
        save_quantized(cell.quantized_dir, cell.setting, cell.method, record)
    else:
        model, tokenizer = load(cfg, base, torch.device("cpu"))
        result, record = quantize_in_memory(cfg, cell, model, calib)
        save_quantized(cell.quantized_dir, cell.setting, cell.method, record | {"checkpoint": None},  # this directory
                       model, tokenizer, result.qparams, result.learned)
    shutil.rmtree(cell.state_dir, ignore_errors=True)  # finished: resume files no longer needed
    return cell.quantized_dir


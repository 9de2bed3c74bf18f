"""Stage ``calib_data``: the calibration windows (safetensors) for the quantize stage."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open

from omniquant import data as datalib
from omniquant.content import save_tensors
from omniquant.errors import UserError
from omniquant.layout import Cell
from omniquant.models.loading import source_key
from omniquant.stages.common import base_checkpoint, cell_of, check_data


def calib_split(cfg: DictConfig) -> str:
    """``data.calib.split``; a list means "the first split present under the data root"."""
    calib = cfg.data.calib
    if isinstance(calib.split, str):
        return calib.split
    root = datalib.data_root(cfg.data.root)
    splits = list(calib.split)
    chosen = next((s for s in splits if root is None or datalib.has_split(calib.dataset, s, root)), splits[-1])
    if chosen != splits[0]:
        print(f"omniquant: calibration uses {calib.dataset} {chosen}: {splits[0]} is not under {root}")
    return chosen


def sample_calibration(cfg: DictConfig, tokenizer) -> torch.Tensor:
    calib = cfg.data.calib
    split = calib_split(cfg)
    root = check_data(cfg, [(calib.dataset, split)])
    rows = datalib.load_rows(calib.dataset, split, root)
    tokens = datalib.tokenize_rows(rows, tokenizer)
    return datalib.calibration_windows(tokens, int(calib.nsamples), int(calib.seqlen), int(cfg.seed))


def load_windows(cfg: DictConfig, cell: Cell) -> torch.Tensor | None:
    """The calib_data stage's windows (None if it has not run); windows sampled for another model stop the run."""
    if not cell.calib_file.is_file():
        return None
    with safe_open(str(cell.calib_file), "pt") as f:
        model = (f.metadata() or {}).get("model")
        windows = f.get_tensor("input_ids")
    if model != source_key(cfg.model):
        raise UserError(f"{cell.calib_file} was sampled for another model than {cell.model} "
                        f"({model or 'unrecorded'}, not {source_key(cfg.model)}): run the calib_data stage again")
    return windows


def calib_data(cfg: DictConfig) -> Path:
    """Sample calibration windows and save them (safetensors) for the quantize stage."""
    cell = cell_of(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint(cfg))
    windows = sample_calibration(cfg, tokenizer)
    cell.calib_file.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: str(v) for k, v in OmegaConf.to_container(cfg.data.calib, resolve=True).items()}
    meta["split"] = calib_split(cfg)
    return save_tensors({"input_ids": windows.contiguous()}, cell.calib_file,
                        meta | {"seed": str(cfg.seed), "model": source_key(cfg.model)})

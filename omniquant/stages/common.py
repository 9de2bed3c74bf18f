"""What several stages share: config → :class:`~omniquant.layout.Cell`, device, model loading, data
checks, and writing a cell's metrics (:func:`finish`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from omniquant import __version__, locks, method_names, models
from omniquant import data as datalib
from omniquant.block import attach_act_quant
from omniquant.errors import UserError
from omniquant.layout import Cell
from omniquant.metrics import machine, peak_rss_gb, read_json, write_json
from omniquant.setting import QuantSetting
from omniquant.tracking import log_run

RECORD_METRICS = ("quant_seconds", "quant_machine", "peak_rss_gb", "peak_mem_gb", "nan_retries", "calib_epochs", "calib_batch_size",
                  "calib_nsamples", "calib_seqlen")


def cell_of(cfg: DictConfig) -> Cell:
    """Validate the config's choices and name its cell (raises UserError on bad input)."""
    setting = QuantSetting.from_cfg(cfg.quant)
    if setting.name != cfg.quant.get("name"):
        print(f"omniquant: the quant values make this setting {setting.name} (quant={cfg.quant.get('name')} was "
              f"overridden); its artifacts and metrics go under {setting.name}")
    method = str(cfg.method.name)
    method_names.validate(method, setting)
    models.loading.source_of(cfg.model)
    return Cell(models.model_name(cfg.model), setting, method, Path(cfg.paths.out))


def device_of(cfg: DictConfig) -> torch.device:
    name = str(cfg.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} requested but no CUDA GPU is available; use device=cpu or auto")
    return torch.device(name)


def load(cfg: DictConfig, path: str, device: torch.device | None = None):
    """Load on ``device`` (default: the configured one) in the configured compute dtype."""
    compute = device_of(cfg)
    dtype = models.loading.resolve_dtype(str(cfg.dtype), compute)
    return models.load_model(path, dtype, device or compute, bool(cfg.model.get("trust_remote_code", False)))


def base_checkpoint(cfg: DictConfig) -> str:
    """The prepared base checkpoint; parallel sweep jobs wait on a file lock while one of them prepares it."""
    name = models.model_name(cfg.model)
    with locks.hold(Path(cfg.paths.models) / f".{name}.lock", f"the prepared model {name}", wait=True):
        return models.ensure_prepared(cfg.model, cfg.paths.models, cfg.paths.cache)


def cell_lock(cell: Cell, stage: str):
    """The lock of one stage of a cell: a second run of it stops with a one-line error naming the holder."""
    return locks.hold(cell.lock_file(stage), f"{stage} of {cell.run_name}")


def spec_of(cfg: DictConfig, cell: Cell) -> dict[str, Any]:
    """Everything a cell's quantization depends on, for its record and metrics: the model's source identity,
    the setting, the method's config with the setting's and the profile's values for it, the calibration
    data, the seed and the project version."""
    method = cell.method
    spec: dict[str, Any] = {"model": {"name": cell.model, "source": models.loading.source_identity(cfg.model)},
                            "quant": cell.setting.record(), "method": _plain(cfg.method), "seed": int(cfg.seed),
                            "version": __version__}
    if method in method_names.NEEDS_CALIBRATION:
        spec |= {"calib": _plain(cfg.data.calib), "setting_defaults": _plain(cfg.quant.get(method)),
                 "profile": _plain(cfg.get("calibration"))}
    return spec


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def load_evaluated(cfg: DictConfig, cell: Cell) -> tuple[Any, Any, dict[str, Any]]:
    """The cell's model as the quantize stage left it (the base checkpoint for ``method=fp``), with its record."""
    if cell.method == "fp":
        record: dict[str, Any] = {"checkpoint": base_checkpoint(cfg)}
    else:
        if not cell.record_file.is_file():
            raise UserError(f"{cell.record_file} not found: run the quantize stage for {cell.run_name} first")
        record = read_json(cell.record_file)
    model, tokenizer = load(cfg, record.get("checkpoint") or str(cell.quantized_dir))
    if cell.setting.act_spec is not None and cell.method != "fp":
        attach_act_quant(model, cell.setting.act_spec)  # weights are fake-quantized; activations too
    return model, tokenizer, record


def check_data(cfg: DictConfig, names_splits: list[tuple[str, str]]) -> Path | None:
    root = datalib.data_root(cfg.data.root)
    if root is not None:
        for name, split in names_splits:
            if not datalib.has_split(name, split, root):
                ds = datalib.dataset(name)
                raise UserError(
                    f"missing data file {root / ds.files[split]} ({name} {split}); put it there, or point "
                    f"data.root / ${datalib.DATA_DIR_ENV} at a folder that has it (README 'Offline data')"
                )
    return root


def check_eval_data(cfg: DictConfig) -> Path | None:
    """Fail early (before loading anything) if an evaluation split is missing under the data root."""
    return check_data(cfg, [(name, datalib.dataset(name).eval_split) for name in cfg.eval.datasets])


def require_packed(cell: Cell) -> None:
    if not cell.packed_file.is_file():
        raise UserError(f"{cell.packed_file} not found: run the pack stage for {cell.run_name} first")


def finish(cfg: DictConfig, cell: Cell, results: dict[str, Any], record: dict[str, Any],
           kind: str = "ppl") -> dict[str, Any]:
    """Merge the quant record, write the cell's metrics JSON (``kind``: ppl, zeroshot, zeroshot_full, packed, speed
    or turns), log it to MLflow.

    Zero-shot and packed metrics go into the MLflow run of the cell's perplexity evaluation when there is one.
    """
    results |= {k: record[k] for k in RECORD_METRICS if k in record}
    results |= {"eval_peak_rss_gb": peak_rss_gb(), "eval_machine": machine()}
    if record.get("blocks") and any(b["epoch_loss"] for b in record["blocks"]):  # OmniQuant: each block's curve
        results["block_epoch_loss"] = [b["epoch_loss"] for b in record["blocks"]]
    metrics = {"model": cell.model, "setting": cell.setting.name, "method": cell.method} | results
    grid = cfg.model.get("weight_grid")
    if grid:
        metrics["model_weight_grid"] = str(grid)
    metrics["spec"] = (record.get("spec") or spec_of(cfg, cell)) | {"eval": _plain(cfg.eval)}
    write_json(cell.metrics_file(kind), metrics)
    if cfg.mlflow.enabled:
        config = OmegaConf.to_container(cfg, resolve=True)
        log_run(
            cell.run_name,
            config,
            metrics,
            experiment=str(cfg.mlflow.experiment),
            tracking_uri=str(cfg.mlflow.tracking_uri),
            tags={"model": cell.model, "setting": cell.setting.name, "method": cell.method, "stage": f"eval_{kind}"},
            blocks=record.get("blocks"),
            artifact="metrics.json" if kind == "ppl" else f"{kind}.json",
            join_existing=kind != "ppl",
            parent=str(cfg.mlflow.parent),
        )
    return metrics

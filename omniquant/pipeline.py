"""Pipeline stages over a composed config:
prepare_model → calib_data → act_stats → quantize (calibrate, for OmniQuant) → eval_ppl.

Each stage reads the config, writes one artifact, and validates its inputs before writing
anything. ``run_cell`` chains them in memory for Hydra multirun sweeps.
"""
from __future__ import annotations

import fcntl
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from omniquant import act_stats as act_stats_lib
from omniquant import data as datalib
from omniquant import methods, models, zeroshot
from omniquant.block import attach_act_quant, plain_layers
from omniquant.methods.base import QuantResult
from omniquant.errors import UserError
from omniquant.export.common import QPARAMS_FILE
from omniquant.metrics import metrics_path, peak_rss_gb, read_json, write_json
from omniquant.perplexity import perplexity
from omniquant.setting import QuantSetting
from omniquant import packing
from omniquant import tables as tables_lib
from omniquant.packed import bits_per_weight, load_packed_model
from omniquant.tracking import log_run, log_tables

RECORD = "quant_record.json"
PACKED_FILE = "model.packed.safetensors"
RECORD_METRICS = ("quant_seconds", "peak_rss_gb", "peak_mem_gb", "nan_retries", "calib_epochs", "calib_batch_size",
                  "calib_nsamples", "calib_seqlen")


@dataclass(frozen=True)
class Cell:
    """One (model, setting, method) cell and where its artifacts live."""

    model: str
    setting: QuantSetting
    method: str
    out: Path

    @property
    def run_name(self) -> str:
        return f"{self.model}/{self.setting.name}/{self.method}"

    @property
    def quantized_dir(self) -> Path:
        return self.out / "artifacts" / "quantized" / self.model / self.setting.name / self.method

    @property
    def packed_file(self) -> Path:
        return self.out / "artifacts" / "packed" / self.model / self.setting.name / self.method / PACKED_FILE

    @property
    def calib_file(self) -> Path:
        return self.out / "artifacts" / "calib" / self.model / "calib.safetensors"

    @property
    def act_stats_file(self) -> Path:
        return self.out / "artifacts" / "act_stats" / self.model / "act_stats.safetensors"

    @property
    def state_dir(self) -> Path:
        """Resume files (outside DVC outputs, which DVC deletes before a stage runs)."""
        return self.out / "artifacts" / "state" / self.model / self.setting.name / self.method

    @property
    def metrics_file(self) -> Path:
        return metrics_path(self.out, self.model, self.setting.name, self.method)


def cell_of(cfg: DictConfig) -> Cell:
    """Validate the config's choices and name its cell (raises UserError on bad input)."""
    setting = QuantSetting.from_cfg(cfg.quant)
    method = str(cfg.method.name)
    methods.validate(method, setting)
    models.loading.source_of(cfg.model)
    return Cell(models.model_name(cfg.model), setting, method, Path(cfg.paths.out))


def device_of(cfg: DictConfig) -> torch.device:
    name = str(cfg.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} requested but no CUDA GPU is available; use device=cpu or auto")
    return torch.device(name)


def _load(cfg: DictConfig, path: str, device: torch.device | None = None):
    """Load on ``device`` (default: the configured one) in the configured compute dtype."""
    compute = device_of(cfg)
    dtype = models.loading.resolve_dtype(str(cfg.dtype), compute)
    return models.load_model(path, dtype, device or compute, bool(cfg.model.get("trust_remote_code", False)))


def _base_checkpoint(cfg: DictConfig) -> str:
    """The prepared base checkpoint; parallel sweep jobs wait on a file lock while one of them prepares it."""
    lock = Path(cfg.paths.models) / f".{models.model_name(cfg.model)}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return models.ensure_prepared(cfg.model, cfg.paths.models, cfg.paths.cache)


# --------------------------------------------------------------------------- stages


def prepare_model(cfg: DictConfig) -> Path:
    """Convert/build/validate the model into ``paths.models/<name>``."""
    cell_of(cfg)
    return models.prepare_model(cfg.model, cfg.paths.models, cfg.paths.cache)


def _check_data(cfg: DictConfig, names_splits: list[tuple[str, str]]) -> Path | None:
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
    root = _check_data(cfg, [(calib.dataset, split)])
    rows = datalib.load_rows(calib.dataset, split, root)
    tokens = datalib.tokenize_rows(rows, tokenizer)
    return datalib.calibration_windows(tokens, int(calib.nsamples), int(calib.seqlen), int(cfg.seed))


def calib_data(cfg: DictConfig) -> Path:
    """Sample calibration windows and save them (safetensors) for the quantize stage."""
    cell = cell_of(cfg)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_base_checkpoint(cfg))
    windows = sample_calibration(cfg, tokenizer)
    cell.calib_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell.calib_file.with_suffix(".partial")
    meta = {k: str(v) for k, v in OmegaConf.to_container(cfg.data.calib, resolve=True).items()}
    meta["split"] = calib_split(cfg)
    save_file({"input_ids": windows.contiguous()}, str(tmp), metadata=meta | {"seed": str(cfg.seed)})
    tmp.replace(cell.calib_file)
    return cell.calib_file


def act_stats(cfg: DictConfig) -> Path:
    """Per-channel activation statistics of the FP model on the calibration windows (for LET init)."""
    cell = cell_of(cfg)
    if not cell.calib_file.is_file():
        raise UserError(f"{cell.calib_file} not found: run the calib_data stage for {cell.model} first")
    model, _ = _load(cfg, _base_checkpoint(cfg))
    stats = act_stats_lib.collect(model, load_file(str(cell.calib_file))["input_ids"])
    cell.act_stats_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell.act_stats_file.with_suffix(".partial")
    save_file(stats, str(tmp))
    tmp.replace(cell.act_stats_file)
    return cell.act_stats_file


def _method_context(cfg: DictConfig, cell: Cell, model, calib: torch.Tensor | None) -> methods.MethodContext:
    """Per-setting overrides, activation statistics, resume state and saved parameters for a method."""
    if cell.method not in methods.NEEDS_CALIBRATION:
        return methods.MethodContext()
    if calib is None:
        raise UserError(f"method={cell.method} needs calibration data: run the calib_data stage first")
    overrides = OmegaConf.to_container(cfg.quant.get(cell.method) or OmegaConf.create({}), resolve=True)
    stats = None
    if cell.method in methods.NEEDS_ACT_STATS:
        if cell.act_stats_file.is_file():
            stats = load_file(str(cell.act_stats_file))
        else:
            stats = act_stats_lib.collect(model.to(device_of(cfg)), calib)
            model.to("cpu")
    saved = cfg.method.get("resume_params")
    if saved and not Path(saved).is_file():
        raise UserError(f"method.resume_params={saved} does not exist")
    return methods.MethodContext(
        setting_overrides=overrides,
        profile=OmegaConf.to_container(cfg.get("calibration") or OmegaConf.create({}), resolve=True),
        act_stats=stats,
        state_dir=cell.state_dir if cfg.method.get("resume", True) else None,
        saved_params=load_file(str(saved)) if saved else None,
        device=device_of(cfg),
    )


def _quantize_in_memory(cfg: DictConfig, cell: Cell, model, calib: torch.Tensor | None) -> tuple[QuantResult, dict]:
    """Run the method on the CPU-resident model; returns its result and the quant record."""
    torch.manual_seed(int(cfg.seed))
    ctx = _method_context(cfg, cell, model, calib)
    start = time.perf_counter()
    result = methods.quantize_(model, cell.setting, cfg.method, calib, ctx)
    seconds = time.perf_counter() - start
    record = {"quant_seconds": seconds, "peak_rss_gb": peak_rss_gb()}
    record["peak_mem_gb"] = result.record.get("peak_mem_gb", record["peak_rss_gb"])
    if calib is not None:
        record["calib_nsamples"], record["calib_seqlen"] = int(calib.shape[0]), int(calib.shape[1])
    if "calib" in result.record:  # the effective hyper-parameters after precedence
        record |= {f"calib_{k}": result.record["calib"][k] for k in ("epochs", "batch_size")}
    return result, record | {k: v for k, v in result.record.items() if k != "peak_mem_gb"}


def quantize(cfg: DictConfig) -> Path:
    """Quantize the model and save a fake-quantized HF checkpoint plus its quant record.

    For OmniQuant this is the calibration stage: it also saves the learned parameters
    (``omni_parameters.safetensors``), resumable per block from ``artifacts/state``.
    """
    cell = cell_of(cfg)
    base = _base_checkpoint(cfg)
    calib = load_file(str(cell.calib_file))["input_ids"] if cell.calib_file.is_file() else None
    staging = cell.quantized_dir.with_name(cell.quantized_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if cell.method == "fp":
            record = {"quant_seconds": 0.0, "peak_rss_gb": peak_rss_gb(), "checkpoint": str(Path(base).resolve())}
        else:
            model, tokenizer = _load(cfg, base, torch.device("cpu"))
            result, record = _quantize_in_memory(cfg, cell, model, calib)
            with plain_layers(model):
                model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            save_file(_flat_qparams(result.qparams), str(staging / QPARAMS_FILE))
            if result.learned:
                save_file(result.learned, str(staging / "omni_parameters.safetensors"))
            record["checkpoint"] = None  # this directory
        write_json(staging / RECORD, record | {"setting": cell.setting.name, "method": cell.method})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(cell.quantized_dir, ignore_errors=True)
    staging.rename(cell.quantized_dir)
    shutil.rmtree(cell.state_dir, ignore_errors=True)  # finished: resume files no longer needed
    return cell.quantized_dir


def _flat_qparams(qparams: dict) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t.contiguous() for name, d in qparams.items() for key, t in d.items()}


def _check_eval_data(cfg: DictConfig) -> Path | None:
    """Fail early (before loading anything) if an evaluation split is missing under the data root."""
    return _check_data(cfg, [(name, datalib.dataset(name).eval_split) for name in cfg.eval.datasets])


def evaluate_perplexity(cfg: DictConfig, model, tokenizer, model_name: str) -> dict[str, Any]:
    """``<dataset>_ppl`` and ``<dataset>_windows`` for every dataset in ``eval.datasets``."""
    ev = cfg.eval
    root = _check_eval_data(cfg)
    results: dict[str, Any] = {"eval_seqlen": int(ev.seqlen)}
    for name in ev.datasets:
        tokens = datalib.eval_tokens(name, tokenizer, int(ev.seqlen), root)
        limit = ev.max_windows.get(name) if isinstance(ev.max_windows, Mapping) else ev.max_windows
        res = perplexity(model, tokens, int(ev.seqlen), limit, desc=f"{model_name} {name}")
        results[f"{name}_ppl"] = res.ppl
        results[f"{name}_windows"] = res.windows
        results[f"{name}_total_windows"] = res.total_windows
    return results


def _finish(cfg: DictConfig, cell: Cell, results: dict[str, Any], record: dict[str, Any],
            kind: str = "ppl") -> dict[str, Any]:
    """Merge the quant record, write the cell's metrics JSON (``kind``: ppl, zeroshot, zeroshot_full or
    packed), log it to MLflow.

    Zero-shot and packed metrics go into the MLflow run of the cell's perplexity evaluation when there is one.
    """
    results = results | {k: record[k] for k in RECORD_METRICS if k in record} | {"eval_peak_rss_gb": peak_rss_gb()}
    metrics = {"model": cell.model, "setting": cell.setting.name, "method": cell.method} | results
    grid = cfg.model.get("weight_grid")
    if grid:
        metrics["model_weight_grid"] = str(grid)
    write_json(metrics_path(cell.out, cell.model, cell.setting.name, cell.method, kind), metrics)
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


def _load_evaluated(cfg: DictConfig, cell: Cell) -> tuple[Any, Any, dict[str, Any]]:
    """The cell's model as the quantize stage left it (the base checkpoint for ``method=fp``), with its record."""
    if cell.method == "fp":
        record: dict[str, Any] = {"checkpoint": _base_checkpoint(cfg)}
    else:
        record_file = cell.quantized_dir / RECORD
        if not record_file.is_file():
            raise UserError(f"{record_file} not found: run the quantize stage for {cell.run_name} first")
        record = read_json(record_file)
    model, tokenizer = _load(cfg, record.get("checkpoint") or str(cell.quantized_dir))
    if cell.setting.act_spec is not None and cell.method != "fp":
        attach_act_quant(model, cell.setting.act_spec)  # weights are fake-quantized; activations too
    return model, tokenizer, record


def eval_ppl(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate the quantize stage's checkpoint; write ``metrics/<model>/<setting>/<method>.json``."""
    cell = cell_of(cfg)
    _check_eval_data(cfg)
    model, tokenizer, record = _load_evaluated(cfg, cell)
    return _finish(cfg, cell, evaluate_perplexity(cfg, model, tokenizer, cell.model), record)


def pack(cfg: DictConfig) -> dict[str, Any]:
    """Pack the quantize stage's weights into the low-bit layout (:mod:`omniquant.packing`), rebuild the
    model from the packed file alone and evaluate it with the perplexity code; writes
    ``metrics/<model>/<setting>/<method>.packed.json`` (``packed_<dataset>_ppl``, sizes, bits per weight)."""
    cell = cell_of(cfg)
    spec = cell.setting.weight_spec
    if spec is None or cell.setting.act_spec is not None:
        raise UserError(f"pack: {cell.setting.name} is not a weight-only setting; pack wNa16 cells (activations "
                        "of weight-activation settings are quantized at run time)")
    _check_eval_data(cfg)
    model, tokenizer, record = _load_evaluated(cfg, cell)
    qparams = packing.read_qparams(cell.quantized_dir / QPARAMS_FILE)
    staging = cell.packed_file.parent.with_name(cell.method + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        packing.save_packed(staging / PACKED_FILE, model.cpu(), qparams, spec)
    except ValueError as err:
        raise UserError(f"pack {cell.run_name}: {err}") from None
    tokenizer.save_pretrained(staging)
    del model
    shutil.rmtree(cell.packed_file.parent, ignore_errors=True)
    staging.rename(cell.packed_file.parent)
    packed = load_packed_model(cell.packed_file).to(device_of(cfg))
    ppl = evaluate_perplexity(cfg, packed, tokenizer, f"{cell.model} packed")
    base = Path(_base_checkpoint(cfg))
    results = {f"packed_{k}" if k.endswith("_ppl") else k: v for k, v in ppl.items()} | {
        "packed_bytes": cell.packed_file.stat().st_size,
        "fp_bytes": sum(f.stat().st_size for f in base.glob("*.safetensors")),
        "bits_per_weight": bits_per_weight(packed),
    }
    return _finish(cfg, cell, results, record, kind="packed")


def _require_packed(cell: Cell) -> None:
    if not cell.packed_file.is_file():
        raise UserError(f"{cell.packed_file} not found: run the pack stage for {cell.run_name} first")


def mlc_compile(cfg: DictConfig) -> dict[str, Any]:
    """MLC-LLM artifacts of the cell and its TVM build (``llvm``; CUDA when a GPU is present), logits
    checked against the PyTorch packed model; writes ``metrics/<model>/<setting>/<method>.mlc.json``."""
    cell = cell_of(cfg)
    _require_packed(cell)
    from omniquant import mlc
    from omniquant.export import load_quantized

    out = cell.out / "artifacts" / "mlc" / cell.model / cell.setting.name / cell.method
    shutil.rmtree(out, ignore_errors=True)
    manifest = mlc.write_mlc_artifacts(load_quantized(cell.quantized_dir, cell.setting), out / "mlc-llm")
    results = {"mlc_route": manifest["route"], "mlc_quantization": manifest["quantization"]}
    results |= {f"llvm_{k}": v for k, v in mlc.build_tvm(cell.packed_file, out / "tvm").items()}
    results["cuda_status"] = ("skipped: the TVM CUDA build is not implemented yet" if torch.cuda.is_available()
                              else "skipped: no CUDA GPU on this machine")
    return _finish(cfg, cell, results, {}, kind="mlc")


def bench_speed(cfg: DictConfig) -> dict[str, Any]:
    """Prefill and decode tokens/s, peak memory and share of the bandwidth roofline of the cell's packed
    model against FP, torch's int4 path and the TVM build; writes ``<method>.speed.json``."""
    from omniquant import bench

    cell = cell_of(cfg)
    _require_packed(cell)
    b, device = cfg.bench, device_of(cfg)
    config = bench.BenchConfig(prefill_len=int(b.prefill_len), batches=tuple(b.batches),
                               new_tokens=tuple(b.new_tokens), prompt_len=int(b.prompt_len))
    results: dict[str, Any] = {"device": bench.device_name(device),
                               "variants": bench.bench_variants(cell.packed_file, device, tuple(b.variants), config)}
    if device.type == "cuda":
        shapes = {"llama2-7b": bench.llama2_7b_config}
        for name in b.random_shapes:
            path = cell.out / "artifacts" / "bench" / f"{name}-{cell.setting.name}.packed.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            made = bench.random_packed_model(shapes[name](), cell.setting, path)
            results[f"random_{name}"] = {"note": made["note"], "parameters": made["parameters"],
                                         "variants": bench.bench_variants(path, device, tuple(b.variants), config)}
    return _finish(cfg, cell, results, {}, kind="speed")


def _zeroshot_root(cfg: DictConfig) -> Path | None:
    zs = cfg.eval.zeroshot
    zeroshot.validate(list(zs.tasks), str(zs.metric))
    return datalib.data_root(cfg.data.root)


def _zeroshot_kind(cfg: DictConfig) -> str:
    """Metrics file kind: ``zeroshot`` for first-N-document runs, ``zeroshot_full`` for the full task sets."""
    return "zeroshot" if cfg.eval.zeroshot.limit is not None else "zeroshot_full"


def evaluate_zeroshot(cfg: DictConfig, cell: Cell, model, tokenizer) -> dict[str, Any]:
    """Zero-shot metrics (``<task>_acc``, ``<task>_acc_norm``, ``zeroshot_avg``) for ``eval.zeroshot``.

    With ``eval.zeroshot.resume`` scored requests are cached under ``paths.cache``, keyed by the
    weights' fingerprint, so an interrupted evaluation resumes instead of starting over.
    """
    zs = cfg.eval.zeroshot
    limit = None if zs.limit is None else int(zs.limit)
    cache = None
    if zs.resume:
        key = zeroshot.fingerprint(model, cell.run_name)  # the run name carries the activation setting
        cache = Path(cfg.paths.cache) / "lm_eval" / cell.model / cell.setting.name / cell.method / key
    return zeroshot.evaluate(model, tokenizer, list(zs.tasks), _zeroshot_root(cfg), limit=limit,
                             batch_size=int(zs.batch_size), metric=str(zs.metric), device=device_of(cfg),
                             cache=cache)


def eval_zeroshot(cfg: DictConfig) -> dict[str, Any]:
    """Zero-shot accuracy of the cell's model; writes ``metrics/<model>/<setting>/<method>.zeroshot.json``
    (``.zeroshot_full.json`` for the full task sets)."""
    cell = cell_of(cfg)
    _zeroshot_root(cfg)
    model, tokenizer, record = _load_evaluated(cfg, cell)
    return _finish(cfg, cell, evaluate_zeroshot(cfg, cell, model, tokenizer), record, kind=_zeroshot_kind(cfg))


def tables(cfg: DictConfig) -> list[Path]:
    """Tables 1, 2 and A1 (Markdown, CSV) and the perplexity plot from ``<paths.out>/metrics`` into ``<paths.out>/results``."""
    zeroshot.validate(list(cfg.eval.zeroshot.tasks), str(cfg.eval.zeroshot.metric))
    root = Path(cfg.paths.out)
    if not (root / "metrics").is_dir():
        raise UserError(f"{root / 'metrics'} not found: run the evaluation stages first")
    written = tables_lib.write_tables(root / "metrics", root / "results", str(cfg.eval.zeroshot.metric))
    if cfg.mlflow.enabled:
        log_tables(written, experiment=str(cfg.mlflow.experiment), tracking_uri=str(cfg.mlflow.tracking_uri),
                   parent=str(cfg.mlflow.parent))
    for path in written:
        print(f"wrote {path}")
    return written


def run_cell(cfg: DictConfig) -> dict[str, Any]:
    """All stages for one cell in memory (Hydra multirun entry); no checkpoint is written."""
    cell = cell_of(cfg)
    _check_eval_data(cfg)
    if cfg.eval.zeroshot.enabled:
        _zeroshot_root(cfg)
    model, tokenizer = _load(cfg, _base_checkpoint(cfg), torch.device("cpu"))
    calib = sample_calibration(cfg, tokenizer) if cell.method in methods.NEEDS_CALIBRATION else None
    _, record = _quantize_in_memory(cfg, cell, model, calib)
    model.to(device_of(cfg))
    metrics = _finish(cfg, cell, evaluate_perplexity(cfg, model, tokenizer, cell.model), record)
    if cfg.eval.zeroshot.enabled:
        metrics |= _finish(cfg, cell, evaluate_zeroshot(cfg, cell, model, tokenizer), record,
                           kind=_zeroshot_kind(cfg))
    return metrics

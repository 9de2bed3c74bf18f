"""MLflow logging: flattened config as params, metrics, metrics JSON and config as artifacts."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become their string form."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _connect(experiment: str, tracking_uri: str | None):
    """The ``mlflow`` module, pointed at the store (``MLFLOW_TRACKING_URI`` wins) and the experiment."""
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    import mlflow

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or DEFAULT_TRACKING_URI)
    mlflow.set_experiment(experiment)
    return mlflow


def log_run(
    run_name: str,
    config: Mapping[str, Any],
    metrics: Mapping[str, Any],
    *,
    experiment: str,
    tracking_uri: str | None = None,
    tags: Mapping[str, str] | None = None,
    blocks: list[Mapping[str, Any]] | None = None,
    artifact: str = "metrics.json",
    join_existing: bool = False,
) -> str:
    """Log one run; returns its run id. ``MLFLOW_TRACKING_URI`` overrides ``tracking_uri``.

    ``join_existing``: add the metrics to the latest run of that name (another evaluation of the
    same cell) instead of starting a new one; its params are kept.
    """
    mlflow = _connect(experiment, tracking_uri)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    existing = _latest_run_id(mlflow, experiment, run_name) if join_existing else None
    if existing:
        with mlflow.start_run(run_id=existing) as run:
            mlflow.log_metrics(numeric)
            mlflow.log_dict(dict(metrics), artifact)
            return run.info.run_id
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {})) as run:
        params = {k: "null" if v is None else str(v)[:6000] for k, v in flatten(config).items()}
        mlflow.log_params(params)
        mlflow.log_metrics(numeric)
        mlflow.log_dict(dict(metrics), artifact)
        mlflow.log_dict(dict(config), "config/resolved.yaml")
        if blocks:
            _log_blocks(mlflow, blocks)
        return run.info.run_id


def _latest_run_id(mlflow, experiment: str, run_name: str) -> str | None:
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].info.run_id if runs else None


def _log_blocks(mlflow, blocks: list[Mapping[str, Any]]) -> None:
    """Per-block calibration records: time and peak memory (step = block), loss curves (step = epoch)."""
    for rec in blocks:
        i = int(rec["block"])
        mlflow.log_metric("block_seconds", float(rec["seconds"]), step=i)
        mlflow.log_metric("block_peak_mem_gb", float(rec["peak_mem_gb"]), step=i)
        for epoch, loss in enumerate(rec.get("epoch_loss", [])):
            mlflow.log_metric(f"calib_loss/block_{i:03d}", float(loss), step=epoch)
        if rec.get("epoch_loss"):
            mlflow.log_metric("block_final_loss", float(rec["epoch_loss"][-1]), step=i)
    mlflow.log_dict({"blocks": list(blocks)}, "calibration/blocks.json")


def log_tables(files: list[Path], *, experiment: str, tracking_uri: str | None = None) -> str:
    """One ``tables`` run: each CSV as an MLflow table, every file (Markdown, CSV, PNG) as an artifact."""
    import csv

    mlflow = _connect(experiment, tracking_uri)
    with mlflow.start_run(run_name="tables", tags={"stage": "tables"}) as run:
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="tables")
            if path.suffix == ".csv":
                with open(path, newline="") as fh:
                    rows = list(csv.reader(fh))
                header, body = rows[0], rows[1:]
                columns = {name: [row[i] for row in body] for i, name in enumerate(header)}
                mlflow.log_table(data=columns, artifact_file=f"tables/{path.stem}.json")
        return run.info.run_id

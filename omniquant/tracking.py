"""MLflow logging: flattened config as params, metrics, metrics JSON and config as artifacts.

Cell runs nest under one parent run (MLflow's ``mlflow.parentRunId`` tag): the ``mlflow.parent``
run (``grid`` for ``dvc repro``; the tables are logged on it), or, in a Hydra ``-m`` sweep, the
sweep's own parent run, which :class:`SweepCallback` opens before any job starts and hands to the
jobs (in-process or in joblib/SLURM workers) through ``OMNIQUANT_MLFLOW_PARENT_ID``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PARENT_ENV = "OMNIQUANT_MLFLOW_PARENT_ID"
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "omniquant.role"


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
    parent: str | None = None,
) -> str:
    """Log one run; returns its run id. ``MLFLOW_TRACKING_URI`` overrides ``tracking_uri``.

    ``parent``: name of the run to nest under (:func:`parent_run_id`; a sweep's parent wins).
    ``join_existing``: add the metrics to the latest run of that name under the same parent (another
    evaluation of the same cell) instead of starting a new one; its params are kept.
    """
    mlflow = _connect(experiment, tracking_uri)
    figures = {k: v for k, v in metrics.items() if k != "spec"}  # the spec is in the logged config
    numeric = {k: float(v) for k, v in flatten(figures).items()  # nested records (speed variants) by dotted name
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    parent_id = parent_run_id(mlflow, experiment, parent) if parent or os.environ.get(PARENT_ENV) else None
    existing = _latest_run_id(mlflow, run_name, parent_id) if join_existing else None
    if existing:
        with mlflow.start_run(run_id=existing) as run:
            mlflow.log_metrics(numeric)
            mlflow.log_dict(dict(metrics), artifact)
            return run.info.run_id
    nesting = {PARENT_TAG: parent_id} if parent_id else {}
    with mlflow.start_run(run_name=run_name, tags=dict(tags or {}) | nesting) as run:
        params = {k: "null" if v is None else str(v)[:6000] for k, v in flatten(config).items()}
        mlflow.log_params(params)
        mlflow.log_metrics(numeric)
        mlflow.log_dict(dict(metrics), artifact)
        mlflow.log_dict(dict(config), "config/resolved.yaml")
        if blocks:
            _log_blocks(mlflow, blocks)
        return run.info.run_id


def parent_run_id(mlflow, experiment: str, name: str | None) -> str:
    """The sweep's parent run (``OMNIQUANT_MLFLOW_PARENT_ID``), else the latest parent run ``name``, created if missing."""
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    found = mlflow.search_runs(filter_string=f"attributes.run_name = '{name}' and tags.`{ROLE_TAG}` = 'parent'",
                               order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if found:
        return found[0].info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(mlflow.get_experiment_by_name(experiment).experiment_id, run_name=name,
                            tags={ROLE_TAG: "parent"})
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _latest_run_id(mlflow, run_name: str, parent_id: str | None) -> str | None:
    query = f"attributes.run_name = '{run_name}'"
    if parent_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_id}'"
    runs = mlflow.search_runs(filter_string=query, order_by=["attributes.start_time DESC"], max_results=1,
                              output_format="list")
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


def log_tables(files: list[Path], *, experiment: str, tracking_uri: str | None = None,
               parent: str = "grid") -> str:
    """Log the tables on the ``parent`` run: each CSV as an MLflow table, every file (Markdown, CSV, PNG) as an artifact."""
    import csv

    mlflow = _connect(experiment, tracking_uri)
    with mlflow.start_run(run_id=parent_run_id(mlflow, experiment, parent)) as run:
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="tables")
            if path.suffix == ".csv":
                with open(path, newline="") as fh:
                    rows = list(csv.reader(fh))
                header, body = rows[0], rows[1:]
                columns = {name: [row[i] for row in body] for i, name in enumerate(header)}
                mlflow.log_table(data=columns, artifact_file=f"tables/{path.stem}.json")
        return run.info.run_id


class SweepCallback(Callback):
    """Hydra callback: one MLflow parent run per ``-m`` sweep, its id exported to the jobs.

    Registered in ``conf/config.yaml`` (``hydra.callbacks.mlflow_sweep``); does nothing when
    ``mlflow.enabled`` is false.
    """

    def on_multirun_start(self, config, **_: Any) -> None:
        if not config.mlflow.enabled:
            return
        mlflow = _connect(str(config.mlflow.experiment), str(config.mlflow.tracking_uri))
        overrides = " ".join(config.hydra.overrides.task)
        with mlflow.start_run(run_name=f"sweep {Path(config.hydra.sweep.dir).as_posix()}",
                              tags={ROLE_TAG: "parent", "sweep_overrides": overrides}) as run:
            mlflow.log_param("sweep_overrides", overrides[:6000])
            os.environ[PARENT_ENV] = run.info.run_id

    def on_multirun_end(self, config, **_: Any) -> None:
        os.environ.pop(PARENT_ENV, None)

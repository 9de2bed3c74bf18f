"""Stage ``tables``: the paper-style tables and the perplexity plot from every metrics file."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from omniquant import tables as tables_lib
from omniquant import zeroshot
from omniquant.errors import UserError
from omniquant.tracking import log_tables


def tables(cfg: DictConfig) -> list[Path]:
    """Tables 1, 2 and A1 (Markdown, CSV) and the perplexity plot from the metrics of the grid's models
    (``<paths.out>/metrics/<grid.models>``) into ``<paths.out>/<grid.results>``."""
    zeroshot.validate(list(cfg.eval.zeroshot.tasks), str(cfg.eval.zeroshot.metric))
    root = Path(cfg.paths.out)
    if not (root / "metrics").is_dir():
        raise UserError(f"{root / 'metrics'} not found: run the evaluation stages first")
    written = tables_lib.write_tables(root / "metrics", root / str(cfg.grid.results), str(cfg.eval.zeroshot.metric),
                                      list(cfg.grid.models))
    if cfg.mlflow.enabled:
        log_tables(written, experiment=str(cfg.mlflow.experiment), tracking_uri=str(cfg.mlflow.tracking_uri),
                   parent=str(cfg.mlflow.parent))
    for path in written:
        print(f"wrote {path}")
    return written

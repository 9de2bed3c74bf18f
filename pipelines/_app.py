"""Shared Hydra wrapper: every stage script is ``run_stage(<omniquant.pipeline function>)``."""
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from omniquant.errors import exit_on_user_error

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run_stage(stage: Callable[[DictConfig], Any]) -> None:
    """Compose ``conf/`` with the command-line overrides (``-m`` for sweeps) and run ``stage``."""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    @exit_on_user_error
    def main(cfg: DictConfig) -> None:
        stage(cfg)

    main()

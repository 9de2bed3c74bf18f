"""Shared Hydra wrapper: every stage script is ``run_stage(<omniquant.stages.<stage> function>)``."""
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from omniquant.errors import EXIT_USER_ERROR, exit_on_user_error, install_signal_handlers

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def unknown_group_option(argv: list[str], conf_dir: Path = CONF_DIR) -> str | None:
    """One-line message for ``group=option`` overrides naming a config file that does not exist."""
    groups = {p.relative_to(conf_dir).as_posix() for p in conf_dir.rglob("*") if p.is_dir()}  # eval/zeroshot too
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in groups:
            continue
        for option in value.split(","):  # multirun lists
            if not (conf_dir / key / f"{option}.yaml").is_file():
                known = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
                return f"unknown {key} {option!r}; available: {', '.join(known)}"
    return None


def run_stage(stage: Callable[[DictConfig], Any]) -> None:
    """Compose ``conf/`` with the command-line overrides (``-m`` for sweeps) and run ``stage``."""
    install_signal_handlers()
    problem = unknown_group_option(sys.argv[1:])
    if problem:
        print(f"omniquant: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    @exit_on_user_error
    def main(cfg: DictConfig) -> None:
        stage(cfg)

    main()

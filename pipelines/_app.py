"""Shared Hydra wrapper: every stage script is ``run_stage(<omniquant.stages.<stage> function>)``."""
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from omniquant import schema
from omniquant.errors import UserError, exit_on_user_error, install_signal_handlers

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


SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "the slurm extra: pip install -e '.[slurm]'")
LAUNCHER_PLUGINS = {  # launcher -> (its plugin module, how to install it)
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "the project's dependencies: bash pipelines/setup.sh"),
    "submitit_local": SUBMITIT, "submitit_slurm": SUBMITIT}


def missing_launcher(argv: list[str]) -> str | None:
    """One-line message for a ``hydra/launcher=`` whose plugin is not installed (Hydra's own is many lines)."""
    import importlib.util

    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value in LAUNCHER_PLUGINS:
            module, install = LAUNCHER_PLUGINS[value]
            if importlib.util.find_spec(module) is None:
                return f"hydra/launcher={value} needs the {module.split('.')[-1]} plugin, from {install}"
    return None


def _multirun(argv: list[str]) -> bool:
    return any(a in ("-m", "--multirun") for a in argv)


GROUPS = {"prepare_model": ("model", "run")}  # stages that read only some groups; the others check all


def check_overrides(argv: list[str], groups: tuple[str, ...] | None = None) -> None:
    """Compose the config of a single run and validate it (:mod:`omniquant.schema`) before Hydra creates
    its run folder, so that a bad override writes nothing. A sweep (``-m``) validates each job instead."""
    problem = unknown_group_option(argv) or missing_launcher(argv)
    if problem:
        raise UserError(problem)
    if _multirun(argv) or any(a.startswith("-") for a in argv):  # --help, --cfg, ...: Hydra's own
        return
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=argv)
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(str(err).splitlines()[0]) from None
    schema.validate(cfg, groups)


def run_stage(stage: Callable[[DictConfig], Any]) -> None:
    """Compose ``conf/`` with the command-line overrides (``-m`` for sweeps), validate it and run ``stage``."""
    install_signal_handlers()
    groups = GROUPS.get(stage.__name__)
    exit_on_user_error(check_overrides)(sys.argv[1:], groups)

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    @exit_on_user_error
    def main(cfg: DictConfig) -> None:
        schema.validate(cfg, groups)
        stage(cfg)

    main()

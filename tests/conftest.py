"""Shared fixtures: repo paths, the data root, composed configs, tiny models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from omniquant.models.tiny import tiny_llama

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def _data_root() -> Path | None:
    for candidate in (os.environ.get("OMNIQUANT_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "wikitext-2-raw-v1" / "wiki.test.raw").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        pytest.skip("evaluation data not found: set OMNIQUANT_DATA_DIR to a folder laid out like shared/data")
    return root


@pytest.fixture
def make_cfg(tmp_path):
    """Compose conf/ with overrides; outputs go to a temp dir and MLflow is off unless asked."""

    def _make(*overrides: str):
        base = [f"paths.out={tmp_path}", f"paths.models={tmp_path / 'models'}", "mlflow.enabled=false"]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=base + list(overrides))

    return _make


@pytest.fixture(params=[4, 2], ids=["mha", "gqa"])
def tiny(request):
    """A tiny random Llama (MHA and GQA) and its byte tokenizer."""
    return tiny_llama(num_key_value_heads=request.param)

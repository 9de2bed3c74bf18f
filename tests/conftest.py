"""Shared fixtures: repo paths, the data root, composed configs, tiny models."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from omniquant.arch import adapter_of
from omniquant.block import BlockConfig, QuantBlock
from omniquant.models.tiny import byte_tokenizer, tiny_llama

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


def tiny_llama_with_merges(**overrides) -> tuple[torch.nn.Module, PreTrainedTokenizerFast]:
    """A tiny random Llama whose byte tokenizer has one merge (``Ġ Ġ``, token 258): llama.cpp refuses a
    byte-level BPE vocabulary without merges, and gguf-py cannot write an empty merges list."""
    spec = json.loads(byte_tokenizer().backend_tokenizer.to_str())
    spec["model"]["vocab"]["ĠĠ"] = 258
    spec["model"]["merges"] = [["Ġ", "Ġ"]]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token="<s>",
                                  eos_token="</s>")
    model, _ = tiny_llama(**overrides)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model, tok


@torch.no_grad()
def assert_blocks_equal_hf_layers(model, ids: torch.Tensor, atol: float) -> None:
    """Our block forward equals each HF decoder layer (≤ ``atol``, relative to the hidden states' scale when
    that exceeds 1) with the masks and positions HF passes, and gives the next layer's input of HF's own forward."""
    adapter = adapter_of(model)
    hidden = model(ids, output_hidden_states=True).hidden_states
    x = adapter.embed(model, ids)
    torch.testing.assert_close(x, hidden[0], rtol=0, atol=atol / 10)  # embedding scale, learned positions
    kwargs = adapter.layer_inputs(model, x[:1])
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(layers):
        ref = layer(x, **kwargs[i])
        ours = QuantBlock(layer, BlockConfig(weight=None))(x, **kwargs[i])
        tol = atol * max(1.0, ref.abs().max().item())
        assert (ours - ref).abs().max() <= tol, f"layer {i}"
        if i + 1 < len(layers):  # the layer inputs HF's own forward computes
            assert (ours - hidden[i + 1]).abs().max() <= tol, f"layer {i}"
        x = ours

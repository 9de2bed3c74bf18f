"""Content keys: short hashes of what a result depends on (tensors, configs, files), for resume state,
caches and records; and safetensors files whose bytes depend on their content alone."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import save_file


def content_hash(value: Any) -> str:
    """A short sha256 of a value: tensors by their bytes, dicts and lists of them by their items, anything
    else by its JSON."""
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            digest.update(f"{v.dtype}{tuple(v.shape)}".encode())
            digest.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                digest.update(json.dumps(str(k)).encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)) and any(isinstance(x, (torch.Tensor, dict)) for x in v):
            for x in v:
                feed(x)
        else:
            digest.update(json.dumps(v, sort_keys=True, default=str).encode())

    feed(value)
    return digest.hexdigest()[:16]


def files_hash(paths: Iterable[Path]) -> str:
    """A short sha256 over the names and bytes of ``paths`` (in the given order)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` and ``metadata`` to safetensors file ``path`` through ``path``.partial (no half-written
    file under ``path``), its header's keys sorted: safetensors writes the metadata in hash-map order, which
    changes from one process to the next, and DVC would see the same content as a new file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        canonical = json.dumps(json.loads(fh.read(size)), sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode()
        if len(canonical) > size:
            raise RuntimeError(f"{path}: the sorted safetensors header is longer than the written one")
        fh.seek(8)
        fh.write(canonical.ljust(size))  # safetensors pads its header with spaces
    tmp.replace(path)
    return path

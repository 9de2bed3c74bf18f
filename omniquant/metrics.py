"""JSON files (written atomically) and resource measurements; where metrics files live: :mod:`omniquant.layout`."""
from __future__ import annotations

import json
import os
import resource
import tempfile
from pathlib import Path
from typing import Any


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU model and its logical CPU count, from ``cpuinfo`` (``"cpu"`` where it cannot be read)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return "cpu"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0]} ({len(names)} logical CPUs)" if names else "cpu"


def machine() -> str:
    """The CPU this process runs on and torch's vector ISA there (float results depend on both)."""
    import torch

    return f"{cpu_model()}, torch {torch.backends.cpu.get_cpu_capability()}"


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """Write JSON atomically (temp file + rename), so an interrupt never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict[str, Any]:
    with open(path) as fh:
        return json.load(fh)


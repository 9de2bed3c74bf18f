"""Safetensors files whose bytes depend on their content alone (``content.save_tensors``)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open

from omniquant.content import save_tensors

WRITE = """
import sys, torch
from omniquant.content import save_tensors
meta = {k: str(i) for i, k in enumerate(["seed", "model", "split", "dataset", "nsamples", "seqlen", "windows"])}
save_tensors({"b": torch.arange(6).reshape(2, 3), "a": torch.ones(4)}, sys.argv[1], meta)
"""


def test_the_same_content_gives_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes metadata in hash-map order, seeded anew in every process; the saved bytes must not
    follow it (DVC keys stages by them)."""
    files = [tmp_path / f"{i}.safetensors" for i in range(6)]
    for f in files:
        subprocess.run([sys.executable, "-c", WRITE, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    assert not list(tmp_path.glob("*.partial"))


def test_the_file_reads_back_and_its_header_is_sorted(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"z": torch.randn(3, 5), "m": torch.arange(7, dtype=torch.int32)}
    meta = {"zeta": "1", "alpha": json.dumps({"nested": [1, "é"]}), "mid": "x"}
    assert save_tensors(tensors, path, meta) == path
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    data = path.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(meta)

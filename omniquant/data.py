"""Text datasets for perplexity and calibration: local data root first, HF hub otherwise.

Rows reproduce the Hugging Face builders exactly (see the data root's MANIFEST.md):
WikiText-2 keeps a non-blank line as ``line + "\\n"`` and a blank one as ``""``; PTB rows are
``line.strip()``. The perplexity protocol joins rows with ``"\\n\\n"`` (GPTQ/OmniQuant).
"""
from __future__ import annotations

import gzip
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedTokenizerBase

from omniquant.errors import UserError

DATA_DIR_ENV = "OMNIQUANT_DATA_DIR"
C4_EVAL_DOCS = 256  # GPTQ's c4 protocol: 256 random 2048-token windows, random.seed(0)


def _lines(text: str) -> list[str]:
    """Lines split on ``\\n`` only (as a file iterates), without a trailing empty piece."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def wikitext_rows(text: str) -> list[str]:
    """HF ``wikitext`` rows: one per line; non-blank lines keep their newline, blank ones are ``""``."""
    return [line + "\n" if line.strip() else "" for line in _lines(text)]


def ptb_rows(text: str) -> list[str]:
    """HF ``ptb_text_only`` rows: one per line, stripped."""
    return [line.strip() for line in _lines(text)]


def c4_rows(text: str) -> list[str]:
    return [json.loads(line)["text"] for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class TextDataset:
    """A text corpus: local file per split, hub fallback, and its row semantics."""

    name: str
    files: dict[str, str]  # split -> path relative to the data root
    hub: tuple[str, str | None, str]  # (hub dataset id, config name, text column)
    rows: Callable[[str], list[str]]
    eval_split: str  # the split the paper's perplexity uses


DATASETS: dict[str, TextDataset] = {
    "wikitext2": TextDataset(
        name="wikitext2",
        files={
            "test": "wikitext-2-raw-v1/wiki.test.raw",
            "validation": "wikitext-2-raw-v1/wiki.valid.raw",
            "train": "wikitext-2-raw-v1/wiki.train.raw",
        },
        hub=("Salesforce/wikitext", "wikitext-2-raw-v1", "text"),
        rows=wikitext_rows,
        eval_split="test",
    ),
    "ptb": TextDataset(
        name="ptb",
        files={
            "test": "ptb_text_only/ptb.test.txt",
            "validation": "ptb_text_only/ptb.valid.txt",
            "train": "ptb_text_only/ptb.train.txt",
        },
        hub=("ptb-text-only/ptb_text_only", "penn_treebank", "sentence"),
        rows=ptb_rows,
        eval_split="validation",  # GPTQ's "ptb" perplexity uses the validation split
    ),
    "c4": TextDataset(
        name="c4",
        files={
            "validation": "c4/c4-validation.00000-of-00008.json.gz",
            "train": "c4/c4-train.00000-of-01024.json.gz",
        },
        hub=("allenai/c4", "en", "text"),
        rows=c4_rows,
        eval_split="validation",
    ),
}


def dataset(name: str) -> TextDataset:
    if name not in DATASETS:
        raise UserError(f"dataset {name!r} is unknown; available: {', '.join(DATASETS)}")
    return DATASETS[name]


def data_root(configured: str | None) -> Path | None:
    """The configured data root, else ``$OMNIQUANT_DATA_DIR``, else None (use the hub)."""
    root = configured or os.environ.get(DATA_DIR_ENV)
    return Path(root).expanduser() if root else None


def local_file(ds: TextDataset, split: str, root: Path | None) -> Path | None:
    """The split's file under ``root`` if it exists; None when the split is not local."""
    if split not in ds.files:
        raise UserError(f"{ds.name} has no split {split!r}; available: {', '.join(ds.files)}")
    if root is None:
        return None
    path = root / ds.files[split]
    return path if path.is_file() else None


def has_split(name: str, split: str, root: Path | None) -> bool:
    """Whether ``name/split`` is available locally (no hub access attempted)."""
    return local_file(dataset(name), split, root) is not None


def load_rows(name: str, split: str, root: Path | None) -> list[str]:
    """Rows of ``name/split`` from the data root, or from the HF hub when no root is set."""
    ds = dataset(name)
    path = local_file(ds, split, root)
    if path is not None:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            return ds.rows(fh.read())
    if root is not None:
        raise UserError(
            f"missing data file {root / ds.files[split]} ({ds.name} {split}); put it there "
            f"(layout: see README 'Offline data'), or point data.root / ${DATA_DIR_ENV} at a folder that has it"
        )
    return _hub_rows(ds, split)


def _hub_rows(ds: TextDataset, split: str) -> list[str]:
    hub_id, config, column = ds.hub
    try:
        from datasets import load_dataset

        return list(load_dataset(hub_id, config, split=split)[column])
    except Exception as err:  # network, missing builder, ...: one clear message
        raise UserError(
            f"could not load {ds.name} {split} from the HF hub ({type(err).__name__}); offline? "
            f"set ${DATA_DIR_ENV} (or data.root=...) to a local data folder, see README 'Offline data'"
        ) from None


def tokenize_rows(rows: list[str], tokenizer: PreTrainedTokenizerBase, joiner: str = "\n\n") -> torch.Tensor:
    """Join rows and tokenize once: ``[1, L]`` int64."""
    return tokenizer(joiner.join(rows), return_tensors="pt", verbose=False).input_ids


def eval_tokens(name: str, tokenizer: PreTrainedTokenizerBase, seqlen: int, root: Path | None) -> torch.Tensor:
    """The token stream the perplexity protocol runs over (``[1, L]``)."""
    ds = dataset(name)
    rows = load_rows(name, ds.eval_split, root)
    if name != "c4":
        return tokenize_rows(rows, tokenizer)
    # GPTQ c4: 256 documents longer than seqlen, one random window each, seed 0.
    rng = random.Random(0)
    windows = []
    while len(windows) < C4_EVAL_DOCS:
        ids = tokenizer(rows[rng.randint(0, len(rows) - 1)], return_tensors="pt").input_ids
        if ids.shape[1] > seqlen:
            start = rng.randint(0, ids.shape[1] - seqlen - 1)
            windows.append(ids[:, start : start + seqlen])
    return torch.cat(windows, dim=1)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ-style calibration set: ``nsamples`` random windows of ``seqlen`` tokens, ``[n, seqlen]``."""
    length = tokens.shape[-1]
    if length <= seqlen + 1:
        raise UserError(f"calibration text has {length} tokens, fewer than seqlen={seqlen}+2; lower calib.seqlen")
    if nsamples * seqlen > length:
        print(f"omniquant: the calibration text has {length} tokens, fewer than nsamples x seqlen = "
              f"{nsamples} x {seqlen}: the windows overlap")
    rng = random.Random(seed)
    starts = [rng.randint(0, length - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([tokens[0, s : s + seqlen] for s in starts])

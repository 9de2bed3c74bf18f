"""Local task files (the ``../shared/data`` layout) read into the schema of the HF datasets that
lm-eval's stock task definitions expect, so the stock prompts apply unchanged.

``FILES`` says which files each task needs under the data root; ``load(task, root)`` returns a
``datasets.DatasetDict`` holding the one split the task evaluates.
"""
from __future__ import annotations

import bz2
import json
from pathlib import Path
from typing import Callable, Iterator

import datasets

# task -> files it needs, relative to the data root
FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("ai2_arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("ai2_arc/ARC-Challenge-Test.jsonl",),
    "boolq": ("boolq/dev.jsonl",),
    "hellaswag": ("hellaswag_llamacpp_format/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl",),
}
# tasks whose only local copy is a third-party reformatting: their results carry "_derived"
DERIVED: dict[str, str] = {
    "hellaswag": "llama.cpp text format (activity_label + ': ' + ctx per task): the ctx_a/ctx_b boundary is lost, "
                 "so the stock ctx_b capitalisation cannot be applied",
}


def missing_files(task: str, root: Path) -> list[Path]:
    return [root / rel for rel in FILES[task] if not (root / rel).is_file()]


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _piqa(root: Path) -> list[dict]:
    rows, labels = list(_jsonl(root / FILES["piqa"][0])), _labels(root / FILES["piqa"][1])
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)} for r, y in zip(rows, labels, strict=True)]


def _arc(task: str) -> Callable[[Path], list[dict]]:
    def read(root: Path) -> list[dict]:
        return [{"id": r["id"], "question": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]} for r in _jsonl(root / FILES[task][0])]
    return read


def _boolq(root: Path) -> list[dict]:
    # super_glue/boolq (what lm-eval reads) prefixes the passage with its title: "<title> -- <passage>"
    return [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i, "label": int(r["answer"])}
            for i, r in enumerate(_jsonl(root / FILES["boolq"][0]))]


def _hellaswag(root: Path) -> list[dict]:
    with bz2.open(root / FILES["hellaswag"][0], "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    rows = []
    for i in range(0, len(lines) - 5, 6):
        label, _, ctx = lines[i].partition(": ")
        rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                     "endings": lines[i + 2:i + 6], "label": lines[i + 1].strip()})
    return rows


def _winogrande(root: Path) -> list[dict]:
    rows, labels = list(_jsonl(root / FILES["winogrande"][0])), _labels(root / FILES["winogrande"][1])
    for r, y in zip(rows, labels, strict=True):
        if r["answer"] != y:
            raise ValueError(f"winogrande {r['qID']}: answer {r['answer']} disagrees with the labels file ({y})")
    return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]


def _lambada(root: Path) -> list[dict]:
    return [{"text": r["text"]} for r in _jsonl(root / FILES["lambada_openai"][0])]


# task -> (split name the stock definition evaluates, reader)
READERS: dict[str, tuple[str, Callable[[Path], list[dict]]]] = {
    "piqa": ("validation", _piqa),
    "arc_easy": ("test", _arc("arc_easy")),
    "arc_challenge": ("test", _arc("arc_challenge")),
    "boolq": ("validation", _boolq),
    "hellaswag": ("validation", _hellaswag),
    "winogrande": ("validation", _winogrande),
    "lambada_openai": ("test", _lambada),
}


def load(task: str, root: Path) -> datasets.DatasetDict:
    split, read = READERS[task]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read(Path(root)))})

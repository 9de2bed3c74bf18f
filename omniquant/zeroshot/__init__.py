"""Zero-shot accuracy with lm-evaluation-harness 0.4 over an in-memory model (the paper's Table 2).

Task definitions live in ``tasks/`` (the stock lm-eval prompts, targets, choices and metrics);
their documents come from the local files under the data root (:mod:`.sources`), or, with no data
root, lm-eval's stock tasks load them from the HF hub. A task whose files are missing is skipped
with a message and recorded in ``zeroshot_skipped``; the others still run.

With a ``cache`` path every scored request is written to lm-eval's SQLite request cache as it
completes, so an interrupted evaluation resumes where it stopped; the path must be keyed by the
model's weights (:func:`fingerprint`), since lm-eval keys requests by their text alone.

The model runs under :class:`~.shared_prefix.SharedPrefixLM`, lm-eval's ``HFLM`` that scores the choices
of a question over one forward pass of their shared context.
"""
from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from omniquant.content import content_hash
from omniquant.errors import UserError
from omniquant.zeroshot import sources

TASKS: tuple[str, ...] = tuple(sources.FILES)
AVERAGED = ("piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande")  # the paper's six
METRICS = ("acc", "acc_norm")
TASK_DIR = Path(__file__).resolve().parent / "tasks"


def result_key(task: str, local: bool) -> str:
    """Metric-key prefix: a task read from a derived local copy is labelled ``<task>_derived``."""
    return f"{task}_derived" if local and task in sources.DERIVED else task


def fingerprint(model: nn.Module, *labels: str) -> str:
    """A short hash of the model's weights and ``labels`` (e.g. the activation setting, not in the weights)."""
    return content_hash([list(labels), model.state_dict()])


def _spent_file(cache: Path, tasks: Sequence[str], limit: int | None) -> Path:
    key = hashlib.blake2b(json.dumps([sorted(tasks), limit]).encode(), digest_size=4).hexdigest()
    return cache.with_name(f"{cache.name}-{key}.seconds.json")


def validate(tasks: Sequence[str], metric: str) -> None:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"eval.zeroshot.tasks: unknown {', '.join(unknown)}; available: {', '.join(TASKS)}")
    if metric not in METRICS:
        raise UserError(f"eval.zeroshot.metric={metric!r}; use one of {', '.join(METRICS)}")


def _local_dataset(task: str, root: Path, **_metadata: Any):
    return sources.load(task, root)


def task_config(task: str, root: Path | None) -> dict[str, Any] | str:
    """Our definition of ``task`` reading the local files, or the stock task name (hub) without a root."""
    if root is None:
        return task
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(TASK_DIR / f"{task}.yaml")
    cfg["custom_dataset"] = partial(_local_dataset, task, Path(root))
    return cfg


def evaluate(model: nn.Module, tokenizer, tasks: Sequence[str], root: Path | None, *, limit: int | None,
             batch_size: int, metric: str, device: torch.device, cache: Path | None = None) -> dict[str, Any]:
    """``<task>_acc``, ``<task>_acc_norm`` (where the task defines it), ``zeroshot_avg`` and bookkeeping.

    ``zeroshot_seconds`` is this run's wall time; with a ``cache``, ``zeroshot_seconds_total`` is the time
    the results cost: this run plus the interrupted runs of the same tasks and limit it resumed from
    (or, when an earlier run completed them, that run's total).
    """
    validate(tasks, metric)
    skipped: dict[str, str] = {}
    present = []
    for task in tasks:
        missing = sources.missing_files(task, root) if root is not None else []
        if missing:
            skipped[task] = f"missing {missing[0]}"
            print(f"omniquant: zero-shot: skipping {task}: missing data file {missing[0]}")
        else:
            present.append(task)
    results: dict[str, Any] = {"zeroshot_limit": limit, "zeroshot_skipped": skipped, "zeroshot_metric": metric}
    if root is not None and any(t in sources.DERIVED for t in present):
        results["zeroshot_derived"] = {t: sources.DERIVED[t] for t in present if t in sources.DERIVED}
    if not present:
        return results
    import lm_eval
    from lm_eval.tasks import TaskManager

    from omniquant.zeroshot.shared_prefix import SharedPrefixLM

    spent_file = _spent_file(cache, present, limit) if cache is not None else None
    spent = json.loads(spent_file.read_text()) if spent_file and spent_file.is_file() else {"seconds": 0.0}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        if spent["seconds"] and not spent.get("complete"):
            print(f"omniquant: zero-shot: resuming from the request cache {cache}_rank0.db "
                  f"({spent['seconds']:.0f} s spent before)")
    start, complete = time.perf_counter(), False
    try:
        lm = SharedPrefixLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        out = lm_eval.simple_evaluate(model=lm, tasks=[task_config(t, root) for t in present], num_fewshot=0,
                                      limit=limit, task_manager=TaskManager(include_defaults=root is None),
                                      log_samples=False, use_cache=None if cache is None else str(cache),
                                      bootstrap_iters=1000, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
        complete = True
    finally:
        seconds = time.perf_counter() - start
        if spent_file is not None and not spent.get("complete"):  # a complete entry already holds the cost
            spent = {"seconds": spent["seconds"] + seconds, "complete": complete}
            spent_file.write_text(json.dumps(spent))
    results["zeroshot_seconds"] = seconds
    if spent_file is not None:
        results["zeroshot_seconds_total"] = spent["seconds"]
    averaged = []
    for task in present:
        res, key = out["results"][task], result_key(task, root is not None)
        for name in (*METRICS, "perplexity"):
            if f"{name},none" in res:
                short = "ppl" if name == "perplexity" else name
                results[f"{key}_{short}"] = float(res[f"{name},none"])
        results[f"{key}_n"] = int(out["n-samples"][task]["effective"])
        if task in AVERAGED:
            averaged.append(results.get(f"{key}_{metric}", results[f"{key}_acc"]))
    if averaged:
        results["zeroshot_avg"] = sum(averaged) / len(averaged)
        results["zeroshot_avg_tasks"] = [result_key(t, root is not None) for t in present if t in AVERAGED]
    return results

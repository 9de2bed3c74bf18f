"""Render committed metrics JSON files as Markdown tables.

``python -m pipelines.results_table [ROOT] [--zeroshot [acc|acc_norm]]``: ROOT defaults to
``metrics/`` (pass ``results/full_split/metrics`` for the full-split runs). Without ``--zeroshot``
the perplexity table (``<method>.json`` files); with it the zero-shot table
(``<method>.zeroshot.json``), showing ``acc`` or ``acc_norm`` (``acc`` where a task has no ``acc_norm``).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PPL_COLUMNS = [
    ("wikitext2_ppl", "WikiText-2 ppl", "{:.2f}"),
    ("wikitext2_windows", "windows", "{}"),
    ("ptb_ppl", "PTB ppl", "{:.2f}"),
    ("ptb_windows", "windows", "{}"),
    ("quant_seconds", "quant time (s)", "{:.0f}"),
    ("peak_mem_gb", "peak mem (GB)", "{:.2f}"),
]
ZEROSHOT_TASKS = [("piqa", "PIQA"), ("arc_easy", "ARC-e"), ("arc_challenge", "ARC-c"), ("boolq", "BoolQ"),
                  ("hellaswag_derived", "HellaSwag (derived)"), ("winogrande", "WinoGrande")]
SETTING_ORDER = ["fp16", "w4a16g128", "w4a16", "w3a16g128", "w3a16", "w2a16g128", "w2a16g64", "w2a16",
                 "w8a8", "w6a6", "w4a8", "w4a4"]
METHOD_ORDER = ["fp", "rtn", "gptq", "awq", "smoothquant", "omniquant"]
ZEROSHOT_SUFFIX = ".zeroshot.json"


def _rank(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def _key(m: dict) -> tuple:
    return (m["model"], _rank(SETTING_ORDER, m["setting"]), m["setting"], _rank(METHOD_ORDER, m["method"]))


def _fmt(m: dict, key: str, fmt: str) -> str:
    return fmt.format(m[key]) if m.get(key) is not None else "–"


def _table(rows: list[dict], titles: list[str], cells) -> str:
    lines = ["| model | setting | method | " + " | ".join(titles) + " |", "|---" * (len(titles) + 3) + "|"]
    lines += [f"| {m['model']} | {m['setting']} | {m['method']} | " + " | ".join(cells(m)) + " |" for m in rows]
    return "\n".join(lines)


def _load(root: Path, zeroshot: bool) -> list[dict]:
    files = [p for p in root.rglob("*.json") if p.name.endswith(ZEROSHOT_SUFFIX) == zeroshot]
    return sorted((json.loads(p.read_text()) for p in files), key=_key)


def render(root: Path) -> str:
    """The perplexity table."""
    return _table(_load(root, False), [title for _, title, _ in PPL_COLUMNS],
                  lambda m: [_fmt(m, key, fmt) for key, _, fmt in PPL_COLUMNS])


def render_zeroshot(root: Path, metric: str = "acc") -> str:
    """The zero-shot table: accuracy (%) per task with ``metric`` (else acc), their mean, LAMBADA, docs per task."""
    def cells(m: dict) -> list[str]:
        picked = [m.get(f"{t}_{metric}", m.get(f"{t}_acc")) for t, _ in ZEROSHOT_TASKS]
        shown = ["–" if v is None else f"{100 * v:.1f}" for v in picked]
        present = [v for v in picked if v is not None]
        avg = f"{100 * sum(present) / len(present):.1f}" if present else "–"
        lam = "–" if m.get("lambada_openai_acc") is None else f"{100 * m['lambada_openai_acc']:.1f}"
        limit = m.get("zeroshot_limit")
        return shown + [avg, lam, "full" if limit is None else str(limit), _fmt(m, "zeroshot_seconds", "{:.0f}")]

    titles = [title for _, title in ZEROSHOT_TASKS] + [f"avg ({metric})", "LAMBADA acc", "docs/task", "eval time (s)"]
    return _table(_load(root, True), titles, cells)


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    root = Path(args[0] if args else "metrics")
    if "--zeroshot" in argv:
        metric = args[1] if len(args) > 1 else "acc"
        print(render_zeroshot(root, metric))
    else:
        print(render(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

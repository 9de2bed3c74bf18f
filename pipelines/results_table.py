"""Render committed metrics JSON files as a Markdown table: `python -m pipelines.results_table [ROOT]`.

ROOT defaults to `metrics/`; pass `results/full_split/metrics` for the full-split runs.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("setting", "setting", "{}"),
    ("method", "method", "{}"),
    ("wikitext2_ppl", "WikiText-2 ppl", "{:.2f}"),
    ("wikitext2_windows", "windows", "{}"),
    ("ptb_ppl", "PTB ppl", "{:.2f}"),
    ("ptb_windows", "windows", "{}"),
    ("quant_seconds", "quant time (s)", "{:.0f}"),
    ("peak_mem_gb", "peak mem (GB)", "{:.2f}"),
]
SETTING_ORDER = ["fp16", "w4a16g128", "w4a16", "w3a16g128", "w3a16", "w2a16g128", "w2a16g64", "w2a16",
                 "w8a8", "w6a6", "w4a8", "w4a4"]
METHOD_ORDER = ["fp", "rtn", "gptq", "awq", "smoothquant", "omniquant"]


def _rank(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def _key(m: dict) -> tuple:
    return (m["model"], _rank(SETTING_ORDER, m["setting"]), m["setting"], _rank(METHOD_ORDER, m["method"]))


def render(root: Path) -> str:
    rows = sorted((json.loads(p.read_text()) for p in root.rglob("*.json")), key=_key)
    lines = ["| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for m in rows:
        cells = [fmt.format(m[key]) if m.get(key) is not None else "–" for key, _, fmt in COLUMNS]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(Path(sys.argv[1] if len(sys.argv) > 1 else "metrics")))

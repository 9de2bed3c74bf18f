"""Paper-style tables and plots from the per-cell metrics files
(``metrics/<model>/<setting>/<method>[.zeroshot|.zeroshot_full|.packed].json``).

- Table 1: weight-only perplexity, rows setting x method, WikiText-2 and PTB per model, and the
  paper's LLaMA-2-7B WikiText-2 column beside them.
- Table 2: zero-shot accuracy (%) for FP and the weight-activation settings, with the paper's
  LLaMA-1-7B rows below ours.
- Table A1: quantization time and peak memory per model, setting and method.
- Packed table: the packed checkpoint's perplexity beside the fake-quantized model's, sizes, bits per weight.
- Table 3: prefill and decode tokens/s, memory and roofline share per speed variant, the TVM build, and the
  llama.cpp rows' perplexity and logits check.
- ``plot_perplexity``: perplexity against weight bits per method (log scale), one panel per model.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from omniquant import method_names, paper
from omniquant.zeroshot import AVERAGED

SETTING_ORDER = ["fp16", "w4a16g128", "w4a16g64", "w4a16g32", "w4a16", "w3a16g128", "w3a16g64", "w3a16",
                 "w2a16g128", "w2a16g64", "w2a16", "w8a8", "w6a6", "w4a8", "w4a4"]
METHOD_ORDER = ["fp", "rtn", "gptq", "awq", "smoothquant", "omniquant-paper", "omniquant"]
KIND = re.compile(r"\.(zeroshot|zeroshot_full|packed|mlc|speed|turns|seed)\d*\.json$")  # no suffix: perplexity
TASK_TITLES = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ",
               "hellaswag": "HellaSwag", "winogrande": "WinoGrande"}
ZEROSHOT_COLUMNS = [(task, TASK_TITLES[task]) for task in AVERAGED]  # the paper's six, in its order
SETTING = re.compile(r"w(\d+)a(\d+)(?:g(\d+))?$")
Metrics = dict[str, Any]


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |", "|---" * len(self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes]).rstrip() + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.columns)
        writer.writerows(self.rows)
        return out.getvalue()


def bits(setting: str) -> tuple[int, int, int | None]:
    """(weight bits, activation bits, group size or None) of a setting name like ``w3a16g128``."""
    if setting == "fp16":
        return 16, 16, None
    m = SETTING.match(setting)
    if m is None:
        raise ValueError(f"not a setting name: {setting}")
    return int(m[1]), int(m[2]), int(m[3]) if m[3] else None


def _rank(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


def _key(m: Metrics) -> tuple:
    return (_rank(SETTING_ORDER, m["setting"]), m["setting"], _rank(METHOD_ORDER, m["method"]), m["method"])


@dataclass
class Records:
    """Metrics records by kind, each sorted by setting then method."""

    ppl: list[Metrics]
    zeroshot: list[Metrics]  # first-N-document and full-set runs
    packed: list[Metrics]
    mlc: list[Metrics]
    speed: list[Metrics]
    turns: list[Metrics]  # a cell's decode timed in turns with another cell's (stage speed_turns)
    seed: list[Metrics]  # perplexity of a cell at other calibration seeds (``<method>.seed<N>.json``)


def impossible(m: Metrics) -> str | None:
    """Why a record's figures cannot be right (a perplexity of 1 or less or not finite, zero windows, a NaN
    accuracy), or None."""
    for key, value in sorted(m.items()):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if key.endswith(("_ppl", "_acc", "_acc_norm", "_avg")) and not math.isfinite(value):
            return f"{key}={value} is impossible (not finite)"
        if key.endswith("_ppl") and value <= 1:  # 1 only for a certain model, or no windows at all
            return f"{key}={value} is impossible (<= 1)"
        if key.endswith("_windows") and value == 0:
            return f"{key}=0 is impossible (no windows)"
    return None


def load_metrics(root: str | Path, models: Sequence[str] | None = None) -> Records:
    """Every metrics file under ``root`` (``root/<model>`` of ``models`` only, if given), by kind; a record
    with impossible figures is skipped, with one line naming it."""
    kinds: dict[str, list[Metrics]] = {"ppl": [], "zeroshot": [], "packed": [], "mlc": [], "speed": [], "turns": [],
                                       "seed": []}
    folders = [Path(root)] if models is None else [Path(root) / model for model in models]
    for path in sorted(p for folder in folders for p in folder.rglob("*.json")):
        match = KIND.search(path.name)
        kind = "ppl" if match is None else match[1].removesuffix("_full")
        record = json.loads(path.read_text())
        problem = impossible(record)
        if problem:
            print(f"omniquant: skipped {path}: {problem}")
            continue
        kinds[kind].append(record)
    return Records(**{kind: sorted(rows, key=_key) for kind, rows in kinds.items()})


def fmt_ppl(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 1000 else f"{value:.1e}".replace("e+0", "e").replace("e+", "e")


def _grid(rows: list[Metrics], cell: Callable[[str, Metrics | None], list[str]], n_empty: int,
          models: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Rows keyed (setting, method), one group of columns per model (``models``: all of ``rows``' by default)."""
    models = models if models is not None else sorted({m["model"] for m in rows})
    by_cell = {(m["model"], m["setting"], m["method"]): m for m in rows}
    keys = sorted({(m["setting"], m["method"]) for m in rows},
                  key=lambda k: _key({"setting": k[0], "method": k[1]}))
    out = []
    for setting, method in keys:
        row = [setting, method]
        for model in models:
            row += cell(model, by_cell.get((model, setting, method))) if (model, setting, method) in by_cell \
                else ["–"] * n_empty
        out.append(row)
    return models, out


def _seeded(m: Metrics, seeds: Sequence[Metrics], key: str) -> str:
    """``mean ± std (n seeds)`` of ``key`` over the cell and its other-seed runs, or the cell's value alone."""
    same = [s for s in seeds if (s["model"], s["setting"], s["method"]) == (m["model"], m["setting"], m["method"])]
    values = [r[key] for r in [m, *same] if r.get(key) is not None]
    if len(values) < 2:
        return fmt_ppl(m.get(key))
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt_ppl(mean)} ± {fmt_ppl(std)} ({len(values)})"


def table1(ppl: Sequence[Metrics], seeds: Sequence[Metrics] = ()) -> Table:
    """Weight-only perplexity (and the FP row), with the paper's LLaMA-2-7B WikiText-2 column; cells run at
    several calibration seeds show mean ± sample std (number of seeds)."""
    rows = [m for m in ppl if m["setting"] == "fp16" or bits(m["setting"])[1] == 16]
    models, body = _grid(rows, lambda _model, m: [_seeded(m, seeds, "wikitext2_ppl"), _seeded(m, seeds, "ptb_ppl")],
                         2)
    for row in body:
        row.append(fmt_ppl(paper.TABLE1_WIKITEXT2.get((row[0], method_names.family(row[1])))))
    columns = ["setting", "method"] + [f"{model} {name}" for model in models for name in ("WikiText-2", "PTB")]
    columns.append(f"paper {paper.TABLE1_MODEL} WikiText-2")
    notes = [f"The last column is the paper's (Table 1, {paper.TABLE1_MODEL}), not ours.",
             "omniquant-paper: the paper's recipe (σ(4) LWC start, constant learning rate, round to nearest); "
             "omniquant: our default (clip-search start, cosine schedule, GPTQ rounding on the learned ranges; "
             "README \"OmniQuant recipe\")."]
    if seeds:
        notes.append("a ± b (n): mean and sample standard deviation over n calibration seeds (windows drawn anew); "
                     "a gap under two standard deviations is not a win.")
    return Table("Table 1 — weight-only quantization, perplexity (seqlen 2048)", columns, body,
                 _window_notes(rows) + notes)


def _window_notes(rows: Sequence[Metrics]) -> list[str]:
    notes = set()
    for m in rows:
        for ds, name in (("wikitext2", "WikiText-2 test"), ("ptb", "PTB validation")):
            if m.get(f"{ds}_windows") is not None and m.get(f"{ds}_total_windows") is not None:
                notes.add(f"{m['model']}: {name}, first {m[f'{ds}_windows']} of {m[f'{ds}_total_windows']} "
                          f"2048-token windows.")
        if m.get("model_weight_grid"):
            notes.add(f"{m['model']}: {m['model_weight_grid']}; results are relative to that model.")
    return sorted(notes)


def _accuracy(m: Metrics, task: str, metric: str) -> float | None:
    key = f"{task}_derived" if f"{task}_derived_acc" in m else task
    value = m.get(f"{key}_{metric}", m.get(f"{key}_acc"))
    return None if value is None else 100 * value


def table2(zs: Sequence[Metrics], metric: str = "acc") -> Table:
    """Zero-shot accuracy (%) of FP and weight-activation cells (first-N-document runs, then full-set
    runs), the paper's LLaMA-1-7B rows below."""
    rows = [m for m in zs if m["setting"] == "fp16" or bits(m["setting"])[1] < 16]
    models = sorted({m["model"] for m in rows})

    def cells(_model: str, m: Metrics) -> list[str]:
        acc = [_accuracy(m, task, metric) for task, _ in ZEROSHOT_COLUMNS]
        present = [a for a in acc if a is not None]
        limit = m.get("zeroshot_limit")
        lambada = [m.get("lambada_openai_acc"), m.get("lambada_openai_ppl")]
        return (["–" if a is None else f"{a:.1f}" for a in acc]
                + [f"{sum(present) / len(present):.1f}" if present else "–"]
                + ["–" if lambada[0] is None else f"{100 * lambada[0]:.1f}", fmt_ppl(lambada[1])]
                + ["full" if limit is None else str(limit)])

    extra = ["avg", "LAMBADA acc", "LAMBADA ppl", "docs/task"]
    width = len(ZEROSHOT_COLUMNS) + len(extra)
    body = [row for full in (False, True)
            for row in _grid([m for m in rows if (m.get("zeroshot_limit") is None) == full], cells, width, models)[1]]
    columns = ["setting", "method"] + [f"{model} {title}" for model in models
                                       for title in [t for _, t in ZEROSHOT_COLUMNS] + extra]
    for (setting, method), acc in paper.TABLE2_ACCURACY.items():
        row = [setting, f"{method} (paper, {paper.TABLE2_MODEL})"]
        for _ in models:
            row += [f"{a:.1f}" for a in acc] + [f"{sum(acc) / len(acc):.1f}", "–", "–", "full"]
        body.append(row)
    notes = [f"Our columns show `{metric}` (`acc` where a task has no `acc_norm`); the paper does not say which "
             "it used. Averages are recomputed from the six columns (some printed paper averages are not).",
             "HellaSwag is evaluated on a derived copy (llama.cpp text format): our HellaSwag numbers are labelled "
             "`hellaswag_derived` in the metrics.",
             "docs/task: documents evaluated per task (`eval.zeroshot.limit`); with 50 documents one accuracy has a "
             "standard error of about 7 points, so LAMBADA perplexity (not in the paper's table) separates the "
             "methods more reliably at small limits."]
    return Table("Table 2 — weight-activation quantization, zero-shot accuracy (%)", columns, body, notes)


def tableA1(ppl: Sequence[Metrics]) -> Table:
    """Quantization (calibration) time and peak memory per model, setting and method."""
    rows = [m for m in ppl if m["method"] != "fp" and m.get("quant_seconds") is not None]
    body = [[m["model"], m["setting"], m["method"], f"{m['quant_seconds']:.0f}",
             "–" if m.get("peak_mem_gb") is None else f"{m['peak_mem_gb']:.2f}",
             "–" if m.get("calib_nsamples") is None else f"{m['calib_nsamples']} × {m['calib_seqlen']}",
             "–" if m.get("calib_epochs") is None else str(m["calib_epochs"])]
            for m in sorted(rows, key=lambda m: (m["model"], *_key(m)))]
    paper_hours = "; ".join(f"{mode}: " + ", ".join(f"{k} {v} h" for k, v in hours.items())
                            for mode, hours in paper.TABLE_A12_HOURS.items())
    return Table("Table A1 — quantization time and peak memory",
                 ["model", "setting", "method", "quant time (s)", "peak mem (GB)", "calibration samples", "epochs"],
                 body, ["peak mem: the GPU's peak allocation when run on a GPU, else the process peak RSS.",
                        f"Paper (Table A12, one A100-80G, 128 × 2048 tokens, 20 epochs): {paper_hours}."])


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a finished figure (tight layout), creating its folder, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_perplexity(ppl: Sequence[Metrics], path: str | Path) -> Path:
    """WikiText-2 perplexity against weight bits of the weight-only settings: one colour per method,
    solid for group-wise settings (tick labels name their group sizes), dashed for per-channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m["model"] for m in ppl})
    panels = max(1, len(models))  # an empty panel when there is nothing to plot yet
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    colours = {method: f"C{i}" for i, method in enumerate(METHOD_ORDER)}
    for ax, model in zip(axes[0], models):
        lines: dict[tuple[str, bool], dict[int, float]] = {}
        groups: dict[int, set[int]] = {}
        for m in ppl:
            if m["model"] != model or m.get("wikitext2_ppl") is None:
                continue
            if m["setting"] == "fp16":
                ax.axhline(m["wikitext2_ppl"], color="black", linestyle=":", label="FP")
                continue
            w, a, g = bits(m["setting"])
            if a != 16:
                continue
            if g:
                groups.setdefault(w, set()).add(g)
            lines.setdefault((m["method"], g is not None), {})[w] = m["wikitext2_ppl"]
        for (method, grouped), points in sorted(lines.items(), key=lambda kv: (_rank(METHOD_ORDER, kv[0][0]), kv[0])):
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", color=colours.get(method, "grey"),
                    linestyle="-" if grouped else "--", label=f"{method} ({'group' if grouped else 'per-channel'})")
        ticks = sorted({2, 3, 4} | set(groups))
        ax.set_xticks(ticks, [f"{w}" + (f"\n(g{'/'.join(map(str, sorted(groups[w])))})" if w in groups else "")
                              for w in ticks])
        ax.set_yscale("log")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("WikiText-2 perplexity (log scale)")
        ax.set_title(f"{model}: weight-only quantization")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


def plot_speed(sweep: Metrics, path: str | Path) -> Path:
    """Batch-1 decode tok/s against bits per weight of a :func:`omniquant.bench.bits_sweep` (packed, with
    and without 8-bit embeddings, and with int8 activations; FP and llama.cpp as points), the bandwidth
    roofline (``bandwidth / bytes per step``) of each checkpoint as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    gb = sweep["bandwidth_gb_s"] * 1e9
    rows = sorted(sweep["settings"].items(), key=lambda kv: kv[1]["bits_per_weight"])
    variants = (("packed", "packed, fp32 head"), ("packed_int8", "packed, 8-bit head"),
                ("packed_a8", "packed, 8-bit head, int8 activations"))
    for i, (variant, label) in enumerate(variants):
        runs = [(r["bits_per_weight"], r[variant]) for _, r in rows if "decode_tok_s" in r.get(variant, {})]
        xs = [x for x, _ in runs]
        key = next(iter(runs[0][1]["decode_tok_s"])) if runs else None
        ax.plot(xs, [r["decode_tok_s"][key] for _, r in runs], marker="o", color=f"C{i}", label=label)
        if variant != "packed_a8":  # it reads the 8-bit-head checkpoint: the same bytes, the same roofline
            ax.plot(xs, [gb / r["bytes_per_step"] for _, r in runs], linestyle="--", color=f"C{i}",
                    label=f"{label}: roofline")
        for (name, r), x in zip(rows, xs):
            ax.annotate(name, (x, r[variant]["decode_tok_s"][key]), fontsize=7, textcoords="offset points",
                        xytext=(4, 4))
    for name, marker, colour in (("fp", "s", "black"), ("llama_cpp", "^", "C3")):
        r = sweep.get(name, {})
        if "decode_tok_s" in r:
            ax.scatter([32 if name == "fp" else 8 * r["bytes_per_step"] / sweep["parameters"]],
                       list(r["decode_tok_s"].values())[:1], marker=marker, color=colour,
                       label="FP32" if name == "fp" else f"llama.cpp ({r.get('gguf', 'GGUF')})", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per linear weight (scales and zeros included; FP32 at 32)")
    ax.set_ylabel("decode tok/s, batch 1 (log scale)")
    ax.set_title(f"decode speed against bits: {sweep['device']}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


def table_packed(packed: Sequence[Metrics], ppl: Sequence[Metrics]) -> Table:
    """Packed checkpoints: WikiText-2 perplexity of the packed model beside the fake-quantized one, sizes."""
    fake = {(m["model"], m["setting"], m["method"]): m for m in ppl}
    body = []
    for m in sorted(packed, key=lambda m: (m["model"], *_key(m))):
        ref = fake.get((m["model"], m["setting"], m["method"]), {})
        body.append([m["model"], m["setting"], m["method"], fmt_ppl(ref.get("wikitext2_ppl")),
                     fmt_ppl(m.get("packed_wikitext2_ppl")), f"{m['packed_bytes'] / 2**20:.1f}",
                     f"{m['fp_bytes'] / 2**20:.1f}", f"{m['bits_per_weight']:.2f}"])
    return Table("Packed checkpoints — real low-bit weights",
                 ["model", "setting", "method", "fake-quant WikiText-2", "packed WikiText-2", "packed MiB",
                  "FP checkpoint MiB", "bits/weight (linears)"], body,
                 ["packed: the model rebuilt from the packed file alone (no full-precision linear weights), "
                  "evaluated by the same perplexity code on the same windows.",
                  "bits/weight counts codes, scales (fp32) and zero points of the decoder linears; the packed file "
                  "also holds the embeddings, norms and head in the checkpoint dtype."])


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _turns(t: Metrics) -> str:
    """A speed_turns record in a cell: ``1.10× w4a16g128 (280.3 / 255.6)``, the ratio, the other setting and both
    medians."""
    tok_s = t["median_tok_s"]
    return f"{t['ratio']:.2f}× {t['against']} ({_rate(tok_s[t['setting']])} / {_rate(tok_s[t['against']])})"


LLAMA_CPP = {"llama_cpp_source": "llama.cpp (source GGUF)", "llama_cpp_export": "llama.cpp (our Q4_1 export)"}


def _llama_cpp_note(m: Metrics, variant: str, r: Metrics, ours: Metrics) -> str:
    """A llama.cpp row's GGUF, perplexity beside ours on the same windows, and its logits check."""
    datasets = [k.removesuffix("_ppl") for k in r if k.endswith("_ppl")]
    ppl = ", ".join(f"{d} {fmt_ppl(r[f'{d}_ppl'])} over {r[f'{d}_windows']} windows (ours {fmt_ppl(ours.get(f'{d}_ppl'))})"
                    for d in datasets)
    c = r["logits_check"]
    tol = ", ".join(f"{k} ≤ {v:g}" for k, v in c["tolerance"].items())
    return (f"{m['model']} {m['setting']} {m['method']} {LLAMA_CPP[variant]}: {r['gguf']['file']} "
            f"({r['gguf']['bytes'] / 2**20:.1f} MiB), {r['n_threads']} threads, batch 1 only; perplexity {ppl}; "
            f"logits against {r['logits_reference']} on {c['windows']} {c['dataset']} windows: max abs "
            f"{c['max_abs_diff']:.3f}, mean abs {c['mean_abs_diff']:.4f} ({100 * c['mean_abs_diff_rel']:.1f} % of our "
            f"logits' std {c['reference_std']:.2f}), perplexity {c['ppl']:.3f} vs "
            f"{c['reference_ppl']:.3f} ({100 * c['ppl_rel_diff']:.2f} %): "
            f"{'within' if c['within_tolerance'] else 'OUTSIDE'} the tolerance ({tol}).")


def table3(speed: Sequence[Metrics], mlc: Sequence[Metrics], ppl: Sequence[Metrics] = (),
           turns: Sequence[Metrics] = ()) -> Table:
    """Speed (the paper's Table 3 analogue): one row per cell and variant, the TVM build check and the
    llama.cpp rows' perplexity (beside ``ppl``'s, ours: FP for the source GGUF, the cell for the export)
    and logits check beside; ``turns`` (stage speed_turns) adds, in its variant's row, a cell's decode timed in turns
    with another setting's."""
    keys = sorted({k for m in speed for v in m["variants"].values() for k in v.get("decode_tok_s", {})},
                  key=lambda k: tuple(int(x) for x in re.findall(r"\d+", k)))
    builds = {(m["model"], m["setting"], m["method"]): m for m in mlc}
    fake = {(m["model"], m["setting"], m["method"]): m for m in ppl}
    in_turns = {(t["model"], t["setting"], t["method"], t["variant"]): t for t in turns}
    body, llama_notes = [], []
    for m in sorted(speed, key=lambda m: (m["model"], *_key(m))):
        for variant, r in m["variants"].items():
            label = LLAMA_CPP.get(variant, variant)
            if "skipped" in r:
                body.append([m["model"], m["setting"], m["method"], label] + ["–"] * (len(keys) + 5)
                            + [f"skipped: {r['skipped']}"])
                continue
            roof = r["roofline_frac"].get(keys[0]) if keys else None
            timed = in_turns.get((m["model"], m["setting"], m["method"], variant))
            body.append([m["model"], m["setting"], m["method"], label, _rate(r["prefill_tok_s"])]
                        + [_rate(r["decode_tok_s"].get(k)) for k in keys]
                        + ["–" if timed is None else _turns(timed)]
                        + [f"{r['peak_mem_gb']:.2f}", f"{r['weight_bytes'] / 2**20:.1f}",
                           "–" if roof is None else f"{100 * roof:.1f}", r["device"]])
            if variant in LLAMA_CPP:
                ref = (m["model"], "fp16", "fp") if variant == "llama_cpp_source" else (m["model"], m["setting"],
                                                                                         m["method"])
                llama_notes.append(_llama_cpp_note(m, variant, r, fake.get(ref, {})))
    notes = [f"decode columns: batch b, n new tokens (greedy); roofline: decode tokens/s at {keys[0] if keys else '–'} "
             "over (memory bandwidth ÷ weight bytes read per token), in %; the bandwidth: the median of the copy "
             "bandwidths sampled through the cell's run."]
    if turns:
        t = turns[0]
        notes.append(f"in turns (stage speed_turns): the cell's {t['variant']} decode and that of the setting named, "
                     f"at b{t['batch']}_n{t['new_tokens']}, one run of each a round ({t['rounds']} rounds): the median "
                     "per-round ratio of the cell's tok/s to the other's, and their median tok/s.")
    once = sorted(f"{m['model']} {m['setting']} {m['method']}" for m in speed
                  if not any("bandwidth_samples_gb_s" in v for v in m["variants"].values()))
    if once:
        notes.append(f"measured once, before the median was taken (older runs): {', '.join(once)}.")
    for (model, setting, method), b in sorted(builds.items()):
        notes.append(f"{model} {setting} {method}: TVM llvm build {b.get('llvm_status')}"
                     + (f", {b['llvm_build_s']:.0f} s, logits max abs error prefill {b['llvm_prefill_max_abs_err']:.1e}"
                        f" / decode {b['llvm_decode_max_abs_err']:.1e}" if b.get("llvm_status") == "ok" else "")
                     + f"; CUDA {b.get('cuda_status')}; MLC-LLM artifacts: {b.get('mlc_route')} "
                       f"({b.get('mlc_quantization')}).")
    return Table("Table 3 — speed and memory of packed models",
                 ["model", "setting", "method", "variant", "prefill tok/s"] + [f"decode tok/s {k}" for k in keys]
                 + ["in turns: × setting (tok/s)", "peak mem (GB)", "weights MiB", "roofline %", "device"], body,
                 notes + llama_notes)


def write_tables(metrics_root: str | Path, out: str | Path, metric: str = "acc",
                 models: Sequence[str] | None = None) -> list[Path]:
    """``table1``, ``table2``, ``tableA1``, ``table_packed``, ``table3`` (.md and .csv) and ``ppl_vs_bits.png``
    under ``out``, from the metrics of ``models`` (all by default)."""
    records = load_metrics(metrics_root, models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    tables = (("table1", table1(records.ppl, records.seed)), ("table2", table2(records.zeroshot, metric)),
              ("tableA1", tableA1(records.ppl)), ("table_packed", table_packed(records.packed, records.ppl)),
              ("table3", table3(records.speed, records.mlc, records.ppl, records.turns)))
    for name, table in tables:
        for suffix, text in ((".md", table.markdown()), (".csv", table.csv())):
            (out / f"{name}{suffix}").write_text(text)
            written.append(out / f"{name}{suffix}")
    written.append(plot_perplexity(records.ppl, out / "ppl_vs_bits.png"))
    return written

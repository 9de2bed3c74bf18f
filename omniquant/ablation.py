"""Recipe ablations: rows of Hydra overrides over one cell, each run by ``run_cell``, collected as
``metrics/ablation/<study>/<row>.json`` and reported as a table and two plots (block loss against
optimizer step; perplexity against calibration seconds, beside the grid's baseline cells)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from omniquant.errors import UserError
from omniquant.layout import metrics_path
from omniquant.metrics import write_json
from omniquant.tables import Table, fmt_ppl, save_figure

CONF = Path(__file__).resolve().parents[1] / "conf" / "ablation"
BASELINES = ("rtn", "gptq", "awq")  # grid cells drawn beside the rows in the time-to-quality plot


@dataclass(frozen=True)
class Study:
    """``into: ablation`` (default) keeps rows under ``metrics/ablation/<study>/``; ``into: seeds`` writes each
    row as its cell's other-seed run, ``metrics/<model>/<setting>/<method>.seed<N>.json`` (Table 1's ± std)."""

    name: str
    base: list[str]
    rows: dict[str, dict[str, Any]]  # row -> {what, overrides}
    into: str = "ablation"

    @classmethod
    def load(cls, name: str) -> "Study":
        path = CONF / f"{name}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in CONF.glob("*.yaml")))
            raise UserError(f"ablation study {name!r} is unknown; available: {known}")
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        if spec.get("into", "ablation") not in ("ablation", "seeds"):
            raise UserError(f"{path}: into={spec['into']!r} is unknown; use ablation or seeds")
        return cls(name, list(spec["base"]), spec["rows"], spec.get("into", "ablation"))

    def option(self, key: str) -> str:
        return next(o.split("=", 1)[1] for o in self.base if o.startswith(f"{key}="))

    def metrics_file(self, root: Path, row: str) -> Path:
        """Where a row's metrics are; a row with ``cell: <method>`` is that grid cell of the study's model and
        setting (run by DVC, not by the study)."""
        if "cell" in self.rows[row]:
            return metrics_path(root, self.option("model"), self.option("quant"), self.rows[row]["cell"])
        if self.into == "seeds":
            opts = dict(o.split("=", 1) for o in self.base + self.rows[row]["overrides"])
            return metrics_path(root, opts["model"], opts["quant"], opts["method"], f"seed{opts['seed']}")
        return root / "metrics" / "ablation" / self.name / f"{row}.json"

    def select(self, rows: list[str]) -> list[str]:
        unknown = [r for r in rows if r not in self.rows]
        if unknown:
            raise UserError(f"ablation {self.name}: unknown row(s) {', '.join(unknown)}; "
                            f"available: {', '.join(self.rows)}")
        return rows or list(self.rows)


def run(study: Study, rows: list[str], root: Path, force: bool = False) -> list[Path]:
    """Run each row without a metrics file (all with ``force``); returns the files written."""
    written = []
    for row in study.select(rows):
        target = study.metrics_file(root, row)
        if "cell" in study.rows[row]:
            print(f"ablation {study.name}/{row}: the grid cell {target} (dvc repro runs it)")
            continue
        if target.is_file() and not force:
            print(f"ablation {study.name}/{row}: done ({target})")
            continue
        out = root / "artifacts" / "ablation" / study.name / row
        shared, link = root / "artifacts" / "act_stats", out / "artifacts" / "act_stats"
        if shared.is_dir() and not link.exists():  # the act_stats stage's file (key-checked before use)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(shared)
        overrides = study.base + study.rows[row]["overrides"]
        cmd = [sys.executable, "-m", "pipelines.run_cell", *overrides, f"paths.out={out}",
               f"paths.models={root / 'artifacts' / 'models'}", f"hydra.run.dir={out / 'hydra'}"]
        print(f"ablation {study.name}/{row}: {' '.join(overrides)}", flush=True)
        code = subprocess.run(cmd, cwd=root, env=os.environ | {"PYTHONUNBUFFERED": "1"}).returncode
        if code:
            raise UserError(f"ablation {study.name}/{row}: run_cell exited {code} (its output is above); "
                            "the rows before it are kept")
        made = sorted((out / "metrics").rglob("*.json"))
        if len(made) != 1:
            raise UserError(f"ablation {study.name}/{row}: expected one metrics file under {out / 'metrics'}")
        metrics = json.loads(made[0].read_text())
        written.append(write_json(target, metrics | {"row": row, "what": study.rows[row]["what"],
                                                     "overrides": overrides}))
    return written


def _steps_per_epoch(m: dict[str, Any]) -> int:
    return -(-int(m["calib_nsamples"]) // int(m["calib_batch_size"]))


def load_rows(study: Study, root: Path) -> dict[str, dict[str, Any]]:
    return {row: json.loads(p.read_text()) | {"what": spec["what"]} for row, spec in study.rows.items()
            if (p := study.metrics_file(root, row)).is_file()}


def table(study: Study, rows: dict[str, dict[str, Any]]) -> Table:
    body = []
    for row, m in rows.items():
        curves = m.get("block_epoch_loss") or []
        final = [c[-1] for c in curves if c]
        body.append([row, m["what"], fmt_ppl(m.get("wikitext2_ppl")), fmt_ppl(m.get("ptb_ppl")),
                     f"{m['quant_seconds']:.0f}" + ("" if m.get("quant_machine") else " †"),
                     str(m["calib_epochs"] * _steps_per_epoch(m)) if m.get("calib_epochs") is not None else "–",
                     f"{final[-1]:.3g}" if final else "–"])
    notes = [f"{study.option('model')} at {study.option('quant')}, profile {study.option('profile')}; every row "
             "uses the same calibration windows and evaluation windows as the grid's cells "
             "(`python -m pipelines.ablation run`). The model's weights already lie on a GGUF grid.",
             "steps/block: optimizer steps per block; last-block loss: the final epoch's mean MSE of block 30.",
             "quant s: seconds on the machine the metrics file names (`quant_machine`); † none named: a run from "
             "before machines were recorded (the slower AMD AVX2 machine), so not comparable with the others."]
    return Table(f"Ablation {study.name} — OmniQuant recipe", ["row", "what", "WikiText-2", "PTB", "quant s",
                                                                "steps/block", "last-block loss"], body, notes)


def plot(study: Study, rows: dict[str, dict[str, Any]], root: Path, out: Path) -> list[Path]:
    """``ablation_<study>_block_loss.png`` and ``ablation_<study>_time_to_quality.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = {row: f"C{i}" for i, row in enumerate(rows)}  # one colour per row in both plots
    curves = {row: m["block_epoch_loss"] for row, m in rows.items() if m.get("block_epoch_loss")}
    n_blocks = max((len(c) for c in curves.values()), default=0)
    panels = sorted({0, n_blocks // 3, 2 * n_blocks // 3, n_blocks - 1}) if n_blocks else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, block in zip(axes[0], panels):
        for row, blocks in curves.items():
            per = _steps_per_epoch(rows[row])
            losses = blocks[block]
            ax.plot([per * (e + 1) for e in range(len(losses))], losses, marker="o", ms=3, color=colour[row], label=row)
        ax.set_title(f"block {block + 1}")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("block output MSE (epoch mean)")
    axes[0][-1].legend(fontsize=7)
    first = save_figure(fig, out / f"ablation_{study.name}_block_loss.png", dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row, m in rows.items():
        ax.scatter(m["quant_seconds"], m["wikitext2_ppl"], color=colour[row], label=row, zorder=3)
    model, setting = study.option("model"), study.option("quant")
    for method in BASELINES:
        path = root / "metrics" / model / setting / f"{method}.json"
        if path.is_file():
            m = json.loads(path.read_text())
            ax.scatter(m["quant_seconds"], m["wikitext2_ppl"], marker="x", color="black", zorder=3)
            ax.annotate(method, (m["quant_seconds"], m["wikitext2_ppl"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("log")
    ax.set_xlabel("calibration seconds (2-core CPU)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{model} {setting}: quality against calibration time")
    ax.legend(fontsize=7)
    second = save_figure(fig, out / f"ablation_{study.name}_time_to_quality.png", dpi=110)
    return [first, second]


def report(study: Study, root: Path, out: Path) -> list[Path]:
    """The study's table (markdown and CSV) and plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(study, root)
    t = table(study, rows)
    md, csv = out / f"ablation_{study.name}.md", out / f"ablation_{study.name}.csv"
    md.write_text(t.markdown())
    csv.write_text(t.csv())
    return [md, csv, *plot(study, rows, root, out)]


def lwc_factors(params: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Per linear (role) and block, quantiles (min, 10%, 50%, 90%, max) of the learned clip factors σ(γ)."""
    import torch

    out: dict[str, dict[str, list[float]]] = {}
    for key, value in sorted(params.items()):
        if ".lwc." not in key or not key.endswith("_max"):
            continue
        block, role = key.split(".lwc.")[0].rsplit(".", 1)[1], key.split(".lwc.")[1].removesuffix("_max")
        s = torch.sigmoid(value.float().flatten())
        out.setdefault(role, {})[block] = [round(float(q), 5) for q in
                                           torch.quantile(s, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]))]
    return out


def residual_errors(fp_model, models: dict[str, Any], windows) -> dict[str, Any]:
    """Per block output (residual stream) of each quantized model against the FP model on ``windows``: the
    MSE, the share of it in the largest 0.1% of squared-error elements, and the FP stream's largest
    magnitude with its token position (the massive activations of attention sinks)."""
    import torch

    def states(model):
        with torch.no_grad():
            return model(windows, output_hidden_states=True).hidden_states[1:]

    ref = states(fp_model)
    result: dict[str, Any] = {"fp_max_abs": [], "fp_argmax_position": []}
    for h in ref:
        flat = h.abs().amax(-1)  # [windows, tokens]
        result["fp_max_abs"].append(round(float(flat.max()), 2))
        result["fp_argmax_position"].append(int(flat.max(0).values.argmax()))
    for name, model in models.items():
        mse, top = [], []
        for h_q, h_fp in zip(states(model), ref):
            err = (h_q - h_fp).pow(2).flatten()
            k = max(1, err.numel() // 1000)
            mse.append(float(err.mean()))
            top.append(round(float(err.topk(k).values.sum() / err.sum()), 4))
        result[name] = {"mse": mse, "top_0.1%_share": top}
    return result


def diagnose(study: Study, root: Path, learned: Path, record: Path, compare: dict[str, str], n_windows: int) -> Path:
    """``metrics/ablation/<study>/diagnosis.json``: a cell's block curves and learned clip factors, and the
    residual-stream errors of ``compare`` (name -> quantized checkpoint) on the first calibration windows."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = study.option("model")
    for path in [learned, record, *map(Path, compare.values())]:
        if not Path(path).exists():
            raise UserError(f"{path} not found")
    rec = json.loads(record.read_text())
    windows = load_file(str(root / "artifacts" / "calib" / model / "calib.safetensors"))["input_ids"][:n_windows]

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()

    torch.set_grad_enabled(False)
    errors = residual_errors(load(root / "artifacts" / "models" / model),
                             {name: load(Path(p)) for name, p in compare.items()}, windows)
    out = {"model": model, "setting": study.option("quant"), "cell_record": str(record),
           "cell_quant_seconds": rec.get("quant_seconds"), "calib": rec.get("calib"),
           "block_epoch_loss": [b["epoch_loss"] for b in rec["blocks"]],
           "lwc_factors": lwc_factors(load_file(str(learned))), "residual": errors, "windows": n_windows}
    return write_json(root / "metrics" / "ablation" / study.name / "diagnosis.json", out)

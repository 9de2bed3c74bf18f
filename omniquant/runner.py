"""The one sequential block runner every method uses.

The full model stays in CPU memory; one decoder layer at a time is on the compute device in
float32. Block 0 sees the adapter's embeddings of the calibration windows (with the masks and
positions HF passes); two chains may be propagated: the FP chain (original blocks: targets, AWQ's
inputs) and the quantized chain (already-quantized blocks: GPTQ's and OmniQuant's inputs). A
method supplies one *step* per block, which quantizes the layer in place and returns the fused
:class:`QuantBlock`; the runner installs it (kept as a wrapper where activations are quantized),
moves it back and, with a state folder, persists the block so a killed run restarts at the first
unfinished block and ends with an identical result.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from omniquant import __version__
from omniquant.arch import Adapter, adapter_of
from omniquant.block import BlockConfig, QuantBlock
from omniquant.content import content_hash, save_tensors
from omniquant.errors import Interrupted
from omniquant.metrics import peak_rss_gb
from omniquant.setting import QuantSetting

QParams = dict[str, dict[str, torch.Tensor]]


@dataclass
class BlockRecord:
    block: int
    seconds: float = 0.0
    peak_mem_gb: float = 0.0
    epoch_loss: list[float] = field(default_factory=list)
    epoch_grad_norm: list[float] = field(default_factory=list)
    retries: int = 0
    resumed: bool = False


@dataclass
class BlockJob:
    """What a method's step gets for one block."""

    index: int
    prefix: str  # e.g. model.layers.3
    layer: nn.Module  # the HF layer, float32 on the compute device
    kwargs: dict[str, Any]  # attention mask and rotary cos/sin for this layer
    fp_in: torch.Tensor | None
    q_in: torch.Tensor | None
    fp_out: torch.Tensor | None  # the FP block's outputs on fp_in (before the step changes the layer)
    record: BlockRecord
    runner: "Runner"
    bar: Any = None  # the progress bar (a step may set its postfix)

    def run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.runner.forward(block, x, self.kwargs)


@dataclass
class StepResult:
    block: QuantBlock  # fused
    qparams: QParams = field(default_factory=dict)  # by stored weight within the block
    learned: dict[str, torch.Tensor] = field(default_factory=dict)  # learned parameters within the block


Step = Callable[[BlockJob], StepResult]


def default_device(device: torch.device | None) -> torch.device:
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _buffer_device(device: torch.device, n_bytes: int) -> torch.device:
    """Calibration activations live on the GPU if they fit in half its free memory, else CPU."""
    if device.type == "cuda" and n_bytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


def _peak_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else peak_rss_gb()


class State:
    """Per-block resume files: ``block_XXX.safetensors`` (the fused layer's weights, qparams, learned
    parameters), ``chain.safetensors`` (the chains after that block) and ``progress.json``, which holds
    the content key: one hash per part (model weights, calibration windows, activation statistics, the
    method's full config, the setting, the project version). State whose key differs, or that cannot be
    read, is discarded with one line saying why, and the run starts over."""

    def __init__(self, root: Path | None, parts: dict[str, str]):
        self.root, self.parts = root, parts

    def next_block(self, layers: nn.ModuleList) -> int:
        """The first block to run: 0 without usable state (which is then removed)."""
        if self.root is None or not self.root.exists():
            return 0
        problem, start = self._check(layers)
        if problem:
            print(f"omniquant: resume state in {self.root} {problem}; starting over")
            shutil.rmtree(self.root, ignore_errors=True)
            return 0
        return start

    def _check(self, layers: nn.ModuleList) -> tuple[str | None, int]:
        try:
            progress = json.loads((self.root / "progress.json").read_text())
            saved, start = dict(progress["parts"]), int(progress["next_block"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"has no readable progress.json ({type(err).__name__})", 0
        if not 0 < start <= len(layers):
            return f"says next block {start} of {len(layers)}", 0
        for i in range(start):
            want = {f"weights.{k}": tuple(v.shape) for k, v in layers[i].state_dict().items()}
            problem = _unreadable(self.root / f"block_{i:03d}.safetensors", want)
            if problem:
                return problem, 0
        problem = _unreadable(self.root / "chain.safetensors", {})
        if problem:
            return problem, 0
        changed = sorted(k for k in self.parts.keys() | saved.keys() if self.parts.get(k) != saved.get(k))
        return (f"was made with another {', '.join(changed)}", 0) if changed else (None, start)

    def block(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / f"block_{i:03d}.safetensors"))

    def chain(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / "chain.safetensors"))

    def save(self, i: int, block: dict[str, torch.Tensor], chain: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for tensors, name in ((block, f"block_{i:03d}.safetensors"), (chain, "chain.safetensors")):
            save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, self.root / name)
        tmp = self.root / "progress.json.tmp"
        tmp.write_text(json.dumps({"parts": self.parts, "next_block": i + 1}, indent=1, sort_keys=True))
        os.replace(tmp, self.root / "progress.json")


def _unreadable(path: Path, want: dict[str, tuple[int, ...]]) -> str | None:
    """Why the safetensors file ``path`` cannot be used (None if it can): unreadable, or one of the
    ``want`` tensors missing or of another shape."""
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        return f"has an unreadable {path.name} ({str(err).splitlines()[0]})"
    bad = sorted(k for k, shape in want.items() if shapes.get(k) != shape)
    return f"has a {path.name} that does not match the model ({bad[0]})" if bad else None


def install(layers: nn.ModuleList, i: int, block: QuantBlock) -> None:
    """Keep the wrapper where activations are quantized; else the plain (fused) HF layer."""
    layers[i] = block if block.cfg.act is not None else block.layer


class Runner:
    """Runs a method's step over every decoder layer of ``model`` in order."""

    def __init__(self, model: nn.Module, setting: QuantSetting, calib: torch.Tensor | None = None,
                 device: torch.device | None = None, chains: tuple[str, ...] = (), forward_batch: int = 8,
                 autocast: Callable[[], ContextManager] = contextlib.nullcontext, state_dir: Path | None = None,
                 key: dict[str, Any] | None = None):
        self.model, self.setting, self.calib = model, setting, calib
        self.adapter: Adapter = adapter_of(model)
        self.layers = self.adapter.decoder_layers(model)
        self.device = default_device(device)
        self.chains, self.forward_batch, self.autocast = chains, forward_batch, autocast
        resumable = state_dir is not None and bool(chains)
        self.state = State(state_dir if resumable else None, self._key(key or {}) if resumable else {})

    def _key(self, key: dict[str, Any]) -> dict[str, str]:
        """The resume key: a hash per part (``key``: the method's parts, e.g. its config and act stats)."""
        parts = {"weights": self.model.state_dict(), "windows": self.calib, "setting": self.setting.record(),
                 "layers": len(self.layers), "version": __version__} | key
        return {name: content_hash(value) for name, value in parts.items()}

    @torch.no_grad()
    def forward(self, block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """``block`` over ``x`` in batches of windows, on the compute device; results where ``x`` lives."""
        with self.autocast():
            outs = [block(x[s:s + self.forward_batch].to(self.device), **kwargs).float().to(x.device)
                    for s in range(0, x.shape[0], self.forward_batch)]
        return torch.cat(outs)

    @torch.no_grad()
    def inputs(self) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Block-0 inputs (float32) of the calibration windows and each layer's keyword arguments."""
        modules = self.adapter.embedding_modules(self.model)
        for m in modules:
            m.to(self.device)
        ids = self.calib.to(self.device)
        n_bytes = ids.numel() * self.model.config.hidden_size * 4 * (len(self.chains) + 1)
        x = self.adapter.embed(self.model, ids).float().to(_buffer_device(self.device, n_bytes))
        kwargs = self.adapter.layer_inputs(self.model, x[:1].to(self.device))
        for m in modules:
            m.to("cpu")
        return x, kwargs

    def run(self, step: Step, desc: str) -> tuple[QParams, dict[str, torch.Tensor], list[BlockRecord]]:
        """Quantize every layer in place with ``step``; returns qparams and learned parameters keyed by full
        path, and one record per block."""
        dtype = next(self.model.parameters()).dtype
        self.model.requires_grad_(False)  # only a step's own parameters are trained
        start = self.state.next_block(self.layers)
        fp_in = q_in = None
        kwargs: list[dict[str, Any]] = [{} for _ in self.layers]
        if self.chains:
            x, kwargs = self.inputs()
            fp_in = x if "fp" in self.chains else None
            q_in = x.clone() if "q" in self.chains else None
            if start:
                chain = self.state.chain()
                fp_in = chain["fp_in"].to(x.device) if fp_in is not None else None
                q_in = chain["q_in"].to(x.device) if q_in is not None else None
        qparams: QParams = {}
        learned: dict[str, torch.Tensor] = {}
        records: list[BlockRecord] = []
        bar = tqdm(range(len(self.layers)), desc=desc, unit="block", dynamic_ncols=True)
        i = start
        try:
            for i in bar:
                prefix = f"{self.adapter.layers}.{i}"
                record = BlockRecord(block=i, resumed=i < start)
                t0 = time.perf_counter()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                layer = self.layers[i].to(device=self.device, dtype=torch.float32)
                if record.resumed:
                    result = self._restore(i, layer)
                else:
                    fp_out = None
                    if fp_in is not None:
                        fp_out = self.forward(fp_block(layer), fp_in, kwargs[i])
                    job = BlockJob(i, prefix, layer, kwargs[i], fp_in, q_in, fp_out, record, self, bar)
                    result = step(job)
                    fp_in = fp_out
                layer.to(dtype=dtype)
                if not record.resumed:
                    if q_in is not None:
                        q_in = self.forward(result.block, q_in, kwargs[i])
                    if self.chains:
                        self.state.save(i, _block_state(layer, result), _chains(fp_in, q_in))
                qparams |= {f"{prefix}.{k}": {n: t.cpu() for n, t in d.items()} for k, d in result.qparams.items()}
                learned |= {f"{prefix}.{k}": v.detach().cpu() for k, v in result.learned.items()}
                install(self.layers, i, result.block)
                self.layers[i].to("cpu")
                record.seconds = time.perf_counter() - t0
                record.peak_mem_gb = _peak_mem_gb(self.device)
                records.append(record)
        except KeyboardInterrupt as err:  # one line for the user: how far it got (the state is saved per block)
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            raise Interrupted(signum, f"block {i + 1} of {len(self.layers)}") from None
        return qparams, learned, records

    def _restore(self, i: int, layer: nn.Module) -> StepResult:
        """A finished block from the state folder: its fused weights, qparams and learned parameters."""
        saved = self.state.block(i)
        layer.load_state_dict({k[len("weights."):]: v for k, v in saved.items() if k.startswith("weights.")})
        block = QuantBlock(layer, BlockConfig(weight=None, act=self.setting.act_spec))
        block.fused = True
        qparams: QParams = {}
        for k, v in saved.items():
            if k.startswith("qparams."):
                name, kind = k[len("qparams."):].rsplit(".", 1)
                qparams.setdefault(name, {})[kind] = v
        learned = {k[len("learned."):]: v for k, v in saved.items() if k.startswith("learned.")}
        return StepResult(block, qparams, learned)


def fp_block(layer: nn.Module) -> QuantBlock:
    """Our forward of the layer as it is (the FP chain)."""
    block = QuantBlock(layer, BlockConfig(weight=None))
    block.fused = True  # the layer's own weights, nothing transformed
    return block


def _block_state(layer: nn.Module, result: StepResult) -> dict[str, torch.Tensor]:
    state = {f"weights.{k}": v for k, v in layer.state_dict().items()}
    state |= {f"qparams.{name}.{kind}": t for name, d in result.qparams.items() for kind, t in d.items()}
    return state | {f"learned.{k}": v for k, v in result.learned.items()}


def _chains(fp_in: torch.Tensor | None, q_in: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {k: v for k, v in (("fp_in", fp_in), ("q_in", q_in)) if v is not None}


@torch.no_grad()
def hessians(job: BlockJob, block: QuantBlock, roles: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``2/n Σ x xᵀ`` over the ``n`` calibration tokens entering each named linear of the block."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(roles, 0)

    def accumulate(role: str):
        def fn(inp: torch.Tensor) -> None:
            flat = inp.reshape(-1, inp.shape[-1]).float()
            sums[role] = sums[role] + flat.T @ flat if role in sums else flat.T @ flat
            counts[role] += flat.shape[0]

        return fn

    block.taps = {role: accumulate(role) for role in roles}
    try:
        job.run(block, x)
    finally:
        block.taps = {}
    return {role: 2 * sums[role] / counts[role] for role in roles if role in sums}


def input_groups(block: QuantBlock) -> list[tuple[str, ...]]:
    """The block's quantized roles grouped by the input they share (forward order; the adapter's groups)."""
    quantized = block.layout.quantized
    return [g for group in block.layout.groups if (g := tuple(r for r in group if r in quantized))]


def layer_hessians(job: BlockJob) -> dict[str, torch.Tensor]:
    """:func:`hessians` of each input group's first role, from one forward of the layer as it is now on the
    quantized chain's inputs."""
    block = QuantBlock(job.layer, BlockConfig(weight=None))
    block.fused = True
    return hessians(job, block, [g[0] for g in input_groups(block)], job.q_in)

"""Block-wise OmniQuant calibration (reference §3, paper Algorithm 1).

The full model stays in CPU memory; exactly one block is on the accelerator at a time. Inputs
of block 0 are the token embeddings of the calibration windows; two chains are propagated:
the FP chain (original blocks) gives targets, the quantized chain (already-quantized blocks)
gives the quantized block's inputs. Loss ``MSE(F_fp(X_fp), F_q(X_q))`` (+ ``MSE(F_fp(X_q),
F_q(X_q))`` with ``aug_loss``). After training, LET is fused and weights fake-quantized.

After each block its learned parameters and both chains are persisted to ``state_dir``; a
killed run restarts at the first unfinished block and ends with an identical result.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from omniquant import act_stats as act_stats_lib
from omniquant.block import BlockConfig, QuantBlock
from omniquant.errors import UserError
from omniquant.metrics import peak_rss_gb
from omniquant.models.architectures import architecture_of, decoder_layers
from omniquant.setting import QuantSetting

NAN_POLICIES = ("raise", "retry")


class CalibrationDiverged(UserError):
    """A block's loss became NaN/Inf and the policy could not recover."""


@dataclass(frozen=True)
class CalibConfig:
    epochs: int = 20
    lwc: bool = True
    let: bool = False
    lwc_lr: float = 1e-2
    let_lr: float = 5e-3
    wd: float = 0.0
    batch_size: int = 1
    aug_loss: bool = False
    alpha: float = 0.5
    weight_stat: str = "abs"  # abs | signed (paper-era)
    tie_rope: bool = True
    amp: str = "auto"  # auto: bf16 autocast on GPU (fp32 for 8-bit settings), fp32 on CPU
    nan_policy: str = "raise"
    nan_retries: int = 3

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise UserError(f"nan_policy={self.nan_policy!r} is unknown; use one of {', '.join(NAN_POLICIES)}")
        if self.weight_stat not in ("abs", "signed"):
            raise UserError(f"let_weight_stat={self.weight_stat!r} is unknown; use abs or signed")
        if self.epochs < 0 or self.batch_size < 1:
            raise UserError(f"epochs={self.epochs}, batch_size={self.batch_size}: need epochs >= 0, batch_size >= 1")


@dataclass
class BlockRecord:
    block: int
    seconds: float = 0.0
    peak_mem_gb: float = 0.0
    epoch_loss: list[float] = field(default_factory=list)
    epoch_grad_norm: list[float] = field(default_factory=list)
    retries: int = 0
    resumed: bool = False


def block_config(setting: QuantSetting, cc: CalibConfig) -> BlockConfig:
    return BlockConfig(weight=setting.weight_spec, act=setting.act_spec, lwc=cc.lwc, let=cc.let, tie_rope=cc.tie_rope)


def install(layers: nn.ModuleList, i: int, block: QuantBlock) -> None:
    """Keep the wrapper where activations are quantized; else the plain (fused) HF layer."""
    layers[i] = block if block.cfg.act is not None else block.layer


def _autocast(device: torch.device, setting: QuantSetting, amp: str):
    eight_bit = 8 <= min(setting.wbits, setting.abits) < 16
    if device.type != "cuda" or amp == "off" or (amp == "auto" and eight_bit):
        return contextlib.nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def _peak_mem_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else peak_rss_gb()


def _buffer_device(device: torch.device, n_bytes: int) -> torch.device:
    """Calibration activations live on the GPU if they fit in half its free memory, else CPU."""
    if device.type == "cuda" and n_bytes < 0.5 * torch.cuda.mem_get_info(device)[0]:
        return device
    return torch.device("cpu")


def fingerprint(**parts) -> str:
    digest = hashlib.sha256()
    for key in sorted(parts):
        value = parts[key]
        if isinstance(value, torch.Tensor):
            digest.update(value.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


class _State:
    """Per-block resume files: ``block_XXX.safetensors``, ``chain.safetensors``, ``progress.json``."""

    def __init__(self, root: Path | None, fp: str):
        self.root, self.fp = root, fp

    def next_block(self) -> int:
        if self.root is None or not (self.root / "progress.json").is_file():
            return 0
        progress = json.loads((self.root / "progress.json").read_text())
        if progress.get("fingerprint") != self.fp:
            print(f"omniquant: resume state in {self.root} is for another configuration; starting over")
            return 0
        return int(progress["next_block"])

    def block_params(self, i: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / f"block_{i:03d}.safetensors"))

    def chain(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / "chain.safetensors"))

    def save(self, i: int, params: dict[str, torch.Tensor], chain: dict[str, torch.Tensor]) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_save(params, self.root / f"block_{i:03d}.safetensors")
        _atomic_save(chain, self.root / "chain.safetensors")
        tmp = self.root / "progress.json.tmp"
        tmp.write_text(json.dumps({"fingerprint": self.fp, "next_block": i + 1}))
        os.replace(tmp, self.root / "progress.json")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _train_block(qblock: QuantBlock, i: int, q_in: torch.Tensor, targets: list[torch.Tensor], pe,
                 cc: CalibConfig, setting: QuantSetting, device: torch.device, record: BlockRecord,
                 bar: tqdm) -> None:
    """AdamW on the block's LWC/LET parameters with the NaN policy."""
    initial = {k: v.detach().clone() for k, v in qblock.state_dict().items() if k.startswith(("lwc.", "let."))}
    lr_scale = 1.0
    for attempt in range(cc.nan_retries + 1):
        groups = [{"params": list(qblock.let.parameters()), "lr": cc.let_lr * lr_scale},
                  {"params": list(qblock.lwc.parameters()), "lr": cc.lwc_lr * lr_scale}]
        groups = [g for g in groups if g["params"]]
        params = [p for g in groups for p in g["params"]]
        if not params:
            return
        opt = torch.optim.AdamW(groups, weight_decay=cc.wd)
        record.epoch_loss, record.epoch_grad_norm = [], []
        try:
            for epoch in range(cc.epochs):
                losses, norms = [], []
                for start in range(0, q_in.shape[0], cc.batch_size):
                    sl = slice(start, start + cc.batch_size)
                    with _autocast(device, setting, cc.amp):
                        out = qblock(q_in[sl].to(device), position_embeddings=pe)
                        loss = sum(nn.functional.mse_loss(out.float(), t[sl].to(device).float()) for t in targets)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} in block {i}, epoch {epoch}, "
                                                 f"step {start // cc.batch_size}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    norms.append(torch.nn.utils.clip_grad_norm_(params, float("inf")).item())
                    opt.step()
                    losses.append(loss.item())
                record.epoch_loss.append(sum(losses) / len(losses))
                record.epoch_grad_norm.append(sum(norms) / len(norms))
                bar.set_postfix(block=i, epoch=epoch, loss=f"{record.epoch_loss[-1]:.3e}",
                                grad=f"{record.epoch_grad_norm[-1]:.2e}")
            return
        except FloatingPointError as err:
            if cc.nan_policy == "raise" or attempt == cc.nan_retries:
                raise CalibrationDiverged(
                    f"{err} (after {attempt} retries); use method.nan_policy=retry or lower the learning rates"
                ) from None
            record.retries += 1
            lr_scale /= 2
            qblock.load_state_dict(initial, strict=False)
            print(f"omniquant: {err}; restored block {i} and retrying with learning rates x{lr_scale:g}")


def calibrate(
    model: nn.Module,
    setting: QuantSetting,
    windows: torch.Tensor,
    cc: CalibConfig,
    stats: dict[str, torch.Tensor] | None = None,
    state_dir: Path | None = None,
    saved_params: dict[str, torch.Tensor] | None = None,
    device: torch.device | None = None,
) -> tuple[dict, dict[str, torch.Tensor], list[BlockRecord]]:
    """Quantize ``model`` (kept on CPU) in place, block by block.

    Returns ``(qparams, learned_params, block_records)``. ``saved_params`` (a learned-parameter
    file) with ``epochs=0`` rebuilds a previous result without training.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = architecture_of(model)
    layers = decoder_layers(model)
    model_dtype = next(model.parameters()).dtype
    bcfg = block_config(setting, cc)
    model.requires_grad_(False)  # only LWC/LET parameters are trained
    if cc.let and stats is None and saved_params is None:
        raise UserError("LET needs activation statistics: run the act_stats stage first")
    state = _State(state_dir, fingerprint(setting=asdict(setting), cc=asdict(cc), windows=windows,
                                          layers=len(layers), saved=saved_params is not None))
    start_block = state.next_block() if cc.epochs > 0 else 0

    train = cc.epochs > 0
    embed = model.get_input_embeddings()
    rotary = model.get_submodule(arch.rotary)
    with torch.no_grad():
        embed.to(device)
        rotary.to(device)
        ids = windows.to(device)
        positions = torch.arange(windows.shape[1], device=device).unsqueeze(0)
        n_bytes = windows.numel() * embed.embedding_dim * 4 * (3 if cc.aug_loss else 2)
        buf = _buffer_device(device, n_bytes)
        fp_in = embed(ids).float().to(buf) if train else None
        q_in = fp_in.clone() if train else None
        pe = tuple(t.float() for t in rotary(embed(ids[:1]).float(), positions))
        embed.to("cpu")
    if start_block and train:
        chain = state.chain()
        fp_in, q_in = chain["fp_in"].to(buf), chain["q_in"].to(buf)

    qparams: dict = {}
    learned: dict[str, torch.Tensor] = {}
    records: list[BlockRecord] = []
    bar = tqdm(range(len(layers)), desc=f"omniquant {setting.name}", unit="block", dynamic_ncols=True)
    for i in bar:
        prefix = f"{arch.layers}.{i}"
        record = BlockRecord(block=i)
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        layer = layers[i].to(device=device, dtype=torch.float32)
        block_stats = act_stats_lib.for_block(stats, prefix) if stats is not None else None
        qblock = QuantBlock(layer, bcfg, block_stats, cc.alpha, cc.weight_stat)
        resumed = i < start_block
        own = state.block_params(i) if resumed else _params_for(saved_params, prefix)
        if own:
            qblock.load_state_dict(own, strict=False)
        if train and not resumed:
            fp_block = QuantBlock(layer, BlockConfig(weight=None))
            with torch.no_grad(), _autocast(device, setting, cc.amp):
                fp_out = _run(fp_block, fp_in, pe, cc.batch_size, device)
                targets = [fp_out] + ([_run(fp_block, q_in, pe, cc.batch_size, device)] if cc.aug_loss else [])
            _train_block(qblock, i, q_in, targets, pe, cc, setting, device, record, bar)
            fp_in = fp_out
        record.resumed = resumed
        block_learned = {k: v.detach().cpu().clone() for k, v in qblock.state_dict().items()
                         if k.startswith(("lwc.", "let."))}
        learned |= {f"{prefix}.{k}": v for k, v in block_learned.items()}
        qparams |= {f"{prefix}.{name}": d for name, d in qblock.fuse_().items()}
        layer.to(dtype=model_dtype)
        if train and not resumed:
            with torch.no_grad(), _autocast(device, setting, cc.amp):
                q_in = _run(qblock, q_in, pe, cc.batch_size, device)
            state.save(i, block_learned, {"fp_in": fp_in, "q_in": q_in})
        install(layers, i, qblock)
        layers[i].to("cpu")
        record.seconds = time.perf_counter() - t0
        record.peak_mem_gb = _peak_mem_gb(device)
        records.append(record)
    rotary.to("cpu")
    return qparams, learned, records


def _params_for(saved: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor]:
    if not saved:
        return {}
    return {k[len(prefix) + 1:]: v for k, v in saved.items() if k.startswith(prefix + ".")}


@torch.no_grad()
def _run(block: nn.Module, inputs: torch.Tensor, pe, batch_size: int, device: torch.device) -> torch.Tensor:
    outs = [block(inputs[s:s + batch_size].to(device), position_embeddings=pe).float().to(inputs.device)
            for s in range(0, inputs.shape[0], batch_size)]
    return torch.cat(outs)


"""What every export shares: the model's integer codes, bit packing, setting checks, HF checkpoint files,
and the quantize-stage directory itself (:func:`save_quantized`), every folder written atomically (:func:`staged`).

A quantized model is its fake-quantized HF weights plus, per decoder-block linear, the ``scales``
and ``zeros`` ``[out, n_groups]`` of :mod:`omniquant.quantizer`'s grid. The integer codes are
recovered as ``q = round(w / s + z)`` and accepted only if ``(q - z)·s`` reproduces every weight
bit for bit (in the checkpoint's dtype), so an export never re-quantizes.
"""
from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from omniquant.block import plain_layers
from omniquant.errors import UserError
from omniquant.arch import packable_adapter
from omniquant.layout import LEARNED_FILE, record_file
from omniquant.metrics import write_json
from omniquant.packing import codes_from_weight, read_qparams
from omniquant.quantizer import QuantSpec
from omniquant.setting import QuantSetting

QPARAMS_FILE = "qparams.safetensors"  # written by the quantize stage next to the fake-quantized checkpoint
WORD_BITS = 32


@dataclass(frozen=True)
class IntLinear:
    """One quantized linear on the integer grid: ``w = (codes - zeros)·scales`` per group."""

    codes: torch.Tensor  # [out, in] uint8 in [0, 2^bits - 1]
    scales: torch.Tensor  # [out, n_groups] float32
    zeros: torch.Tensor  # [out, n_groups] int32 (may lie outside the code range)


@dataclass(frozen=True)
class QuantizedModel:
    """A fake-quantized model split into integer linears and the tensors that stay in floating point."""

    config: PretrainedConfig
    setting: QuantSetting
    dtype: torch.dtype  # the checkpoint's floating-point dtype
    linears: dict[str, IntLinear]  # by module path, e.g. ``model.layers.0.self_attn.q_proj``
    tensors: dict[str, torch.Tensor]  # every other checkpoint tensor (embeddings, norms, head, biases)
    ignored: tuple[str, ...]  # nn.Linear modules left in floating point (e.g. ``lm_head``)
    tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def spec(self) -> QuantSpec:
        spec = self.setting.weight_spec
        assert spec is not None, "quantized_model() only builds weight-quantized models"
        return spec


def integer_linear(name: str, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   spec: QuantSpec) -> IntLinear:
    """The integer form of one fake-quantized weight ``[out, in]`` (codes recovered by
    :func:`omniquant.packing.codes_from_weight`); raises :class:`UserError` unless they reproduce it exactly."""
    rows, cols = weight.shape
    expected = (rows, -(-cols // (spec.group_size or cols)))
    if scales.shape != expected or zeros.shape != expected:
        raise UserError(f"{name}: scales/zeros of shape {tuple(scales.shape)}/{tuple(zeros.shape)} do not fit a "
                        f"{rows}x{cols} weight at {spec.tag} (expected {expected})")
    if not torch.equal(zeros, zeros.round()):
        raise UserError(f"{name}: zero points are not integers; pass the zeros of the integer grid")
    try:
        codes = codes_from_weight(weight, scales, zeros, spec)
    except ValueError as err:
        raise UserError(f"{name}: {err}; export the quantize stage's own checkpoint") from None
    return IntLinear(codes, scales, zeros.to(torch.int32))


def quantized_model(
    model: nn.Module,
    setting: QuantSetting,
    qparams: Mapping[str, Mapping[str, torch.Tensor]],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> QuantizedModel:
    """Split a fake-quantized HF model into integer linears and floating-point tensors.

    ``qparams`` maps each decoder-block linear path to its ``scales`` and ``zeros`` (a method's
    ``QuantResult.qparams``); the codes are recovered from the weights.
    """
    spec = setting.weight_spec
    if spec is None:
        raise UserError(f"setting {setting.name} does not quantize weights: there is nothing to export")
    adapter = packable_adapter(model)
    with plain_layers(model):
        linears: dict[str, IntLinear] = {}
        for i, layer in enumerate(adapter.decoder_layers(model)):
            for name in dict.fromkeys(v.packed_key for v in adapter.layout(layer, model.config).quantized.values()):
                linear = layer.get_submodule(name)
                path = f"{adapter.layers}.{i}.{name}"
                if path not in qparams:
                    raise UserError(f"no scales/zeros for {path}: pass the quantize stage's qparams")
                q = {k: t.detach().cpu() for k, t in qparams[path].items()}
                weight = linear.weight.detach().cpu()
                linears[path] = integer_linear(path, weight, q["scales"].float(), q["zeros"].float(), spec)
                dtype = weight.dtype
        tensors = {k: t.detach().cpu() for k, t in model.state_dict().items()
                   if k.removesuffix(".weight") not in linears}
        ignored = tuple(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears)
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # stored once, as the input embedding
    config = copy.deepcopy(model.config)
    config.architectures = config.architectures or [type(model).__name__]
    return QuantizedModel(config, setting, dtype, linears, tensors, ignored, tokenizer)


def load_quantized(path: str | Path, setting: QuantSetting) -> QuantizedModel:
    """Read a quantize-stage directory (fake-quantized HF checkpoint + ``qparams.safetensors``)."""
    path = Path(path)
    if not (path / QPARAMS_FILE).is_file():
        raise UserError(f"{path} has no {QPARAMS_FILE}: export needs a quantize-stage output directory")
    qparams = read_qparams(path / QPARAMS_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
    return quantized_model(model, setting, qparams, AutoTokenizer.from_pretrained(path))


# ------------------------------------------------------------------------------------------ packing
def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack each row of unsigned ``bits``-bit codes densely into int32 words.

    Code ``i`` of a row occupies bits ``i·bits ..`` of the row's little-endian bit stream, split
    across two words where it straddles a boundary; the last word is zero-padded. For 4 bits this
    is eight codes per word, code ``i % 8`` at bit ``4·(i % 8)``.
    """
    rows, cols = codes.shape
    chunks = nn.functional.pad(codes.to(torch.int64), (0, -cols % WORD_BITS)).reshape(rows, -1, WORD_BITS)
    words = torch.zeros(rows, chunks.shape[1], bits, dtype=torch.int64)
    for i in range(WORD_BITS):
        word, shift = divmod(i * bits, WORD_BITS)
        words[:, :, word] |= (chunks[:, :, i] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:
            words[:, :, word + 1] |= chunks[:, :, i] >> (WORD_BITS - shift)
    words = words.reshape(rows, -1)[:, : -(-cols * bits // WORD_BITS)]
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement


def unpack_int32(words: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``cols`` codes of each row, as uint8."""
    rows = words.shape[0]
    stream = nn.functional.pad(words.to(torch.int64) & 0xFFFFFFFF, (0, -words.shape[1] % bits))
    stream = stream.reshape(rows, -1, bits)
    codes = torch.empty(rows, stream.shape[1], WORD_BITS, dtype=torch.int64)
    for i in range(WORD_BITS):
        word, shift = divmod(i * bits, WORD_BITS)
        value = stream[:, :, word] >> shift
        if shift + bits > WORD_BITS:
            value |= stream[:, :, word + 1] << (WORD_BITS - shift)
        codes[:, :, i] = value & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :cols].to(torch.uint8)


# ------------------------------------------------------------------------------------------ checks
def unsupported(qm: QuantizedModel, fmt: str, reason: str) -> UserError:
    return UserError(f"{fmt} export cannot represent setting {qm.setting.name} ({qm.spec.tag}): {reason}")


def require_weight_only(qm: QuantizedModel, fmt: str, why: str = "the format stores no activation quantization"
                        ) -> None:
    if qm.setting.act_spec is not None:
        raise unsupported(qm, fmt, f"it also quantizes activations to {qm.setting.abits} bits, and {why}; "
                                   "export a weight-only setting")


def require_grid(qm: QuantizedModel, fmt: str, bits: int | None = None, group_size: int | None = None) -> None:
    """Bit width and group size the format fixes (``None``: any)."""
    if bits is not None and qm.spec.bits != bits:
        raise unsupported(qm, fmt, f"it needs {bits}-bit weights")
    if group_size is not None and qm.spec.group_size != group_size:
        raise unsupported(qm, fmt, f"it needs groups of {group_size} input channels")


def require_whole_groups(qm: QuantizedModel, fmt: str) -> None:
    """Every linear's in_features must be a multiple of the group size (no padded last group)."""
    group = qm.spec.group_size
    for name, linear in qm.linears.items():
        if group and linear.codes.shape[1] % group:
            raise unsupported(qm, fmt, f"{name} has {linear.codes.shape[1]} input features, not a multiple of "
                                       f"group_size={group}, and the format has no partial groups")


def require_zeros_in_range(qm: QuantizedModel, fmt: str) -> None:
    """Integer zero points must fit the code range (OmniQuant's grid only clamps them to ±1e4)."""
    for name, linear in qm.linears.items():
        low, high = linear.zeros.min().item(), linear.zeros.max().item()
        if low < 0 or high > qm.spec.qmax:
            raise unsupported(qm, fmt, f"{name} has zero points in [{low}, {high}], outside [0, {qm.spec.qmax}] "
                                       "(a group whose weights all share one sign)")


# ------------------------------------------------------------------------------------------ writing
@contextmanager
def staged(out: str | Path, suffix: str = ".partial") -> Iterator[Path]:
    """A fresh sibling folder ``<out><suffix>`` to write into: renamed to ``out`` (replacing it) when the block
    completes, removed when it raises (an interrupt too), so ``out`` is never half written."""
    out = Path(out)
    staging = out.with_name(out.name + suffix)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = staging.with_name(staging.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)  # aside first: a slow or interrupted delete never leaves half of the old ``out``
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def save_quantized(out: str | Path, setting: QuantSetting, method: str, record: dict[str, Any],
                   model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                   qparams: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                   learned: dict[str, torch.Tensor] | None = None, suffix: str = ".partial") -> Path:
    """Write a quantize-stage directory ``out`` atomically (:func:`staged`): the fake-quantized HF checkpoint,
    tokenizer, ``qparams`` and ``learned`` parameters when ``model`` is given, and the quant record (``record``
    with the setting's name, ``method`` and the full setting under ``quant``)."""
    with staged(out, suffix) as staging:
        if model is not None:
            with plain_layers(model):
                model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            save_file({f"{name}.{key}": t.contiguous() for name, d in (qparams or {}).items() for key, t in d.items()},
                      str(staging / QPARAMS_FILE))
            if learned:
                save_file(learned, str(staging / LEARNED_FILE))
        write_json(record_file(staging), record | {"setting": setting.name, "method": method,
                                                   "quant": setting.record()})
    return Path(out)


def write_hf_checkpoint(qm: QuantizedModel, out: Path, tensors: dict[str, torch.Tensor],
                        quantization_config: dict, dtype: torch.dtype) -> Path:
    """An HF checkpoint directory: ``config.json`` with ``quantization_config``, ``model.safetensors``, tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    config = qm.config.to_dict() | {"dtype": str(dtype).removeprefix("torch."),
                                    "quantization_config": quantization_config}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if qm.tokenizer is not None:
        qm.tokenizer.save_pretrained(out)
    return out


def float_tensors(qm: QuantizedModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The non-quantized tensors in ``dtype``."""
    return {k: t.to(dtype) if t.is_floating_point() else t for k, t in qm.tensors.items()}

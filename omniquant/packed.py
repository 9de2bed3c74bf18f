"""Inference on packed weights: :class:`PackedLinear` and a model built from a packed file alone.

``PackedLinear`` keeps only the packed tensors of :mod:`omniquant.packing`. Its forward picks:

- CUDA input, Triton importable, grouped weight (group a multiple of 32), at most
  :data:`omniquant.kernels.MAX_ROWS` rows: the fused Triton dequantize-matmul kernel;
- CPU float32 input, a layout :mod:`omniquant.kernels.cpu` takes (in_features and group multiples of
  32) and the kernels built: up to :data:`CPU_MATMUL_MAX_ROWS` rows (decoding), the fused kernel
  that decodes the codes in registers (float32 accumulation in another order than the dense
  matmul: equal to it within float rounding); more rows (prefill, perplexity), the kernels'
  dequantization, bit-identical to the fake-quantized weight, then ``F.linear`` (so the packed
  perplexity equals the fake-quantized one). After :func:`use_int8_activations`, the decoding rows
  go through the int8-activation kernel instead (x rounded to int8 per block of 32; VNNI or AVX2);
- CPU bfloat16 input, 4-bit, group 32/64/128/256, ``out`` a multiple of 16: torch's int4 kernel
  (``aten._weight_int4pack_mm_for_cpu``, the ``torch_int4`` benchmark variant). It computes
  ``w = (q - 8)·s + m`` per group, so our ``(q - z)·s`` maps exactly onto ``m = (8 - z)·s``. It
  needs whole groups, so a short last group is padded (codes and input with zeros, which adds
  nothing). Its tile layout is built on the first such forward and cached on the module;
- otherwise: dequantize to the input dtype, then ``F.linear`` (bit-identical to the
  fake-quantized model). Where the CPU kernels cannot be built, the first such forward warns once,
  saying why.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from omniquant import kernels
from omniquant.errors import UserError
from omniquant.kernels import cpu as cpu_kernels
from omniquant.packing import INT8_TENSORS, PACKED_TENSORS, PackedWeight, load_packed, pack_weight, spec_of

INT4_CPU_GROUPS = (32, 64, 128, 256)
INT4_CPU_OFFSET = 8  # torch's int4 kernels decode q - 8
INT4_INNER_K_TILES = 2
CPU_MATMUL_MAX_ROWS = 8  # float32 rows per forward up to which the fused CPU kernel beats dequantize + matmul


class PackedLinear(nn.Module):
    """A linear layer on packed low-bit weights (no full-precision weight is held)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        for name, t in weight.tensors().items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features, self.spec = weight.in_features, weight.out_features, weight.spec
        self.int4_cpu = (  # bfloat16 CPU forwards use torch's int4 kernel
            self.spec.bits == 4 and self.spec.group_size in INT4_CPU_GROUPS and self.out_features % 16 == 0
        )
        self.cpu_kernel = cpu_kernels.supports(weight)  # float32 CPU forwards use omniquant.kernels.cpu
        self.int8_activations = False  # decoding rows through cpu_kernels.matmul_a8 (use_int8_activations)
        self._int4: tuple[torch.dtype, torch.Tensor, torch.Tensor] | None = None
        self._decoding: tuple[str, Callable[[torch.Tensor], torch.Tensor]] | None = None  # (path, bound kernel call)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.qzeros, self.in_features, self.spec)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if (x.is_cuda and x.numel() // self.in_features <= kernels.MAX_ROWS and kernels.supports(self.packed)
                and kernels.available()):
            y = kernels.quant_matmul(x, self.packed)
        elif path in ("cpu_matmul", "cpu_matmul_a8"):  # decoding: the bound call, bias included
            return self.decoding_call(path)(x)
        elif path == "int4":
            y = self._int4_matmul(x)
        else:
            weight = cpu_kernels.dequantize(self.packed) if path == "cpu_dequantize" else self.dequantized_weight(x.dtype)
            return F.linear(x, weight, self.bias)
        return y if self.bias is None else y + self.bias

    def decoding_call(self, path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The CPU kernel call of ``path`` (``cpu_matmul`` or ``cpu_matmul_a8``), bias included
        (:func:`omniquant.kernels.cpu.decoding_matmul` or ``decoding_matmul_a8``), bound to this layer's tensors on its
        first use (rebuilt after a state-dict load)."""
        if self._decoding is None or self._decoding[0] != path:
            weight = self.packed
            call = (cpu_kernels.decoding_matmul_a8(weight, bias=self.bias) if path == "cpu_matmul_a8"
                    else cpu_kernels.decoding_matmul(weight, cpu_kernels.zero_scales(weight), self.bias))
            self._decoding = (path, call)
        return self._decoding[1]

    def path(self, x: torch.Tensor) -> str:
        """The CPU path ``forward(x)`` takes: ``cpu_matmul`` (``cpu_matmul_a8`` after :func:`use_int8_activations`),
        ``cpu_dequantize``, ``int4`` or ``dequantize``."""
        if x.device.type != "cpu":
            return "dequantize"
        if x.dtype == torch.bfloat16 and self.int4_cpu:
            return "int4"
        if x.dtype == torch.float32 and self.cpu_kernel and _cpu_kernels_built():
            if x.numel() // self.in_features > CPU_MATMUL_MAX_ROWS:
                return "cpu_dequantize"
            return "cpu_matmul_a8" if self.int8_activations else "cpu_matmul"
        return "dequantize"

    def _int4_matmul(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.scales.shape[1] * self.spec.group_size - self.in_features  # short last group
        if self._int4 is None or self._int4[0] != x.dtype:
            packed = self.packed
            codes = F.pad(packed.codes().to(torch.int32), (0, pad))
            offset = (INT4_CPU_OFFSET - packed.zeros()) * self.scales
            scales_and_zeros = torch.stack([self.scales.T, offset.T], dim=-1).to(x.dtype).contiguous()
            tiles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES)
            self._int4 = (x.dtype, tiles, scales_and_zeros)
        _, tiles, scales_and_zeros = self._int4
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            F.pad(x.reshape(-1, self.in_features), (0, pad)).contiguous(), tiles, self.spec.group_size, scales_and_zeros
        )
        return y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._int4 = self._decoding = None  # new packed data: rebuild the cached layouts and calls
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.tag}, bias={bias}"


def stack_rows(layers: list[PackedLinear]) -> PackedLinear:
    """One packed linear whose output rows are those of ``layers`` in order (same input and spec),
    e.g. q, k and v as one matmul; its codes, scales and zeros are theirs, repacked exactly."""
    spec = layers[0].spec
    if any(m.spec != spec or m.in_features != layers[0].in_features for m in layers):
        raise ValueError("stacked packed linears need the same input size and quantization spec")
    weights = [m.packed for m in layers]
    stacked = pack_weight(torch.cat([w.codes() for w in weights]), torch.cat([w.scales for w in weights]),
                          torch.cat([w.zeros() for w in weights]), spec)
    biases = [m.bias for m in layers]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([torch.zeros(m.out_features) if b is None else b for m, b in zip(layers, biases)])
    out = PackedLinear(stacked, bias)
    out.int8_activations = any(m.int8_activations for m in layers)
    return out


class Int8Linear(nn.Module):
    """A bias-free linear on int8 rows with one float32 scale each (the 8-bit LM head of
    :mod:`omniquant.packing`): the CPU kernels' int8 matmul for float32 decoding rows, else dequantize."""

    def __init__(self, int8_weight: torch.Tensor, int8_scales: torch.Tensor):
        super().__init__()
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("int8_scales", int8_scales)
        self.out_features, self.in_features = int8_weight.shape
        self.int8_activations = False  # decoding rows through cpu_kernels.int8_matmul_a8 (use_int8_activations)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.int8_weight.float() * self.int8_scales[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (x.device.type == "cpu" and x.dtype == torch.float32 and rows <= CPU_MATMUL_MAX_ROWS
                and self.in_features % 8 == 0 and _cpu_kernels_built()):
            matmul = cpu_kernels.int8_matmul_a8 if self.int8_activations else cpu_kernels.int8_matmul
            return matmul(x, self.int8_weight, self.int8_scales)
        return F.linear(x, self.dequantized_weight(x.dtype))


class Int8Embedding(Int8Linear):
    """An embedding lookup on the same int8 rows and scales (``float32`` rows ``q·s``), times the
    embedding's own row factor ``embed_scale`` (Gemma 3: √hidden; 1 for a plain embedding)."""

    def __init__(self, int8_weight: torch.Tensor, int8_scales: torch.Tensor, embed_scale: float = 1.0):
        super().__init__(int8_weight, int8_scales)
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.int8_weight).float() * self.int8_scales[ids].unsqueeze(-1)
        return rows if self.embed_scale == 1.0 else rows * self.embed_scale


def use_int8_activations(model: nn.Module) -> int:
    """Send ``model``'s decoding rows (float32, CPU, up to :data:`CPU_MATMUL_MAX_ROWS`) through the
    int8-activation kernels: every :class:`PackedLinear` on the CPU kernels' layout, and an 8-bit
    :class:`Int8Linear` head whose input width is a multiple of 32. Returns how many modules changed;
    raises :class:`UserError` where the kernels cannot run (no silent fallback)."""
    reason = cpu_kernels.unavailable()
    if reason is not None:
        raise UserError(f"int8 activations need the CPU kernels: {reason}")
    changed = [m for m in model.modules() if (isinstance(m, PackedLinear) and m.cpu_kernel) or (
        type(m) is Int8Linear and m.in_features % cpu_kernels.A8_BLOCK == 0)]
    for m in changed:
        m.int8_activations = True
    return len(changed)


@functools.cache
def _cpu_kernels_built() -> bool:
    """Whether :mod:`omniquant.kernels.cpu` runs here (built on the first call); warns once if not."""
    reason = cpu_kernels.unavailable()
    if reason is not None:
        warnings.warn(f"packed CPU linears dequantize (slow): {reason}", RuntimeWarning, stacklevel=3)
    return reason is None


def load_packed_model(path: str | Path) -> nn.Module:
    """An HF causal LM built from a packed checkpoint alone, its quantized linears as :class:`PackedLinear`."""
    tensors, header = load_packed(path)
    spec = spec_of(header)
    config = AutoConfig.for_model(**header["config"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, header["dtype"]))
    for name, (_, in_features) in header["linears"].items():
        weight = PackedWeight(*(tensors[f"{name}.{t}"] for t in PACKED_TENSORS), in_features, spec)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear(weight, tensors.get(f"{name}.bias")))
    for path, stored in header.get("int8", {}).items():  # 8-bit embeddings (a tied pair shares its tensors)
        int8 = [tensors[f"{stored}.{t}"] for t in INT8_TENSORS]
        tensors |= {f"{path}.{t}": x for t, x in zip(INT8_TENSORS, int8)}
        if isinstance(model.get_submodule(path), nn.Embedding):
            layer = Int8Embedding(*int8, header.get("embed_scale", {}).get(path, 1.0))
        else:
            layer = Int8Linear(*int8)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    tensors |= {alias: tensors[stored] for alias, stored in header["aliases"].items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    for module in model.modules():  # non-persistent buffers (rotary inv_freq, embedding scales) are not in the file
        if any(b.is_meta for b in module.buffers(recurse=False)):
            loaded = {k: t.clone() for k, t in module.state_dict().items() if "." not in k and not t.is_meta}
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)  # computes the buffers; may also re-initialise the loaded weights
            module.load_state_dict(loaded, strict=False, assign=True)
    return model.eval()


def byte_counts(model: nn.Module) -> dict[str, int]:
    """Bytes of the packed linears (codes, scales, zeros), of every other tensor, and in total."""
    linears = sum(m.packed.nbytes for m in model.modules() if isinstance(m, PackedLinear))
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # tied tensors once
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"packed_linears": linears, "other": total - linears, "total": total}


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over all packed linears, scales and zero points included."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    weights = sum(m.in_features * m.out_features for m in layers)
    return 8 * sum(m.packed.nbytes for m in layers) / weights

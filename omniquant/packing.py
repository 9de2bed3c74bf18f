"""Bit-packing of quantized linear weights and the packed checkpoint file (format version 1).

**Code streams.** A stream of ``L`` integer codes of ``bits`` bits is padded with zero codes to
``Lp = ceil(L/32)*32`` and split into *bit planes* whose widths are the powers of two that make up
``bits``, widest first (:func:`planes`): 2 → (2), 3 → (2, 1), 4 → (4), 8 → (8) (5..7 likewise).
The plane holding code bits ``[b, b+w)`` starts at word ``Lp/32 * b`` of the stream and stores
code ``i`` in word ``Lp/32 * b + i*w // 32`` at bit ``i*w % 32`` (little-endian: bit 0 is the
least significant). Words are int32 (bit patterns of uint32). A stream takes ``Lp*bits/32``
words: exactly ``bits`` bits per code, no code straddles a word, every index is a shift.
3-bit is 32 codes in 3 words: two words of low 2-bit pairs, one word of high bits.

**One linear** ``W [out, in]`` quantized with group size ``g`` (``g = in`` per channel),
``n_groups = ceil(in/g)`` (the last group may be shorter, see :func:`omniquant.quantizer.to_groups`):

- ``qweight`` int32 ``[out, ceil(in/32)*bits]``: one code stream per output row, codes along ``in``;
- ``scales`` float32 ``[out, n_groups]``: float32 keeps dequantization bit-exact with the
  fake-quantized weights (fp16 would save ``16/g`` bits per weight but round the scales);
- ``qzeros`` int32 ``[ceil(out*n_groups/32)*bits]``: one stream of the row-major ``[out, n_groups]``
  integer zero points (stored as is, no ``-1`` offset; symmetric grids store ``2^(bits-1)-1``).

Dequantization is ``(q - z)·s`` in float32, :func:`omniquant.quantizer.dequantize_weight`.

**Checkpoint file.** One safetensors file: ``<linear>.qweight``/``.scales``/``.qzeros`` for every
packed linear, every other state-dict tensor (embeddings, norms, biases, ``lm_head``) under its
own name, each tied tensor once. Metadata: ``format`` (``omniquant-packed``), ``format_version``
(``1``) and ``header``, a JSON object with ``bits``, ``group_size``, ``symmetric``,
``scale_dtype``, ``dtype`` (of the other tensors), ``config`` (the HF config), ``linears``
(``{path: [out, in]}``), ``aliases`` (``{tied name: stored name}``) and ``int8``
(``{module path: stored module path}``, empty unless asked for) and ``embed_scale`` (``{module path:
factor}`` for an input embedding that multiplies its rows, like Gemma 3's by √hidden).

**8-bit embeddings** (``embedding_bits=8``). The input embedding and the LM head, the largest
float tensors of a small model (SmolLM2-135M: 28M of its 135M weights, tied), can be stored as
``<module>.int8_weight`` (int8 ``[rows, cols]``) and ``<module>.int8_scales`` (float32 ``[rows]``):
symmetric per row, ``s = max|w|/127``, ``w ≈ q·s``. A tied pair is stored once (``int8`` maps
both module paths to it); a scaled input embedding keeps its factor in ``embed_scale``, the rows
stay those of the tied head. This is a lossy option on top of the method's quantization: its
perplexity cost is measured by the pack stage.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from omniquant.arch import packable_adapter
from omniquant.content import save_tensors
from omniquant.errors import UserError
from omniquant.quantizer import QuantSpec, dequantize_weight

FORMAT = "omniquant-packed"
FORMAT_VERSION = 1
WORD_BITS = 32
PACKED_TENSORS = ("qweight", "scales", "qzeros")
INT8_TENSORS = ("int8_weight", "int8_scales")
EMBEDDING_BITS = (8,)  # the widths embedding_bits= takes


def planes(bits: int) -> tuple[tuple[int, int], ...]:
    """``(width, first code bit)`` of each bit plane, widest first: ``planes(3) == ((2, 0), (1, 2))``."""
    out, offset = [], 0
    for width in (8, 4, 2, 1):
        if bits & width:
            out.append((width, offset))
            offset += width
    return tuple(out)


def _check_range(values: torch.Tensor, bits: int, what: str) -> None:
    if values.is_floating_point() and not torch.equal(values, values.round()):
        raise ValueError(f"{what} must be integers to be packed")
    if values.numel() and (values.min() < 0 or values.max() > 2**bits - 1):
        raise ValueError(
            f"{what} must lie in [0, {2**bits - 1}] for {bits}-bit packing, "
            f"got [{values.min().item():g}, {values.max().item():g}]"
        )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[..., L]`` into int32 streams ``[..., ceil(L/32)*bits]`` (layout: module doc)."""
    _check_range(codes, bits, "codes")
    codes = F.pad(codes.to(torch.int64), (0, (-codes.shape[-1]) % WORD_BITS))
    streams = []
    for width, offset in planes(bits):
        plane = ((codes >> offset) & (2**width - 1)).unflatten(-1, (-1, WORD_BITS // width))
        shifts = torch.arange(0, WORD_BITS, width, device=codes.device)
        streams.append((plane << shifts).sum(-1))
    words = torch.cat(streams, -1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_codes(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``length`` codes (uint8) of each stream."""
    padded = words.shape[-1] * WORD_BITS // bits
    if padded * bits != words.shape[-1] * WORD_BITS or not padded - WORD_BITS < length <= padded:
        raise ValueError(f"{words.shape[-1]} words do not hold a {bits}-bit stream of {length} codes")
    codes = torch.zeros(*words.shape[:-1], padded, dtype=torch.int32, device=words.device)
    for width, offset in planes(bits):
        start = padded // WORD_BITS * offset
        plane = words[..., start:start + padded * width // WORD_BITS]
        shifts = torch.arange(0, WORD_BITS, width, dtype=torch.int32, device=words.device)
        codes |= ((plane.unsqueeze(-1) >> shifts) & (2**width - 1)).flatten(-2) << offset  # the mask drops sign bits
    return codes[..., :length].to(torch.uint8)


@dataclass(frozen=True)
class PackedWeight:
    """One linear weight ``[out, in]`` in the packed layout."""

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor
    in_features: int
    spec: QuantSpec

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in PACKED_TENSORS}

    def codes(self) -> torch.Tensor:
        """Integer codes ``[out, in]`` (uint8)."""
        return unpack_codes(self.qweight, self.spec.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Zero points ``[out, n_groups]`` as float32, like :func:`omniquant.quantizer.quantize_weight`."""
        count = self.out_features * self.n_groups
        return unpack_codes(self.qzeros, self.spec.bits, count).reshape(self.scales.shape).to(self.scales.dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``(q - z)·s``, bit-identical to the fake-quantized weight."""
        return dequantize_weight(self.codes(), self.scales, self.zeros(), self.spec.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight, scales and zero points included."""
        return 8 * self.nbytes / (self.out_features * self.in_features)


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> PackedWeight:
    """Pack codes ``[out, in]`` with scales and zeros ``[out, n_groups]`` (as from ``quantize_weight``)."""
    out, cols = codes.shape
    groups = -(-cols // (spec.group_size or cols))
    if scales.shape != (out, groups) or zeros.shape != (out, groups):
        raise ValueError(
            f"scales {tuple(scales.shape)} and zeros {tuple(zeros.shape)} must have shape {(out, groups)} "
            f"for a [{out}, {cols}] weight with {spec.tag}"
        )
    _check_range(zeros, spec.bits, "zero points")
    return PackedWeight(
        qweight=pack_codes(codes, spec.bits),
        scales=scales.float().contiguous(),
        qzeros=pack_codes(zeros.flatten(), spec.bits),
        in_features=cols,
        spec=spec,
    )


def codes_from_weight(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Recover the integer codes of a fake-quantized weight; raises ValueError if it is not on the grid."""
    cols = weight.shape[-1]
    idx = torch.arange(cols, device=weight.device) // (spec.group_size or cols)
    q = torch.round(weight.float() / scales[:, idx] + zeros[:, idx])
    _check_range(q, spec.bits, "codes recovered from the weight")
    codes = q.to(torch.uint8)
    if not torch.equal(dequantize_weight(codes, scales, zeros, spec.group_size).to(weight.dtype), weight):
        raise ValueError(f"the weight does not lie on the {spec.tag} grid of its scales and zero points")
    return codes


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 codes and float32 scales of ``weight [rows, cols]``: ``w ≈ q·s``."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def _int8_embeddings(model: nn.Module, state: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, float]]:
    """The 8-bit input embedding and LM head (module docstring), popped from ``state``, and the input
    embedding's row factor where it has one (``embed_scale``)."""
    tensors: dict[str, torch.Tensor] = {}
    stored: dict[int, str] = {}
    mapping: dict[str, str] = {}
    names = {id(m): name for name, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    scaled = isinstance(embedding, nn.Embedding) and isinstance(getattr(embedding, "embed_scale", None), torch.Tensor)
    for module in (embedding, head):
        plain = type(module) in (nn.Embedding, nn.Linear) or (module is embedding and scaled)
        if not plain or getattr(module, "bias", None) is not None:
            raise ValueError("8-bit embeddings need a plain (or row-scaled) nn.Embedding / bias-free nn.Linear, "
                             f"got {type(module).__name__}")
        path, ptr = names[id(module)], module.weight.data_ptr()
        if ptr not in stored:
            stored[ptr] = path
            q, scales = int8_rows(module.weight.detach())
            tensors |= {f"{path}.int8_weight": q, f"{path}.int8_scales": scales}
        mapping[path] = stored[ptr]
        state.pop(f"{path}.weight")
    factors = {names[id(embedding)]: float(embedding.embed_scale.to(embedding.weight.dtype))} if scaled else {}
    return tensors, mapping, factors


def pack_model(model: nn.Module, qparams: dict[str, dict[str, torch.Tensor]], spec: QuantSpec,
               embedding_bits: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header of the packed file for a fake-quantized HF model.

    ``qparams`` maps each quantized linear's path to its ``scales`` and ``zeros`` (the pipeline's
    ``QuantResult.qparams``, or :func:`read_qparams` of ``qparams.safetensors``). ``embedding_bits=8``
    stores the input embedding and LM head in 8 bits (module docstring).
    """
    if embedding_bits not in (None, *EMBEDDING_BITS):
        raise ValueError(f"embedding_bits must be one of {EMBEDDING_BITS} or None, got {embedding_bits}")
    try:
        packable_adapter(model)
    except UserError as err:
        raise ValueError(str(err)) from None
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    linears: dict[str, list[int]] = {}
    for path, qp in qparams.items():
        weight, scales, zeros = state.pop(f"{path}.weight"), qp["scales"], qp["zeros"]
        try:
            packed = pack_weight(codes_from_weight(weight, scales, zeros, spec), scales, zeros, spec)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        tensors |= {f"{path}.{name}": t for name, t in packed.tensors().items()}
        linears[path] = list(weight.shape)
    int8: dict[str, str] = {}
    embed_scale: dict[str, float] = {}
    if embedding_bits:
        int8_tensors, int8, embed_scale = _int8_embeddings(model, state)
        tensors |= int8_tensors
    stored: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype)
        if key in stored:
            aliases[name] = stored[key]
        else:
            stored[key] = name
            tensors[name] = t.contiguous()
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    header = {
        "bits": spec.bits,
        "group_size": spec.group_size,
        "symmetric": spec.symmetric,
        "scale_dtype": "float32",
        "dtype": str(dtype).removeprefix("torch."),
        "config": json.loads(model.config.to_json_string()),
        "linears": linears,
        "aliases": aliases,
        "int8": int8,
        "embed_scale": embed_scale,
    }
    return tensors, header


def save_packed(path: str | Path, model: nn.Module, qparams: dict[str, dict[str, torch.Tensor]],
                spec: QuantSpec, embedding_bits: int | None = None) -> Path:
    """Write the packed checkpoint of a fake-quantized model to ``path`` (one safetensors file)."""
    path = Path(path)
    tensors, header = pack_model(model, qparams, spec, embedding_bits)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "header": json.dumps(header)}
    return save_tensors(tensors, path, meta)


def load_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header of a packed checkpoint; raises ValueError for another format or version."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} is not an {FORMAT} v{FORMAT_VERSION} file "
            f"(format={meta.get('format')!r}, version={meta.get('format_version')!r})"
        )
    return load_file(str(path)), json.loads(meta["header"])


def spec_of(header: dict[str, Any]) -> QuantSpec:
    return QuantSpec(header["bits"], header["group_size"], header["symmetric"])


def read_qparams(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """``qparams.safetensors`` (``<linear>.scales``/``.zeros``) back into ``{linear: {scales, zeros}}``."""
    qparams: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(path)).items():
        linear, name = key.rsplit(".", 1)
        qparams.setdefault(linear, {})[name] = t
    return qparams

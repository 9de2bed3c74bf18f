"""CPU kernels on the packed layout (``cpu_packed.cpp``: AVX2 + FMA, AVX-512 where the CPU has it), their
int8-activation twins (``cpu_a8.cpp``: AVX-512 VNNI, or AVX2) and one-token decode helpers (``cpu_decode.cpp``),
built on first use.

The C++ source is compiled with torch's extension builder (ninja, the host's C++ compiler) into
torch's extension cache (``TORCH_EXTENSIONS_DIR``) the first time a kernel is asked for: about a
minute once per machine, then a load. :func:`unavailable` says why the kernels cannot run here
(no AVX2/FMA, no compiler, a failed build), or ``None``; callers report that reason, they do not
fall back silently.

- :func:`matmul`: ``x @ Wᵀ`` with the codes decoded in registers (decoding: a few rows of ``x``);
- :func:`dequantize`: the float32 weight ``(q - z)·s``, bit-identical to
  :meth:`omniquant.packing.PackedWeight.dequantize` (prefill and perplexity: then a dense matmul);
- :func:`int8_matmul`: ``x @ (q·s)ᵀ`` for an int8 weight with one scale per row (the 8-bit head);
- :func:`matmul_a8`, :func:`int8_matmul_a8`: the same two products with ``x`` rounded to int8 per
  block of 32 (:func:`round_activations`, as llama.cpp's Q8 activations) and the products summed in
  int32 on a tiled layout (:func:`a8_layout`), by AVX-512 VNNI where the CPU has it, else by AVX2
  (:func:`a8_isas`); opt-in
  (:func:`omniquant.packed.use_int8_activations`), since they change the numbers, not only the speed;
- :func:`rms_norm`, :func:`attend`, :func:`glu`: the norms, the attention of one new position over a
  KV cache, and the gated activation of :class:`omniquant.decode.Decoder`'s one-token steps; :func:`decode_layer`:
  a whole layer's step from them and its packed linears' bound calls (:func:`decoding_matmul`), and
  :func:`decode_stack`: all the layers' steps in one call.
"""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Callable, NamedTuple

import torch

from omniquant.packing import PackedWeight

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_packed.cpp", "cpu_decode.cpp", "cpu_a8.cpp")]
CPUINFO = Path("/proc/cpuinfo")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
BLOCK = 32  # codes per decoded block: in_features and the group size must be multiples of it
MAX_BITS = 7
A8_BLOCK = 32  # inputs per int8 activation scale (matmul_a8, int8_matmul_a8)
A8_ISAS = ("avx512_vnni", "avx2")  # the int8-activation paths, fastest first


@functools.cache
def _build() -> ModuleType | str:
    """The compiled module, or why there is none."""
    flags = CPUINFO.read_text().split() if CPUINFO.exists() else []
    if not {"avx2", "fma"} <= set(flags):
        return "this CPU has no AVX2/FMA (the CPU kernels are written for them)"
    from torch.utils import cpp_extension

    try:
        return cpp_extension.load("omniquant_cpu_packed", [str(p) for p in SOURCES], extra_cflags=FLAGS,
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"building {', '.join(p.name for p in SOURCES)} failed: {first}"


def unavailable() -> str | None:
    """Why the CPU kernels cannot run on this machine, or ``None`` (builds them on the first call)."""
    built = _build()
    return built if isinstance(built, str) else None


def _module() -> ModuleType:
    built = _build()
    if isinstance(built, str):
        raise RuntimeError(built)
    return built


def supports(weight: PackedWeight) -> bool:
    """Whether the kernels take this weight's layout: 1..7 bits, in_features and group multiples of 32."""
    group = weight.spec.group_size or weight.in_features
    return weight.spec.bits <= MAX_BITS and weight.in_features % BLOCK == 0 and group % BLOCK == 0


def zero_scales(weight: PackedWeight) -> torch.Tensor:
    """``z·s`` per (row, group), the offset term of :func:`matmul` (computed once per weight)."""
    return (weight.zeros() * weight.scales).contiguous()


def matmul(x: torch.Tensor, weight: PackedWeight, zs: torch.Tensor) -> torch.Tensor:
    """``x @ Wᵀ`` (float32) with ``zs = zero_scales(weight)``; ``x [..., in]`` → ``[..., out]``."""
    return decoding_matmul(weight, zs)(x)


def decoding_matmul(weight: PackedWeight, zs: torch.Tensor,
                    bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ matmul(x, weight, zs) + bias``, every argument but ``x`` resolved once (a C++ ``PackedCall``): a
    decoding step's call, without per-call Python work, which :func:`decode_layer` also takes."""
    group = weight.spec.group_size or weight.in_features
    return _module().PackedCall(weight.qweight, weight.scales, zs, bias, weight.spec.bits, group, weight.out_features,
                                False, False)


def decoding_matmul_a8(weight: PackedWeight, a8: A8Weight | None = None, isa: str | None = None,
                       bias: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`decoding_matmul` for :func:`matmul_a8` on path ``isa``, on ``a8`` (default ``a8_layout(weight)``)."""
    group = weight.spec.group_size or weight.in_features
    vnni = a8_isa(isa) == "avx512_vnni"
    a8 = a8_layout(weight) if a8 is None else a8
    return _module().PackedCall(a8.codes, a8.scales, a8.zero_scales, bias, weight.spec.bits, group,
                                weight.out_features, True, vnni)


def dequantize(weight: PackedWeight) -> torch.Tensor:
    """The float32 weight ``(q - z)·s``, bit-identical to ``weight.dequantize()``."""
    group = weight.spec.group_size or weight.in_features
    return _module().dequantize(weight.qweight, weight.scales, weight.zeros(), weight.spec.bits, group,
                                weight.in_features)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x @ (q·scales[:, None])ᵀ`` for int8 ``q [out, in]`` and float32 ``scales [out]``."""
    return _module().int8_matmul(x, q, scales, False, False)


@functools.cache
def a8_isas() -> tuple[str, ...]:
    """The int8-activation paths this CPU runs, fastest first (of :data:`A8_ISAS`): ``avx512_vnni``
    (AVX-512 F, BW, VL and VNNI) and ``avx2``; none where the kernels do not build (:func:`unavailable`)."""
    if unavailable() is not None:
        return ()
    return A8_ISAS if _module().has_vnni() else A8_ISAS[1:]


def a8_isa(isa: str | None = None) -> str:
    """``isa``, or where ``None`` the fastest path this CPU runs; raises ``RuntimeError`` if it does not run here."""
    here = a8_isas()
    if not here:
        raise RuntimeError(unavailable())
    if isa is not None and isa not in here:
        raise RuntimeError(f"the int8-activation path {isa!r} does not run on this CPU (it runs: {', '.join(here)})")
    return isa or here[0]


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as :func:`matmul_a8` sees it: rounded to int8 in blocks of 32 along the last dimension,
    ``a·round(x/a)`` with ``a = max|x|/127`` per block (computed as ``x·(1/a)``, like the kernel)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, A8_BLOCK)
    a = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(a > 0, 1 / a, torch.zeros_like(a))
    return (torch.round(blocks * inv) * a).reshape(x.shape)


class A8Weight(NamedTuple):
    """A packed weight in the layout :func:`matmul_a8` reads (:func:`a8_layout`): tiles of 16 output rows (the last
    one padded with zero rows), each tile's codes block after block of 32 inputs."""

    codes: torch.Tensor  # uint8 [tiles, in/32, 64·bits]
    scales: torch.Tensor  # float32 [tiles, groups, 16]
    zero_scales: torch.Tensor  # float32 [tiles, groups, 16]: z·s


def _tiled_rows(t: torch.Tensor, tiles: int) -> torch.Tensor:
    """``[out, ...]`` padded with zero rows to ``16·tiles`` and cut into ``[tiles, 16, ...]``."""
    padded = torch.cat([t, t.new_zeros(16 * tiles - t.shape[0], *t.shape[1:])])
    return padded.reshape(tiles, 16, *t.shape[1:])


def a8_fields(bits: int) -> list[tuple[int, int, int, int, int]]:
    """Where the a8 layout keeps ``bits``-bit codes (``a8_fields.h``, the kernels' own table): ``(vec, pos, width,
    step, offset)`` per field, ``width`` bits of step ``step``'s code from code bit ``offset``, at bits
    ``pos..pos+width-1`` of the bytes of vector ``vec`` of a block. Whole codes where they fit (1, 2 and 4 bits: only
    those); the steps left over split into the bytes' free high bits (3 bits: 10 fields for 8 steps)."""
    return [tuple(f) for f in _module().a8_fields(bits)]


def a8_layout(weight: PackedWeight) -> A8Weight:
    """``weight`` as :func:`matmul_a8` reads it, on every path: its codes in tiles of 16 rows, so that one int32 lane
    of the kernel's vectors is one output row. A tile holds, block after block (inputs ``32b..32b+31``), ``bits``
    vectors of 64 bytes: byte ``4l + j`` of each holds fields (:func:`a8_fields`) of the tile's row ``l``'s codes at
    inputs ``32b + 4t + j``, ``t = 0..7``. The same size as ``qweight`` (the codes), plus the padding rows; scales
    and ``z·s`` per tile ``[groups, 16]``."""
    codes = weight.codes().to(torch.int64)  # in_features: a multiple of 32
    rows, cols = codes.shape
    tiles, blocks, bits = -(-rows // 16), cols // 32, weight.spec.bits
    steps = _tiled_rows(codes, tiles).reshape(tiles, 16, blocks, 8, 4)  # [tile, l, block, t, j]: input 32b + 4t + j
    vectors = torch.zeros(tiles, 16, blocks, bits, 4, dtype=torch.int64)
    for vec, pos, width, step, offset in a8_fields(bits):
        vectors[:, :, :, vec] |= (steps[:, :, :, step] >> offset & (1 << width) - 1) << pos
    per_tile = [_tiled_rows(t, tiles).transpose(1, 2).contiguous()
                for t in (weight.scales, zero_scales(weight))]
    codes8 = vectors.permute(0, 2, 3, 1, 4).reshape(tiles, blocks, 64 * bits).to(torch.uint8).contiguous()
    return A8Weight(codes8, *per_tile)


def matmul_a8(x: torch.Tensor, weight: PackedWeight, a8: A8Weight | None = None,
              isa: str | None = None) -> torch.Tensor:
    """:func:`matmul` on ``round_activations(x)``, integer products summed on path ``isa`` (default
    :func:`a8_isa`; ``in_features`` and the group multiples of 32); ``a8``: ``a8_layout(weight)``, computed once by
    the caller (else here, on every call)."""
    return decoding_matmul_a8(weight, a8, isa)(x)


def int8_matmul_a8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, isa: str | None = None) -> torch.Tensor:
    """:func:`int8_matmul` on ``round_activations(x)`` on path ``isa`` (default :func:`a8_isa`; ``in`` a multiple
    of 32)."""
    return _module().int8_matmul(x, q, scales, True, a8_isa(isa) == "avx512_vnni")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm ``x·rsqrt(mean(x²) + eps)·weight`` over the last dimension (float32, contiguous)."""
    return _module().rms_norm(x, weight, eps)


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: int, start: int, scale: float, heads: int, q_norm: torch.Tensor | None = None,
           k_norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """One new position's attention: ``qkv [b, (heads + 2·kv)·d]`` rotated by the half tables ``cos``,
    ``sin [d/2]`` (after per-head RMSNorms ``q_norm``/``k_norm`` if given), its k and v written to the
    caches ``[b, kv, max_len, d]`` at ``pos``, q attending over positions ``start..pos``; ``[b, heads·d]``."""
    return _module().attend(qkv, cos, sin, k_cache, v_cache, pos, start, scale, heads, q_norm, k_norm, eps)


def glu(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """``act(gate)·up`` of ``[..., 2·width]`` rows ``[gate | up]``: SiLU, or tanh-approximated GELU."""
    return _module().glu(gate_up, int(gelu))


def decode_layer(qkv: Callable, o: Callable, gate_up: Callable, down: Callable,
                 norms: list[tuple[torch.Tensor, float] | None], scale: float, heads: int, gelu: bool) -> object:
    """One decoder layer's one-token step in C++ (for :func:`decode_stack`), from its four :func:`decoding_matmul`
    calls and its RMSNorms (weight and eps of ``attn, mlp, attn_out, mlp_out, q, k``; none where the family has
    none): the same calls in the same order as :class:`omniquant.decode.Decoder`'s Python step (so the same
    numbers)."""
    weights, eps = [n and n[0] for n in norms], [n[1] if n else 0.0 for n in norms]
    return _module().DecodeLayer(qkv, o, gate_up, down, weights, eps, scale, heads, int(gelu))


def decode_stack(layers: list, cos: list[torch.Tensor], sin: list[torch.Tensor],
                 windows: list[int | None]) -> Callable[..., torch.Tensor]:
    """:func:`decode_layer` steps one after the other in C++, each layer with its rotary half tables
    (``[max_len, 1, d/2]``) and sliding window (``None``: none): ``step(x, k_caches, v_caches, pos)`` is ``x`` after
    every layer at position ``pos``."""
    return _module().DecodeStack(layers, cos, sin, [w or 0 for w in windows]).step

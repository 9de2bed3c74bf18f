"""Fused dequantize-matmul for packed low-bit weights, for decode and small batches (Triton).

Each program owns a ``BLOCK_M × BLOCK_N`` output tile and a strided share of the K tiles
(split-K, partial sums added atomically in float32). A K tile of ``BLOCK_K`` codes lies inside one
group, so it needs one scale and one zero point per output row. The tile's words are read straight
from the bit planes of :mod:`omniquant.packing`, each word once, split into codes with shifts,
dequantized in float32, ``(q - z)·s``, and cast to the input dtype before ``tl.dot`` (as the
fake-quantized weight was).

Why W3 is not slower than W4 with this layout: a batch-1 GEMV is bound by the bytes it loads,
and W3 loads 3 bits per weight against 4, so 25 % fewer bytes and fewer load instructions (a
64-code row tile is 4 + 2 whole words of the two planes against 8 words for W4). Decoding stays
as cheap: plane widths are powers of two, so word indices and bit offsets are shifts, no code
straddles two words and tiles line up with words and groups; W3 adds one shift, mask and OR per
code, hidden behind memory. Layouts with 10 codes per word (MLC's int3) waste 2 bits per word,
need division by 10, and their words do not line up with groups.

The kernels use only builtins of ``triton.language``, none of its ``@triton.jit`` helpers
(``tl.zeros``, ``tl.cdiv``, ...): those run under the interpreter only if ``TRITON_INTERPRET=1``
was set before triton was first imported, and torch (``torch._dynamo``) imports triton early.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from omniquant.packing import PackedWeight

BLOCK_M = 16  # tl.dot's minimum; rows past M are masked
BLOCK_N = 32
MAX_BLOCK_K = 128
PROGRAMS_PER_SM = 2

# Planes are visited widest first (8, 4, 2, 1; those present in BITS), as omniquant.packing.planes:
# the WIDTH-bit plane holds code bits from BITS - BITS % (2 * WIDTH) upwards.


@triton.jit
def _tile_plane(rows, bit_words, k0, n_ok, BITS: tl.constexpr, WIDTH: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The WIDTH-bit plane's share of the codes ``[BLOCK_N, BLOCK_K]`` at ``k0..``: each word loaded once."""
    w = k0 * WIDTH // 32 + tl.arange(0, BLOCK_K * WIDTH // 32)
    words = tl.load(rows + bit_words * (BITS - BITS % (2 * WIDTH)) + w[None, :],
                    mask=n_ok[:, None] & (w < bit_words * WIDTH)[None, :], other=0)
    codes = (words[:, :, None] >> (tl.arange(0, 32 // WIDTH) * WIDTH)[None, None, :]) & ((1 << WIDTH) - 1)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K)) << (BITS - BITS % (2 * WIDTH))


@triton.jit
def _tile_codes(rows, bit_words, k0, n_ok, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` at ``k0..`` of the row streams at ``rows`` (``bit_words`` words per code bit)."""
    q = tl.full((BLOCK_N, BLOCK_K), 0, tl.int32)
    for i in tl.static_range(4):
        if BITS & (8 >> i):
            q |= _tile_plane(rows, bit_words, k0, n_ok, BITS, 8 >> i, BLOCK_N, BLOCK_K)
    return q


@triton.jit
def _gather_codes(stream, bit_words, idx, mask, BITS: tl.constexpr):
    """Codes at positions ``idx`` of the stream at ``stream`` (``bit_words`` words per code bit)."""
    q = tl.full(idx.shape, 0, tl.int32)
    for i in tl.static_range(4):
        if BITS & (8 >> i):
            q |= _gather_plane(stream, bit_words, idx, mask, BITS, 8 >> i)
    return q


@triton.jit
def _gather_plane(stream, bit_words, idx, mask, BITS: tl.constexpr, WIDTH: tl.constexpr):
    """The WIDTH-bit plane's share of the codes at positions ``idx``."""
    word = tl.load(stream + bit_words * (BITS - BITS % (2 * WIDTH)) + idx * WIDTH // 32, mask=mask, other=0)
    return ((word >> (idx * WIDTH % 32)) & ((1 << WIDTH) - 1)) << (BITS - BITS % (2 * WIDTH))


@triton.jit
def _matmul_kernel(x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, y_ptr, M, N, K, n_groups, stride_xm, split_k,
                   BITS: tl.constexpr, GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    k_words = (K + 31) // 32  # words per code bit of one row's stream; a WIDTH-bit plane has WIDTH times as many
    z_words = (N * n_groups + 31) // 32
    rows = qweight_ptr + rn[:, None] * (k_words * BITS)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(tl.program_id(2) * BLOCK_K, K, split_k * BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        q = _tile_codes(rows, k_words, k0, n_ok, BITS, BLOCK_N, BLOCK_K)  # codes past K meet x = 0
        group = rn * n_groups + k0 // GROUP
        z = _gather_codes(qzeros_ptr, z_words, group, n_ok, BITS)
        s = tl.load(scales_ptr + group, mask=n_ok, other=0.0)
        w = ((q - z[:, None]).to(tl.float32) * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w))
    tl.atomic_add(y_ptr + rm[:, None] * N + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :])


def quant_matmul(x: torch.Tensor, weight: PackedWeight, split_k: int | None = None) -> torch.Tensor:
    """See :func:`omniquant.kernels.quant_matmul`."""
    K, N, group = weight.in_features, weight.out_features, weight.spec.group_size
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    block_k = min(group & -group, MAX_BLOCK_K)  # largest power of two dividing the group, ≥ 32
    grid_mn = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    if split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = max(1, min(triton.cdiv(K, block_k), PROGRAMS_PER_SM * sms // (grid_mn[0] * grid_mn[1])))
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    _matmul_kernel[(*grid_mn, split_k)](
        x2, weight.qweight, weight.scales, weight.qzeros, y, M, N, K, weight.n_groups, x2.stride(0), split_k,
        BITS=weight.spec.bits, GROUP=group, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], N)

// Int8-activation matmuls for decoding, on the packed layout and on the 8-bit head: AVX-512 VNNI (and VBMI)
// where the CPU has them, else AVX2 (vpmaddubsw + vpmaddwd, the same integer sums).
//
// x is rounded to int8 in blocks of 32 along the input (symmetric: a = max|x|/127 per block, as
// llama.cpp's Q8 activations), and the integer products are summed by vpdpbusd (64 u8·s8 products
// an instruction), then scaled in float32:
//
// matmul_a8 (matmul's act8 path): y[r, n] = Σ_lanes (Σ_lane q·xi)·s[n, g]·a[r, b] − Σ_g (z·s)[n, g]·x̂sum[r, g],
//   x̂sum = Σ_{k∈g} a·xi (the rounded x, so the offset term sees the same x as the codes).
//   A chunk of a width-W plane is 64 bytes (W = 4, 2: 128 or 256 codes) or 8 bytes (W = 1: 64
//   codes, a mask). A byte of a W-bit plane holds 8/W consecutive codes, so the codes of sub-plane j
//   (bits j·W..) of a chunk are m·(8/W) + j, m = 0..63: x is permuted once per call to that order.
//   Every int32 lane of vpdpbusd then sums 4·(8/W) consecutive codes (W = 1: 4), which lie in one
//   weight group and one activation block (both multiples of 32 long), so each lane is scaled by
//   its own s·a: the group scales of a chunk are one masked load and a permute (or, where chunks lie
//   in one group, the chunks' sums are scaled by a per lane and by s once a group).
//   3-bit weights in the a8 layout (omniquant.kernels.cpu.a8_layout: the codes as one contiguous 3-bit
//   stream per row, 8 codes in 3 bytes, the same size) take one pass in natural order: 24 bytes are 64
//   codes, spread to 3 bytes a qword by vpermb and cut into bytes by vpmultishiftqb (AVX-512 VBMI), so
//   one vpdpbusd per 64 codes, with fewer instructions per code than the two planes.
// int8_matmul_a8 (int8_matmul's act8 path): y[r, n] = s[n]·Σ_b a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] for int8 q (the 8-bit head):
//   vpdpbusd multiplies u8 by s8, so it takes |xi| and q with xi's sign moved onto it.
//
// The AVX2 path reads the same chunks and the same x layout, each 64-byte chunk as two 32-byte halves
// (int32 lane l of half h is lane 8h + l above): vpmaddubsw sums byte pairs into int16 (no overflow:
// |code| ≤ 15 or |q| ≤ 127 times |xi| ≤ 127, summed over at most 4 sub-planes), vpmaddwd by ones sums
// those pairs into the int32 lanes. 3-bit weights (no VBMI) take their AVX2 a8 layout: the two planes, the
// high bits of each whole 256-code chunk reordered and merged into the codes (chunk_dot2<3>).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "simd.h"

#define OMNIQUANT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

namespace {

constexpr int BLOCK = 32;  // activation block (codes per int8 scale)
constexpr int64_t GRAIN = 16;
constexpr int64_t AHEAD = 4;  // output rows between a row's prefetch and its use

// x rows rounded to int8 per block of 32: xi [rows, in], a [rows, in/32].
struct Rounded {
  std::vector<int8_t> xi;
  std::vector<float> a;
};

Rounded round_rows(const float* x, int64_t rows, int64_t in) {
  Rounded out{std::vector<int8_t>(rows * in, 0), std::vector<float>(rows * (in / BLOCK))};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < in / BLOCK; ++b) {
      const float* xb = x + r * in + b * BLOCK;
      float amax = 0.f;
      for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(xb[i]));
      const float a = amax / 127.f, inv = a > 0.f ? 1.f / a : 0.f;
      out.a[r * (in / BLOCK) + b] = a;
      for (int i = 0; i < BLOCK; ++i)
        out.xi[r * in + b * BLOCK + i] = static_cast<int8_t>(std::nearbyint(xb[i] * inv));
    }
  return out;
}

struct Plane {
  int width, offset;
};

std::vector<Plane> planes_of(int bits) {  // widest first (omniquant.packing.planes)
  std::vector<Plane> out;
  int offset = 0;
  for (int width : {4, 2, 1})
    if (bits & width) {
      out.push_back({width, offset});
      offset += width;
    }
  return out;
}

// What one plane width needs of x per call: the permuted int8 x, and per chunk the lanes' activation
// scales (times 2^offset), first group and group index relative to it.
struct PlaneX {
  Plane plane;
  int codes;          // codes per chunk
  int64_t chunks;
  std::vector<int8_t> xw;    // [rows, chunks, subs, 64]
  std::vector<float> lane_a;  // [rows, chunks, 16]
  std::vector<int32_t> g0;    // [chunks]
  std::vector<int32_t> gidx;  // [chunks, 16]
};

PlaneX plane_x(const Rounded& xr, int64_t rows, int64_t in, int64_t group, Plane pl) {
  PlaneX p{pl, pl.width == 1 ? 64 : 64 * (8 / pl.width), 0, {}, {}, {}, {}};
  const int subs = pl.width == 1 ? 1 : 8 / pl.width, per_byte = 8 / pl.width, lane_codes = p.codes / 16;
  p.chunks = (in + p.codes - 1) / p.codes;
  p.xw.assign(rows * p.chunks * subs * 64, 0);
  p.lane_a.assign(rows * p.chunks * 16, 0.f);
  p.g0.resize(p.chunks);
  p.gidx.resize(p.chunks * 16);
  const int64_t n_groups = (in + group - 1) / group;
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t c0 = c * p.codes;
    p.g0[c] = static_cast<int32_t>(c0 / group);
    for (int l = 0; l < 16; ++l) {
      const int64_t k = std::min<int64_t>(c0 + l * lane_codes, in - 1);
      p.gidx[c * 16 + l] = static_cast<int32_t>(std::min<int64_t>(k / group, n_groups - 1) - p.g0[c]);
    }
    for (int64_t r = 0; r < rows; ++r) {
      int8_t* dst = p.xw.data() + (r * p.chunks + c) * subs * 64;
      const int8_t* src = xr.xi.data() + r * in;
      for (int j = 0; j < subs; ++j)
        for (int m = 0; m < 64; ++m) {
          const int64_t k = pl.width == 1 ? c0 + m : c0 + m * per_byte + j;
          dst[j * 64 + m] = k < in ? src[k] : 0;
        }
      for (int l = 0; l < 16; ++l) {
        const int64_t k = c0 + l * lane_codes;
        p.lane_a[(r * p.chunks + c) * 16 + l] =
            k < in ? xr.a[r * (in / BLOCK) + k / BLOCK] * static_cast<float>(1 << pl.offset) : 0.f;
      }
    }
  }
  return p;
}

inline __mmask64 byte_mask(int64_t count) { return count >= 64 ? ~__mmask64(0) : (__mmask64(1) << count) - 1; }

// The weight rows stream from memory: each row asks for the lines of the row AHEAD of it.
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

// The lanes' weight scales s[n, g(lane)] of chunk c: one masked load and a permute.
OMNIQUANT_VNNI inline __m512 lane_scales(const PlaneX& p, int64_t c, const float* s_n, int64_t n_groups) {
  const int32_t g0 = p.g0[c];
  const int64_t left = n_groups - g0;
  const __mmask16 gmask = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
  return _mm512_permutexvar_ps(_mm512_loadu_si512(p.gidx.data() + c * 16), _mm512_maskz_loadu_ps(gmask, s_n + g0));
}

// Σ q·xi per lane of chunk c of a width-W plane (W = 3: the a8 layout's contiguous 3-bit stream).
template <int W>
OMNIQUANT_VNNI inline __m512i chunk_dot(const uint8_t* bytes, int64_t plane_bytes, const int8_t* xw, int64_t c) {
  constexpr int SUBS = W == 1 || W == 3 ? 1 : 8 / W;
  constexpr int CHUNK_BYTES = W == 1 ? 8 : W == 3 ? 24 : 64;
  const int64_t at = c * CHUNK_BYTES, left = plane_bytes - at;
  __m512i isum = _mm512_setzero_si512();
  if constexpr (W == 1) {
    uint64_t bits = 0;
    std::memcpy(&bits, bytes + at, static_cast<size_t>(std::min<int64_t>(left, 8)));
    return _mm512_dpbusd_epi32(isum, _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(1)), _mm512_loadu_si512(xw));
  } else if constexpr (W == 3) {
    // qword l takes bytes 3l..3l+2 (codes 8l..8l+7), then byte i of it the 8 bits at 3i
    const __m512i spread = _mm512_set_epi8(
        0, 23, 22, 21, 0, 23, 22, 21, 0, 20, 19, 18, 0, 20, 19, 18, 0, 17, 16, 15, 0, 17, 16, 15, 0, 14, 13, 12,
        0, 14, 13, 12, 0, 11, 10, 9, 0, 11, 10, 9, 0, 8, 7, 6, 0, 8, 7, 6, 0, 5, 4, 3, 0, 5, 4, 3, 0, 2, 1, 0, 0, 2, 1, 0);
    const __m512i shifts = _mm512_set1_epi64(0x15120F0C09060300);  // bit offsets 0, 3, ..., 21
    const __m512i v = _mm512_maskz_loadu_epi8(byte_mask(std::min<int64_t>(left, CHUNK_BYTES)), bytes + at);
    const __m512i q = _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(spread, v)),
                                       _mm512_set1_epi8(7));
    return _mm512_dpbusd_epi32(isum, q, _mm512_loadu_si512(xw));
  } else {
    const __m512i low = _mm512_set1_epi8(static_cast<char>((1 << W) - 1));
    const __m512i v = _mm512_maskz_loadu_epi8(byte_mask(left), bytes + at);
    for (int j = 0; j < SUBS; ++j)
      isum = _mm512_dpbusd_epi32(isum, _mm512_and_si512(j == 0 ? v : _mm512_srli_epi16(v, j * W), low),
                                 _mm512_loadu_si512(xw + j * 64));
  }
  return isum;
}

// One output row n of one plane against row r of x, added into acc. Where every chunk lies in one
// group, the chunks are summed per group (scaled by the blocks' a per lane) and s is applied once a group.
template <int W>
OMNIQUANT_VNNI inline __m512 plane_row(const uint8_t* bytes, int64_t plane_bytes, const PlaneX& p, int64_t r,
                                       int64_t group, const float* s_n, int64_t n_groups, __m512 acc) {
  constexpr int SUBS = W == 1 || W == 3 ? 1 : 8 / W;
  const int8_t* xw = p.xw.data() + r * p.chunks * SUBS * 64;
  const float* lane_a = p.lane_a.data() + r * p.chunks * 16;
  if (group % p.codes == 0) {
    const int64_t per_group = group / p.codes;
    for (int64_t g = 0, c = 0; g < n_groups; ++g) {
      __m512 part = _mm512_setzero_ps();
      for (const int64_t last = std::min(c + per_group, p.chunks); c < last; ++c)
        part = _mm512_fmadd_ps(_mm512_cvtepi32_ps(chunk_dot<W>(bytes, plane_bytes, xw + c * SUBS * 64, c)),
                               _mm512_loadu_ps(lane_a + c * 16), part);
      acc = _mm512_fmadd_ps(part, _mm512_set1_ps(s_n[g]), acc);
    }
    return acc;
  }
  for (int64_t c = 0; c < p.chunks; ++c) {
    const __m512 scale = _mm512_mul_ps(lane_scales(p, c, s_n, n_groups), _mm512_loadu_ps(lane_a + c * 16));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(chunk_dot<W>(bytes, plane_bytes, xw + c * SUBS * 64, c)), scale, acc);
  }
  return acc;
}

// The planes of output row n against row r of x (the zero-point term left to the caller).
OMNIQUANT_VNNI float planes_dot512(const std::vector<PlaneX>& px, bool fused3, const uint8_t* row, int64_t nblocks,
                                   int64_t in, int64_t r, int64_t group, const float* s_n, int64_t n_groups) {
  __m512 acc = _mm512_setzero_ps();
  if (fused3) return _mm512_reduce_add_ps(plane_row<3>(row, in * 3 / 8, px[0], r, group, s_n, n_groups, acc));
  for (const PlaneX& p : px) {
    const uint8_t* bytes = row + 4 * nblocks * p.plane.offset;
    const int64_t plane_bytes = in * p.plane.width / 8;
    switch (p.plane.width) {
      case 4: acc = plane_row<4>(bytes, plane_bytes, p, r, group, s_n, n_groups, acc); break;
      case 2: acc = plane_row<2>(bytes, plane_bytes, p, r, group, s_n, n_groups, acc); break;
      default: acc = plane_row<1>(bytes, plane_bytes, p, r, group, s_n, n_groups, acc); break;
    }
  }
  return _mm512_reduce_add_ps(acc);
}

// |xi| (u8), the sign masks and the lanes' activation scales of 64-code chunks (the head's input).
struct HeadX {
  std::vector<uint8_t> ax;     // [rows, chunks·64]
  std::vector<uint64_t> neg;   // [rows, chunks]
  std::vector<float> lane_a;   // [rows, chunks, 16]
  int64_t chunks;
};

HeadX head_x(const Rounded& xr, int64_t rows, int64_t in) {
  HeadX h{{}, {}, {}, (in + 63) / 64};
  h.ax.assign(rows * h.chunks * 64, 0);
  h.neg.assign(rows * h.chunks, 0);
  h.lane_a.assign(rows * h.chunks * 16, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < in; ++k) {
      const int8_t v = xr.xi[r * in + k];
      h.ax[r * h.chunks * 64 + k] = static_cast<uint8_t>(v < 0 ? -v : v);
      if (v < 0) h.neg[r * h.chunks + k / 64] |= uint64_t(1) << (k % 64);
      if (k % 4 == 0) h.lane_a[(r * h.chunks + k / 64) * 16 + (k % 64) / 4] = xr.a[r * (in / BLOCK) + k / BLOCK];
    }
  return h;
}

// Σ_b a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] for output row qn and row r of x.
OMNIQUANT_VNNI float head_dot512(const HeadX& h, const int8_t* qn, int64_t r, int64_t in) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < h.chunks; ++c) {
    const __m512i qv = _mm512_maskz_loadu_epi8(byte_mask(in - c * 64), qn + c * 64);
    const __m512i signed_q = _mm512_mask_sub_epi8(qv, h.neg[r * h.chunks + c], _mm512_setzero_si512(), qv);
    const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                             _mm512_loadu_si512(h.ax.data() + (r * h.chunks + c) * 64), signed_q);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_loadu_ps(h.lane_a.data() + (r * h.chunks + c) * 16), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// ------------------------------------------------------------------------------------------ AVX2

// 32 bits as 32 bytes of 0 or 1 (byte i: bit i), a 1-bit plane's codes
inline __m256i bit_bytes(uint32_t bits) {
  const __m256i which = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), which), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(spread, bit), _mm256_set1_epi8(1));
}

// Up to 32 bytes from src, `left` of them readable (a multiple of 4): a plain load, or at a row's end a masked
// one (no read past it, and no library call in the loop, which would spill the accumulators).
inline __m256i load_bytes(const uint8_t* src, int64_t left) {
  if (left >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(left, 0) / 4)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_epi32(reinterpret_cast<const int*>(src), live);
}

// Σ q·xi per int32 lane of the two halves of chunk c of a width-W plane (W = 1, 2 or 4; a plane's bytes
// a row, in·W/8, are a multiple of 4). W = 3: a whole 256-code chunk of 3-bit codes in the AVX2 a8 layout
// (omniquant.kernels.cpu.a8_layout): the 2-bit plane (bytes, plane_bytes long) as stored, then the 1-bit plane,
// each whole chunk's 32 bytes reordered so that the high bit of code 4m + j (m = 32h + i) is bit 2j + h of
// byte i; so a 32-code slice's high bits are one shift and a mask, merged into the codes before vpmaddubsw
// (x in the 2-bit plane's order; codes ≤ 7: no int16 overflow over the 4 sub-planes).
template <int W>
inline void chunk_dot2(const uint8_t* bytes, int64_t plane_bytes, const int8_t* xw, int64_t c, __m256i (&isum)[2]) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (W == 3) {
    const __m256i three = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
    const __m256i hv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + plane_bytes + c * 32));
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + c * 64 + 32 * h));
      __m256i pairs = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const int b = 2 * j + h;  // the high bits' position, moved to bit 2
        const __m256i high = _mm256_and_si256(b >= 2 ? _mm256_srli_epi16(hv, b - 2) : _mm256_slli_epi16(hv, 2 - b), four);
        const __m256i code = _mm256_or_si256(_mm256_and_si256(j == 0 ? v : _mm256_srli_epi16(v, 2 * j), three), high);
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(
            code, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + j * 64 + 32 * h))));
      }
      isum[h] = _mm256_madd_epi16(pairs, ones);
    }
  } else if constexpr (W == 1) {
    uint32_t bits[2] = {0, 0};
    std::memcpy(bits, bytes + c * 8, 4);
    if (plane_bytes - c * 8 >= 8) std::memcpy(bits + 1, bytes + c * 8 + 4, 4);
    for (int h = 0; h < 2; ++h)
      isum[h] = _mm256_madd_epi16(_mm256_maddubs_epi16(bit_bytes(bits[h]), _mm256_loadu_si256(
                                      reinterpret_cast<const __m256i*>(xw + 32 * h))), ones);
  } else {
    const __m256i low = _mm256_set1_epi8(static_cast<char>((1 << W) - 1));
    for (int h = 0; h < 2; ++h) {
      const __m256i v = load_bytes(bytes + c * 64 + 32 * h, plane_bytes - c * 64 - 32 * h);
      __m256i pairs = _mm256_setzero_si256();
      for (int j = 0; j < 8 / W; ++j)
        pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(
            _mm256_and_si256(j == 0 ? v : _mm256_srli_epi16(v, j * W), low),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xw + j * 64 + 32 * h))));
      isum[h] = _mm256_madd_epi16(pairs, ones);
    }
  }
}

// The weight scales s[n, g(lane)] of half h of chunk c: the chunk spans at most 8 groups (its codes ≤ 256,
// groups ≥ 32 long), so a masked load of 8 and a permute.
inline __m256 lane_scales2(const PlaneX& p, int64_t c, int h, const float* s_n, int64_t n_groups) {
  const int32_t g0 = p.g0[c];
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(n_groups - g0, 8))),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_permutevar8x32_ps(_mm256_maskload_ps(s_n + g0, live), _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(p.gidx.data() + c * 16 + 8 * h)));
}

// plane_row on AVX2 for NR output rows at once (row k: its plane's bytes[k] and scales s_n[k], added into
// acc[k]), over chunks begin..end of the plane (W = 3: see chunk_dot2). The rows' chains are independent, so
// they hide each other's latencies; each row's sums are formed as for one row alone.
template <int W, int NR>
inline void plane_rows2(const uint8_t* const (&bytes)[NR], int64_t plane_bytes, const PlaneX& p, int64_t r,
                        int64_t group, const float* const (&s_n)[NR], int64_t n_groups, __m256 (&acc)[NR],
                        int64_t begin, int64_t end) {
  constexpr int SUBS = W == 1 ? 1 : W == 3 ? 4 : 8 / W;
  const int8_t* xw = p.xw.data() + r * p.chunks * SUBS * 64;
  const float* lane_a = p.lane_a.data() + r * p.chunks * 16;
  __m256i isum[2];
  if (group % p.codes == 0 && begin == 0 && end == p.chunks) {
    const int64_t per_group = group / p.codes;
    for (int64_t g = 0, c = 0; g < n_groups; ++g) {
      __m256 part[NR][2];  // a chain per row and half
      for (int k = 0; k < NR; ++k) part[k][0] = part[k][1] = _mm256_setzero_ps();
      for (const int64_t last = std::min(c + per_group, p.chunks); c < last; ++c)
        for (int k = 0; k < NR; ++k) {
          chunk_dot2<W>(bytes[k], plane_bytes, xw + c * SUBS * 64, c, isum);
          for (int h = 0; h < 2; ++h)
            part[k][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h]), _mm256_loadu_ps(lane_a + c * 16 + 8 * h),
                                         part[k][h]);
        }
      for (int k = 0; k < NR; ++k)
        acc[k] = _mm256_fmadd_ps(_mm256_add_ps(part[k][0], part[k][1]), _mm256_set1_ps(s_n[k][g]), acc[k]);
    }
    return;
  }
  for (int64_t c = begin; c < end; ++c)
    for (int k = 0; k < NR; ++k) {
      chunk_dot2<W>(bytes[k], plane_bytes, xw + c * SUBS * 64, c, isum);
      for (int h = 0; h < 2; ++h)
        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[h]), _mm256_mul_ps(lane_scales2(p, c, h, s_n[k], n_groups),
                                                                            _mm256_loadu_ps(lane_a + c * 16 + 8 * h)),
                                 acc[k]);
    }
}

// The planes of NR output rows (rows[k], s_n[k]) against row r of x, on AVX2, into dot[k] (the zero-point term
// left to the caller); layout3: 3-bit codes in the AVX2 a8 layout, whole 256-code chunks merged (a short last
// chunk keeps its two planes).
template <int NR>
void planes_dot2(const std::vector<PlaneX>& px, bool layout3, const uint8_t* const (&rows)[NR], int64_t nblocks,
                 int64_t in, int64_t r, int64_t group, const float* const (&s_n)[NR], int64_t n_groups, float* dot) {
  __m256 acc[NR];
  for (int k = 0; k < NR; ++k) acc[k] = _mm256_setzero_ps();
  const int64_t merged = layout3 ? in / 256 : 0;  // px: the 2-bit plane's x (256-code chunks), the 1-bit one's (64)
  if (layout3) plane_rows2<3, NR>(rows, in / 4, px[0], r, group, s_n, n_groups, acc, 0, merged);
  for (const PlaneX& p : px) {
    const uint8_t* bytes[NR];
    for (int k = 0; k < NR; ++k) bytes[k] = rows[k] + 4 * nblocks * p.plane.offset;
    const int64_t plane_bytes = in * p.plane.width / 8, begin = merged * 256 / p.codes;
    switch (p.plane.width) {
      case 4: plane_rows2<4, NR>(bytes, plane_bytes, p, r, group, s_n, n_groups, acc, begin, p.chunks); break;
      case 2: plane_rows2<2, NR>(bytes, plane_bytes, p, r, group, s_n, n_groups, acc, begin, p.chunks); break;
      default: plane_rows2<1, NR>(bytes, plane_bytes, p, r, group, s_n, n_groups, acc, begin, p.chunks); break;
    }
  }
  for (int k = 0; k < NR; ++k) dot[k] = hsum(acc[k]);
}

// head_dot512 on AVX2: a block of 32 is one activation scale, |xi|·(q with xi's sign) by vpsignb.
float head_dot2(const Rounded& xr, const int8_t* qn, int64_t r, int64_t in) {
  const int8_t* xi = xr.xi.data() + r * in;
  const int64_t nblocks = in / BLOCK;
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblocks; ++b) {
    const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xi + b * BLOCK));
    const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qn + b * BLOCK));
    const __m256i isum = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(qv, xv)),
                                           _mm256_set1_epi16(1));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(xr.a[r * nblocks + b]), acc);
  }
  return hsum(acc);
}

// ------------------------------------------------------------------------------------------ rows

// Output rows n..n+NR of the packed matmul against every row of x (vnni: the AVX-512 path, which takes one row at a
// time, so NR = 1; else AVX2); end: the caller's last row, for the prefetch.
template <int NR>
void rows_a8(const std::vector<PlaneX>& px, bool layout3, bool vnni, const int32_t* qweight, int64_t words_per_row,
             int64_t in, int64_t group, const float* s, const float* zs, const std::vector<float>& xhat_sum,
             int64_t rows, int64_t n_groups, float* y, int64_t out, int64_t n, int64_t end) {
  const int64_t nblocks = in / 32;
  const uint8_t* row[NR];
  const float* s_n[NR];
  for (int k = 0; k < NR; ++k) {
    if (n + k + AHEAD < end) {
      prefetch_row(qweight + (n + k + AHEAD) * words_per_row, words_per_row * 4);
      prefetch_row(s + (n + k + AHEAD) * n_groups, n_groups * 4);
    }
    row[k] = reinterpret_cast<const uint8_t*>(qweight + (n + k) * words_per_row);
    s_n[k] = s + (n + k) * n_groups;
  }
  for (int64_t r = 0; r < rows; ++r) {
    float dot[NR];
    if (vnni)
      dot[0] = planes_dot512(px, layout3, row[0], nblocks, in, r, group, s_n[0], n_groups);
    else
      planes_dot2<NR>(px, layout3, row, nblocks, in, r, group, s_n, n_groups, dot);
    for (int k = 0; k < NR; ++k) {
      float corr = 0.f;
      for (int64_t g = 0; g < n_groups; ++g) corr += zs[(n + k) * n_groups + g] * xhat_sum[r * n_groups + g];
      y[r * out + n + k] = dot[k] - corr;
    }
  }
}

constexpr int NROWS = 4;  // output rows an AVX2 pass takes

// Output rows begin..end of the packed matmul against every row of x.

void matmul_a8_rows(const std::vector<PlaneX>& px, bool layout3, bool vnni, const int32_t* qweight,
                    int64_t words_per_row, int64_t in, int64_t group, const float* s, const float* zs,
                    const std::vector<float>& xhat_sum, int64_t rows, int64_t n_groups, float* y, int64_t out,
                    int64_t begin, int64_t end) {
  int64_t n = begin;
  if (!vnni)
    for (; n + NROWS <= end; n += NROWS)
      rows_a8<NROWS>(px, layout3, false, qweight, words_per_row, in, group, s, zs, xhat_sum, rows, n_groups, y, out,
                     n, end);
  for (; n < end; ++n)
    rows_a8<1>(px, layout3, vnni, qweight, words_per_row, in, group, s, zs, xhat_sum, rows, n_groups, y, out, n,
               end);
}

// Output rows begin..end of the int8 head against every row of x (h: the AVX-512 path's input, or none).
void int8_a8_rows(const Rounded& xr, const HeadX* h, const int8_t* q, const float* s, int64_t rows, int64_t in,
                  float* y, int64_t out, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    if (n + AHEAD < end) prefetch_row(q + (n + AHEAD) * in, in);
    const int8_t* qn = q + n * in;
    for (int64_t r = 0; r < rows; ++r) y[r * out + n] = (h ? head_dot512(*h, qn, r, in) : head_dot2(xr, qn, r, in)) * s[n];
  }
}

}  // namespace

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512vbmi");
  return yes;
}

void matmul_a8(const float* x, int64_t rows, int64_t in, const int32_t* qweight, int64_t words, const float* s,
               const float* zs, int64_t n_groups, int64_t bits, int64_t group, bool a8_layout, bool vnni, float* y,
               int64_t out) {
  TORCH_CHECK(!vnni || has_vnni(), "this CPU has no AVX-512 VNNI and VBMI");
  const Rounded xr = round_rows(x, rows, in);
  std::vector<float> xhat_sum(rows * n_groups, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < in / BLOCK; ++b) {
      int32_t sum = 0;
      for (int i = 0; i < BLOCK; ++i) sum += xr.xi[r * in + b * BLOCK + i];
      xhat_sum[r * n_groups + b * BLOCK / group] += xr.a[r * (in / BLOCK) + b] * static_cast<float>(sum);
    }
  // 3 bits in the a8 layout: for AVX-512 one contiguous stream, x in natural order (as a 1-bit plane's, 64 codes
  // a chunk); for AVX2 the planes' x, whole chunks merged (planes_dot2)
  const bool layout3 = bits == 3 && a8_layout;
  std::vector<PlaneX> px;
  if (layout3 && vnni)
    px.push_back(plane_x(xr, rows, in, group, Plane{1, 0}));
  else
    for (const Plane& pl : planes_of(static_cast<int>(bits))) px.push_back(plane_x(xr, rows, in, group, pl));
  at::parallel_for(0, out, GRAIN, [&](int64_t begin, int64_t end) {
    matmul_a8_rows(px, layout3, vnni, qweight, words, in, group, s, zs, xhat_sum, rows, n_groups, y, out, begin, end);
  });
}

void int8_matmul_a8(const float* x, int64_t rows, int64_t in, const int8_t* q, const float* s, bool vnni, float* y,
                    int64_t out) {
  TORCH_CHECK(!vnni || has_vnni(), "this CPU has no AVX-512 VNNI and VBMI");
  TORCH_CHECK(in % 32 == 0, "int8 activations need in a multiple of 32");
  const Rounded xr = round_rows(x, rows, in);
  const HeadX h = vnni ? head_x(xr, rows, in) : HeadX{};
  at::parallel_for(0, out, GRAIN * 16, [&](int64_t begin, int64_t end) {
    int8_a8_rows(xr, vnni ? &h : nullptr, q, s, rows, in, y, out, begin, end);
  });
}

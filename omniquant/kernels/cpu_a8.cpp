// Int8-activation matmuls for decoding, on the tiled a8 layout of the packed codes and on the 8-bit head:
// AVX-512 VNNI where the CPU has it, else AVX2 (vpmaddubsw + vpmaddwd, the same integer sums).
//
// x is rounded to int8 in blocks of 32 along the input (symmetric: a = max|x|/127 per block, as
// llama.cpp's Q8 activations), and the integer products are summed in int32, then scaled in float32:
//
// matmul_a8: y[r, n] = Σ_g s[n, g]·Σ_{b∈g} a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] − Σ_g (z·s)[n, g]·x̂sum[r, g],
//   x̂sum = Σ_{k∈g} a·xi (the rounded x, so the offset term sees the same x as the codes), on the codes in
//   omniquant.kernels.cpu.a8_layout: tiles of 16 output rows, one row an int32 lane (a8_tiles.h, written once
//   and compiled for each path).
// int8_matmul_a8: y[r, n] = s[n]·Σ_b a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] for int8 q (the 8-bit head): vpdpbusd
//   multiplies u8 by s8, so it takes |xi| and q with xi's sign moved onto it (AVX2: vpsignb, vpmaddubsw).
//
// The AVX2 path takes each 64-byte vector as two 32-byte halves (rows 0-7 and 8-15 of a tile): vpmaddubsw sums
// byte pairs into int16 (no overflow: codes ≤ 127 and |xi| ≤ 127), vpmaddwd by ones sums the pairs into the
// int32 lanes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "a8_fields.h"
#include "simd.h"

namespace {

constexpr int BLOCK = 32;  // activation block (codes per int8 scale)
constexpr int64_t GRAIN = 16;
constexpr int64_t AHEAD = 4;  // output rows between a row's prefetch and its use

// x rows rounded to int8 per block of 32: xi [rows, in], a [rows, in/32], and each block's Σ xi.
struct Rounded {
  std::vector<int8_t> xi;
  std::vector<float> a;
  std::vector<int32_t> sums;
};

// xi = x·(1/a) rounded to the nearest (ties to even, as std::nearbyint and torch.round), 8 lanes at a time.
Rounded round_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / BLOCK;
  Rounded out{std::vector<int8_t>(rows * in), std::vector<float>(rows * blocks), std::vector<int32_t>(rows * blocks)};
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  for (int64_t rb = 0; rb < rows * blocks; ++rb) {
    const float* xb = x + rb * BLOCK;
    __m256 v[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float a = std::max(_mm_cvtss_f32(m), _mm_cvtss_f32(_mm_movehdup_ps(m))) / 127.f;
    const __m256 inv = _mm256_set1_ps(a > 0.f ? 1.f / a : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.xi.data() + rb * BLOCK), bytes);
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    out.sums[rb] = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
    out.a[rb] = a;
  }
  return out;
}

// What a tiled matmul reads: the a8 layout (codes [tiles, blocks, 64·bits], scales and z·s [tiles, groups, 16]),
// the rounded x and its per-group sums, and where y goes.
struct TileArgs {
  const uint8_t* codes;
  const float *scales, *zero_scales;
  const int8_t* xi;
  const float *a, *xhat_sum;
  int64_t rows, in, out, bits, group, groups;
  float* y;
};

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

inline __mmask64 byte_mask(int64_t count) { return count >= 64 ? ~__mmask64(0) : (__mmask64(1) << count) - 1; }

namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
// Σ_b a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] for output row qn and row r of x.
float head_dot512(const HeadX& h, const int8_t* qn, int64_t r, int64_t in) {
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

struct Isa {
  using I = __m512i;
  using F = __m512;
  static constexpr bool FIELDS = true;  // a8_tiles.h's block_step
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static I load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  template <int N> static I srl(I v) { return _mm512_srli_epi16(v, N); }
  static I mask(I v, char m) { return _mm512_and_si512(v, _mm512_set1_epi8(m)); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I add(I a, I b) { return _mm512_add_epi32(a, b); }
  template <int N> static I sra32(I v) { return _mm512_srai_epi32(v, N); }
  // acc + per lane Σ_{j<4} code byte j·x[j]
  static I dot4(I acc, I code, const int8_t* x) {
    int32_t four;
    std::memcpy(&four, x, 4);
    return _mm512_dpbusd_epi32(acc, code, _mm512_set1_epi32(four));
  }
  static F fma_int(F acc, I isum, float a) { return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(a), acc); }
  static F fma(F acc, F v, const float* s) { return _mm512_fmadd_ps(v, _mm512_loadu_ps(s), acc); }
  static F fnma(F acc, const float* zs, float v) {
    return _mm512_fnmadd_ps(_mm512_loadu_ps(zs), _mm512_set1_ps(v), acc);
  }
  static void store(float* y, F v) { _mm512_storeu_ps(y, v); }
};
#include "a8_tiles.h"
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
struct Isa {
  struct I {
    __m256i lo, hi;
  };
  struct F {
    __m256 lo, hi;
  };
  static constexpr bool FIELDS = false;  // vpmaddubsw's int16 pairs would saturate on fields in place
  static I zero_i() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static F zero_f() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static I load(const uint8_t* p) {
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
  }
  template <int N> static I srl(I v) { return {_mm256_srli_epi16(v.lo, N), _mm256_srli_epi16(v.hi, N)}; }
  static I mask(I v, char m) {
    const __m256i k = _mm256_set1_epi8(m);
    return {_mm256_and_si256(v.lo, k), _mm256_and_si256(v.hi, k)};
  }
  static I or_(I a, I b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
  static I add(I a, I b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
  template <int N> static I sra32(I v) { return {_mm256_srai_epi32(v.lo, N), _mm256_srai_epi32(v.hi, N)}; }
  static I dot4(I acc, I code, const int8_t* x) {
    int32_t four;
    std::memcpy(&four, x, 4);
    const __m256i xv = _mm256_set1_epi32(four), ones = _mm256_set1_epi16(1);
    return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(code.lo, xv), ones)),
            _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(code.hi, xv), ones))};
  }
  static F fma_int(F acc, I isum, float a) {
    const __m256 av = _mm256_set1_ps(a);
    return {_mm256_fmadd_ps(_mm256_cvtepi32_ps(isum.lo), av, acc.lo),
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum.hi), av, acc.hi)};
  }
  static F fma(F acc, F v, const float* s) {
    return {_mm256_fmadd_ps(v.lo, _mm256_loadu_ps(s), acc.lo), _mm256_fmadd_ps(v.hi, _mm256_loadu_ps(s + 8), acc.hi)};
  }
  static F fnma(F acc, const float* zs, float v) {
    const __m256 vv = _mm256_set1_ps(v);
    return {_mm256_fnmadd_ps(_mm256_loadu_ps(zs), vv, acc.lo), _mm256_fnmadd_ps(_mm256_loadu_ps(zs + 8), vv, acc.hi)};
  }
  static void store(float* y, F v) {
    _mm256_storeu_ps(y, v.lo);
    _mm256_storeu_ps(y + 8, v.hi);
  }
};
#include "a8_tiles.h"
}  // namespace avx2

// The weight rows stream from memory: each row asks for the lines of the row AHEAD of it.
inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
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

// Output rows begin..end of the int8 head against every row of x (h: the AVX-512 path's input, or none).
void int8_a8_rows(const Rounded& xr, const HeadX* h, const int8_t* q, const float* s, int64_t rows, int64_t in,
                  float* y, int64_t out, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    if (n + AHEAD < end) prefetch_row(q + (n + AHEAD) * in, in);
    const int8_t* qn = q + n * in;
    for (int64_t r = 0; r < rows; ++r)
      y[r * out + n] = (h ? avx512::head_dot512(*h, qn, r, in) : head_dot2(xr, qn, r, in)) * s[n];
  }
}

}  // namespace

std::vector<std::vector<int64_t>> a8_field_table(int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 7, "the a8 layout holds 1- to 7-bit codes, got ", bits);
  const A8Fields fields = a8_fields(static_cast<int>(bits));
  std::vector<std::vector<int64_t>> table;
  for (int i = 0; i < fields.count; ++i) {
    const A8Field& f = fields.at[i];
    table.push_back({f.vec, f.pos, f.width, f.step, f.offset});
  }
  return table;
}

bool has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return yes;
}

torch::Tensor matmul_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zero_scales,
                        int64_t bits, int64_t group, int64_t out, bool vnni) {
  TORCH_CHECK(!vnni || has_vnni(), "this CPU has no AVX-512 VNNI");
  TORCH_CHECK(bits >= 1 && bits <= 7, "the kernel handles 1- to 7-bit codes, got ", bits);
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32");
  const int64_t in = x.size(-1), tiles = (out + 15) / 16, groups = (in + group - 1) / group;
  TORCH_CHECK(in % BLOCK == 0 && group % BLOCK == 0, "int8 activations need in and the group multiples of 32");
  TORCH_CHECK(codes.dtype() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == tiles * in * 2 * bits,
              "codes must be the a8 layout of ", out, " rows of ", in, " ", bits, "-bit codes");
  TORCH_CHECK(scales.is_contiguous() && zero_scales.is_contiguous() && scales.numel() == tiles * groups * 16 &&
                  zero_scales.numel() == scales.numel(), "scales and z·s must be the a8 layout's [tiles, groups, 16]");
  const auto xc = x.contiguous();  // no reshapes: each is an autograd dispatch, a tenth of a small call's time
  const int64_t rows = xc.numel() / in, blocks = in / BLOCK;
  const Rounded xr = round_rows(xc.data_ptr<float>(), rows, in);
  std::vector<float> xhat_sum(rows * groups, 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b)
      xhat_sum[r * groups + b * BLOCK / group] += xr.a[r * blocks + b] * static_cast<float>(xr.sums[r * blocks + b]);
  auto shape = x.sizes().vec();
  shape.back() = out;
  auto y = torch::empty(shape, x.options());
  const TileArgs t{codes.data_ptr<uint8_t>(), scales.data_ptr<float>(), zero_scales.data_ptr<float>(), xr.xi.data(),
                   xr.a.data(), xhat_sum.data(), rows, in, out, bits, group, groups, y.data_ptr<float>()};
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    if (vnni)
      avx512::run_tiles(t, begin, end);
    else
      avx2::run_tiles(t, begin, end);
  });
  return y;
}

void int8_matmul_a8(const float* x, int64_t rows, int64_t in, const int8_t* q, const float* s, bool vnni, float* y,
                    int64_t out) {
  TORCH_CHECK(!vnni || has_vnni(), "this CPU has no AVX-512 VNNI");
  TORCH_CHECK(in % 32 == 0, "int8 activations need in a multiple of 32");
  const Rounded xr = round_rows(x, rows, in);
  const HeadX h = vnni ? head_x(xr, rows, in) : HeadX{};
  at::parallel_for(0, out, GRAIN * 16, [&](int64_t begin, int64_t end) {
    int8_a8_rows(xr, vnni ? &h : nullptr, q, s, rows, in, y, out, begin, end);
  });
}

// CPU kernels on the packed layout of omniquant.packing (AVX2 + FMA, threads from ATen's pool).
//
// dequantize: the float32 weight (q - z)·s, the same operations as omniquant.quantizer.dequantize_weight
//   (so bit-identical to the fake-quantized weight; the caller runs the dense matmul).
// matmul: y = x·Wᵀ with the codes decoded in registers, for a few rows of x (decoding):
//   y[r, n] = Σ_g s[n,g]·Σ_{k∈g} q[n,k]·x[r,k] − Σ_g (z·s)[n,g]·Σ_{k∈g} x[r,k].
//   Each 32-code block is decoded once (a broadcast word, a variable shift and a mask per 8 codes,
//   one plane at a time) and multiplied into up to 4 rows of x; each group's sums are scaled by its s
//   once, at the group's end.
// int8_matmul: y = x·(q·s[:, None])ᵀ for an int8 matrix with one scale per row (the 8-bit LM head).
//
// Where the CPU has AVX-512 (F + BW, checked at run time), matmul and int8_matmul take 16-lane paths
// (functions compiled for that target). matmul's reads whole bytes of a plane instead of shifting
// one word per 8 codes: a byte of a w-bit plane holds 8/w consecutive codes, so 16 bytes zero-extended
// to 16 lanes, shifted by k·w and masked, give the codes m·(8/w) + k (m = 0..15). x is permuted once
// per call to that order (one copy per plane width). 1-bit planes are masks: each 16 bits of the
// stream select the x lanes to add. A code is Σ_planes 2^offset · plane, so each plane is dotted
// with x on its own and the sums are weighted at the group's end.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>
#include <immintrin.h>

#include <array>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

constexpr int WORD = 32;
constexpr int ROWS = 4;  // rows of x per pass over an int8 weight (accumulators in registers)
constexpr int64_t GRAIN = 16;  // output rows per parallel task, at least

struct Plane {
  int width, offset;
};

// The bit planes of a code width, widest first (omniquant.packing.planes).
template <int BITS>
constexpr int plane_count() {
  return ((BITS & 4) != 0) + ((BITS & 2) != 0) + ((BITS & 1) != 0);
}

template <int BITS>
constexpr Plane plane_at(int i) {
  int offset = 0, seen = 0;
  for (int width : {4, 2, 1}) {
    if (BITS & width) {
      if (seen == i) return Plane{width, offset};
      ++seen;
      offset += width;
    }
  }
  return Plane{0, 0};
}

// Codes 8j..8j+7 of one 32-code block of a row (words: the row's stream; block b of nblocks).
template <int BITS>
inline __m256i decode8(const int32_t* words, int64_t nblocks, int64_t b, int j) {
  __m256i codes = _mm256_setzero_si256();
  for (int p = 0; p < plane_count<BITS>(); ++p) {
    const Plane pl = plane_at<BITS>(p);
    const int bit = 8 * j * pl.width;
    const int32_t word = words[nblocks * pl.offset + b * pl.width + bit / WORD];
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i shifts = _mm256_add_epi32(_mm256_set1_epi32(bit % WORD),
                                            _mm256_mullo_epi32(lanes, _mm256_set1_epi32(pl.width)));
    __m256i part = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts),
                                    _mm256_set1_epi32((1 << pl.width) - 1));
    codes = _mm256_or_si256(codes, _mm256_slli_epi32(part, pl.offset));
  }
  return codes;
}

// One output row n against rows r0..r0+R of x. Each row keeps 4/R accumulators (one per 8-code
// slice of a block), so that 4 independent FMA chains hide the FMA latency whatever R is.
template <int BITS, int R>
inline void row_dot(const float* x, int64_t in, const int32_t* words, const float* s, const float* zs,
                    const float* xsum, int64_t n_groups, int64_t blocks_per_group, float* y, int64_t out,
                    int64_t n) {
  constexpr int J = 4 / R;
  const int64_t nblocks = in / WORD;
  __m256 acc[R][J];
  float corr[R];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < J; ++j) acc[r][j] = _mm256_setzero_ps();
    corr[r] = 0.f;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    __m256 group_acc[R][J];  // Σ q·x over the group, scaled once at its end
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < J; ++j) group_acc[r][j] = _mm256_setzero_ps();
      corr[r] += zs[g] * xsum[r * n_groups + g];
    }
    const int64_t last = std::min<int64_t>((g + 1) * blocks_per_group, nblocks);  // a short last group
    for (int64_t b = g * blocks_per_group; b < last; ++b) {
      for (int j = 0; j < WORD / 8; ++j) {
        const __m256 w = _mm256_cvtepi32_ps(decode8<BITS>(words, nblocks, b, j));
        const int64_t k = b * WORD + 8 * j;
        for (int r = 0; r < R; ++r)
          group_acc[r][j % J] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * in + k), group_acc[r][j % J]);
      }
    }
    const __m256 scale = _mm256_set1_ps(s[g]);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = _mm256_fmadd_ps(group_acc[r][j], scale, acc[r][j]);
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 1; j < J; ++j) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][j]);
    y[r * out + n] = hsum(acc[r][0]) - corr[r];
  }
}

// ------------------------------------------------------------------------------------------ AVX-512
#define OMNIQUANT_AVX512 __attribute__((target("avx512f,avx512bw")))

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return yes;
}

// Codes per 16-lane load of a plane of this width (16 bytes), and the x order it needs.
constexpr int span_of(int width) { return width == 1 ? 32 : 16 * (8 / width); }

// x [rows, in] in the lane order of width-w planes: within each span of 16·(8/w) codes, position
// k·16 + m holds x[m·(8/w) + k].
std::vector<float> permuted(const float* x, int64_t rows, int64_t in, int width) {
  std::vector<float> out(rows * in);
  const int per_byte = 8 / width, span = span_of(width);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t base = 0; base < in; base += span)
      for (int k = 0; k < per_byte; ++k)
        for (int m = 0; m < 16; ++m) out[r * in + base + k * 16 + m] = x[r * in + base + m * per_byte + k];
  return out;
}

OMNIQUANT_AVX512 inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

// One span (span_of(W) codes from k) of a width-W plane into the accumulators part[r][B..]
// (compile-time indices, so the accumulators stay in registers).
template <int W, int R, int B>
OMNIQUANT_AVX512 inline void plane_span(const uint8_t* plane, const float* xp, int64_t in, int64_t k,
                                        __m512 (&part)[R][4]) {
  const uint8_t* src = plane + k * W / 8;
  if constexpr (W == 1) {
    uint32_t bits32;
    std::memcpy(&bits32, src, 4);
    for (int h = 0; h < 2; ++h) {
      const __mmask16 mask = static_cast<__mmask16>(bits32 >> (16 * h));
      for (int r = 0; r < R; ++r)
        part[r][B + h] = _mm512_mask_add_ps(part[r][B + h], mask, part[r][B + h],
                                            _mm512_loadu_ps(xp + r * in + k + 16 * h));
    }
  } else {
    const __m512i lanes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    // codes as floats by a 16-entry table: vpermps reads the low 4 bits of each lane, so a table
    // of i mod 2^W masks and converts in one instruction
    constexpr int M = (1 << W) - 1;
    const __m512 table = _mm512_setr_ps(0 & M, 1 & M, 2 & M, 3 & M, 4 & M, 5 & M, 6 & M, 7 & M, 8 & M, 9 & M, 10 & M,
                                        11 & M, 12 & M, 13 & M, 14 & M, 15 & M);
    for (int j = 0; j < 8 / W; ++j) {
      const __m512 w = _mm512_permutexvar_ps(j == 0 ? lanes : _mm512_srli_epi32(lanes, j * W), table);
      for (int r = 0; r < R; ++r)
        part[r][(B + j) % 4] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + r * in + k + 16 * j), part[r][(B + j) % 4]);
    }
  }
}

// Plane P (and the following ones) of codes [k0, k1) added into total[r], weighted by 2^offset.
template <int BITS, int P, int R>
OMNIQUANT_AVX512 inline void plane_dot(const uint8_t* bytes, int64_t nblocks, const float* const* xs, int64_t in,
                                       int64_t k0, int64_t k1, __m512 (&total)[R]) {
  constexpr Plane pl = plane_at<BITS>(P);
  constexpr int span = span_of(pl.width);
  const uint8_t* plane = bytes + 4 * nblocks * pl.offset;  // this plane's stream: in·width bits a row
  const float* xp = xs[pl.width];
  __m512 part[R][4];
  for (int r = 0; r < R; ++r)
    for (int a = 0; a < 4; ++a) part[r][a] = _mm512_setzero_ps();
  int64_t k = k0;
  for (; k + 2 * span <= k1; k += 2 * span) {
    plane_span<pl.width, R, 0>(plane, xp, in, k, part);
    plane_span<pl.width, R, 2>(plane, xp, in, k + span, part);
  }
  if (k < k1) plane_span<pl.width, R, 0>(plane, xp, in, k, part);
  const __m512 weight = _mm512_set1_ps(static_cast<float>(1 << pl.offset));
  for (int r = 0; r < R; ++r) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(part[r][0], part[r][1]), _mm512_add_ps(part[r][2], part[r][3]));
    total[r] = _mm512_fmadd_ps(sum, weight, total[r]);
  }
  if constexpr (P + 1 < plane_count<BITS>()) plane_dot<BITS, P + 1, R>(bytes, nblocks, xs, in, k0, k1, total);
}

// One output row n against rows 0..R of x (xs[width]: x in each plane width's order, xs[1] = x).
template <int BITS, int R>
OMNIQUANT_AVX512 void row_dot512(const float* const* xs, int64_t in, const int32_t* words, const float* s,
                                 const float* zs, const float* xsum, int64_t n_groups, int64_t group, float* y,
                                 int64_t out, int64_t n) {
  const int64_t nblocks = in / WORD;
  const uint8_t* bytes = reinterpret_cast<const uint8_t*>(words);
  __m512 acc[R];
  float corr[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    corr[r] = 0.f;
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    const int64_t k0 = g * group, k1 = std::min<int64_t>(k0 + group, in);
    __m512 total[R];
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_setzero_ps();
      corr[r] += zs[g] * xsum[r * n_groups + g];
    }
    plane_dot<BITS, 0, R>(bytes, nblocks, xs, in, k0, k1, total);
    const __m512 scale = _mm512_set1_ps(s[g]);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(total[r], scale, acc[r]);
  }
  for (int r = 0; r < R; ++r) y[r * out + n] = hsum512(acc[r]) - corr[r];
}

// Whether the 16-lane path takes this layout: every plane's span divides the group and in_features.
template <int BITS>
bool fits512(int64_t group, int64_t in) {
  for (int p = 0; p < plane_count<BITS>(); ++p) {
    const int span = span_of(plane_at<BITS>(p).width);
    if (group % span != 0 || in % span != 0) return false;
  }
  return true;
}

template <int BITS>
void matmul512(const float* x, int64_t rows, int64_t in, const int32_t* qweight, int64_t words_per_row,
               const float* s, const float* zs, int64_t n_groups, int64_t group, float* y, int64_t out,
               const std::vector<float>& xsum) {
  std::vector<float> by_width[5];
  const float* xs[5] = {nullptr, x, nullptr, nullptr, nullptr};
  for (int p = 0; p < plane_count<BITS>(); ++p) {
    const int width = plane_at<BITS>(p).width;
    if (width > 1) {
      by_width[width] = permuted(x, rows, in, width);
      xs[width] = by_width[width].data();
    }
  }
  at::parallel_for(0, out, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int32_t* words = qweight + n * words_per_row;
      const float* sn = s + n * n_groups;
      const float* zn = zs + n * n_groups;
      // each plane width's x, from row r0 on
      auto from = [&](int64_t r0) {
        std::array<const float*, 5> at{};
        for (int w : {1, 2, 4}) at[w] = xs[w] ? xs[w] + r0 * in : nullptr;
        return at;
      };
      int64_t r0 = 0;
      for (; r0 + 2 <= rows; r0 += 2)
        row_dot512<BITS, 2>(from(r0).data(), in, words, sn, zn, xsum.data() + r0 * n_groups, n_groups, group,
                            y + r0 * out, out, n);
      for (; r0 < rows; ++r0)
        row_dot512<BITS, 1>(from(r0).data(), in, words, sn, zn, xsum.data() + r0 * n_groups, n_groups, group,
                            y + r0 * out, out, n);
    }
  });
}

OMNIQUANT_AVX512 void int8_rows512(const float* xp, int64_t rows, int64_t in, const int8_t* qp, const float* sp,
                                   float* yp, int64_t out, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t k = 0;
      for (int i = 0; k + 16 <= in; k += 16, ++i) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(qp + n * in + k))));
        acc[i % 4] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + r * in + k), acc[i % 4]);
      }
      float tail = 0.f;
      for (; k < in; ++k) tail += static_cast<float>(qp[n * in + k]) * xp[r * in + k];
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
      yp[r * out + n] = (hsum512(sum) + tail) * sp[n];
    }
  }
}

template <int BITS>
void matmul_bits(const float* x, int64_t rows, int64_t in, const int32_t* qweight, int64_t words_per_row,
                 const float* s, const float* zs, int64_t n_groups, int64_t group, float* y, int64_t out) {
  std::vector<float> xsum(rows * n_groups, 0.f);  // Σ_{k∈g} x[r, k]
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < in; ++k) xsum[r * n_groups + k / group] += x[r * in + k];
  if (has_avx512() && fits512<BITS>(group, in)) {
    matmul512<BITS>(x, rows, in, qweight, words_per_row, s, zs, n_groups, group, y, out, xsum);
    return;
  }
  const int64_t blocks_per_group = group / WORD;
  at::parallel_for(0, out, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int32_t* words = qweight + n * words_per_row;
      const float* sn = s + n * n_groups;
      const float* zn = zs + n * n_groups;
      int64_t r0 = 0;
      for (; r0 + 4 <= rows; r0 += 4)
        row_dot<BITS, 4>(x + r0 * in, in, words, sn, zn, xsum.data() + r0 * n_groups, n_groups,
                         blocks_per_group, y + r0 * out, out, n);
      for (; r0 + 2 <= rows; r0 += 2)
        row_dot<BITS, 2>(x + r0 * in, in, words, sn, zn, xsum.data() + r0 * n_groups, n_groups,
                         blocks_per_group, y + r0 * out, out, n);
      for (; r0 < rows; ++r0)
        row_dot<BITS, 1>(x + r0 * in, in, words, sn, zn, xsum.data() + r0 * n_groups, n_groups,
                         blocks_per_group, y + r0 * out, out, n);
    }
  });
}

void check_packed(const torch::Tensor& qweight, const torch::Tensor& scales, int64_t in, int64_t group) {
  TORCH_CHECK(qweight.dtype() == torch::kInt32 && qweight.is_contiguous() && qweight.dim() == 2,
              "qweight must be a contiguous int32 [out, words] tensor");
  TORCH_CHECK(scales.dtype() == torch::kFloat32 && scales.is_contiguous() && scales.size(0) == qweight.size(0),
              "scales must be a contiguous float32 [out, n_groups] tensor");
  TORCH_CHECK(in % WORD == 0 && group % WORD == 0 && scales.size(1) == (in + group - 1) / group,
              "the kernel needs in_features and the group size to be multiples of 32");
}

// The output shape: x's leading dimensions, then out.
std::vector<int64_t> out_shape(const torch::Tensor& x, int64_t out) {
  auto shape = x.sizes().vec();
  shape.back() = out;
  return shape;
}

}  // namespace

// cpu_a8.cpp: the int8-activation paths (vnni: AVX-512 VNNI, else AVX2)
bool has_vnni();
std::vector<std::vector<int64_t>> a8_field_table(int64_t bits);
torch::Tensor matmul_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zero_scales,
                        int64_t bits, int64_t group, int64_t out, bool vnni);
void int8_matmul_a8(const float* x, int64_t rows, int64_t in, const int8_t* q, const float* s, bool vnni, float* y,
                    int64_t out);

torch::Tensor matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zero_scales,
                     int64_t bits, int64_t group) {
  const int64_t in = x.size(-1), out = qweight.size(0);
  check_packed(qweight, scales, in, group);
  TORCH_CHECK(qweight.size(1) == in / WORD * bits, "qweight does not hold ", bits, "-bit rows of ", in, " codes");
  TORCH_CHECK(x.dtype() == torch::kFloat32, "x must be float32");
  auto x2 = x.reshape({-1, in}).contiguous();
  auto zs = zero_scales.contiguous();
  auto y = torch::empty({x2.size(0), out}, x.options());
  const int64_t words = qweight.size(1), groups = scales.size(1), rows = x2.size(0);
  const float* xp = x2.data_ptr<float>();
  switch (bits) {
#define OMNIQUANT_BITS(B)                                                                                    \
  case B:                                                                                                    \
    matmul_bits<B>(xp, rows, in, qweight.data_ptr<int32_t>(), words, scales.data_ptr<float>(),               \
                   zs.data_ptr<float>(), groups, group, y.data_ptr<float>(), out);                           \
    break;
    OMNIQUANT_BITS(1) OMNIQUANT_BITS(2) OMNIQUANT_BITS(3) OMNIQUANT_BITS(4) OMNIQUANT_BITS(5)
    OMNIQUANT_BITS(6) OMNIQUANT_BITS(7)
#undef OMNIQUANT_BITS
    default:
      TORCH_CHECK(false, "the kernel handles 1- to 7-bit codes, got ", bits);
  }
  return y.reshape(out_shape(x, out));
}

torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                         int64_t group, int64_t in) {
  check_packed(qweight, scales, in, group);
  const int64_t out = qweight.size(0), words = qweight.size(1), groups = scales.size(1);
  auto z = zeros.contiguous();
  auto w = torch::empty({out, in}, scales.options());
  const int32_t* q = qweight.data_ptr<int32_t>();
  const float *sp = scales.data_ptr<float>(), *zp = z.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  const int64_t padded = words * WORD / bits;
  at::parallel_for(0, out, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < in; ++k) {
        int32_t code = 0, offset = 0;
        for (int width : {8, 4, 2, 1}) {
          if (!(bits & width)) continue;
          const int64_t bit = k * width;
          const uint32_t word = static_cast<uint32_t>(q[n * words + padded / WORD * offset + bit / WORD]);
          code |= static_cast<int32_t>((word >> (bit % WORD)) & ((1u << width) - 1)) << offset;
          offset += width;
        }
        const int64_t g = n * groups + k / group;
        wp[n * in + k] = (static_cast<float>(code) - zp[g]) * sp[g];
      }
    }
  });
  return w;
}

torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor q, torch::Tensor scales, bool act8, bool vnni) {
  const int64_t in = x.size(-1), out = q.size(0);
  TORCH_CHECK(q.dtype() == torch::kInt8 && q.is_contiguous() && q.size(1) == in && in % 8 == 0,
              "q must be a contiguous int8 [out, in] tensor, in a multiple of 8");
  TORCH_CHECK(x.dtype() == torch::kFloat32 && scales.dtype() == torch::kFloat32, "x and scales must be float32");
  auto x2 = x.reshape({-1, in}).contiguous();
  auto s = scales.contiguous();
  const int64_t rows = x2.size(0);
  auto y = torch::empty({rows, out}, x.options());
  const float *xp = x2.data_ptr<float>(), *sp = s.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  if (act8) {
    int8_matmul_a8(xp, rows, in, qp, sp, vnni, yp, out);
    return y.reshape(out_shape(x, out));
  }
  at::parallel_for(0, out, GRAIN * 16, [&](int64_t begin, int64_t end) {
    if (has_avx512()) {
      int8_rows512(xp, rows, in, qp, sp, yp, out, begin, end);
      return;
    }
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        const int64_t rs = std::min<int64_t>(ROWS, rows - r0);
        __m256 acc[ROWS] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t k = 0; k < in; k += 8) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qp + n * in + k));
          const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
          for (int64_t r = 0; r < rs; ++r)
            acc[r] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + (r0 + r) * in + k), acc[r]);
        }
        for (int64_t r = 0; r < rs; ++r) yp[(r0 + r) * out + n] = hsum(acc[r]) * sp[n];
      }
    }
  });
  return y.reshape(out_shape(x, out));
}

// cpu_decode.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps);
torch::Tensor attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                     torch::Tensor v_cache, int64_t pos, int64_t start, double scale, int64_t heads,
                     c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, double eps);
torch::Tensor glu(torch::Tensor gate_up, int64_t gelu);
void bind_decode(pybind11::module& m);  // PackedCall, DecodeLayer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_decode(m);
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension (float32)");
  m.def("attend", &attend, "one new position's rotary attention over the KV cache");
  m.def("glu", &glu, "act(gate)·up of a stacked [gate | up] row");
  m.def("matmul", &matmul, "y = x·Wᵀ on packed codes (a few rows of x)");
  m.def("matmul_a8", &matmul_a8, "y = x·Wᵀ with x rounded to int8 per block of 32, on the codes, scales and z·s of "
        "omniquant.kernels.cpu.a8_layout (vnni: by AVX-512 VNNI, else AVX2)");
  m.def("dequantize", &dequantize, "the float32 weight (q - z)·s of packed codes");
  m.def("int8_matmul", &int8_matmul, "y = x·(q·s)ᵀ for an int8 weight with per-row scales (act8: x rounded to "
        "int8 per block of 32, vnni: by AVX-512 VNNI, else AVX2)");
  m.def("a8_fields", &a8_field_table, "the fields of a8_fields.h for bits-bit codes: [vec, pos, width, step, offset]");
  m.def("has_vnni", &has_vnni, "whether the CPU has AVX-512 VNNI (the int8-activation kernels' fast path)");
}

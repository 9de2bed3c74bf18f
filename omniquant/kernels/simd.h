// Small SIMD helpers the CPU kernel files share (inline, so each hot loop keeps them in registers).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

// The sum of v's 8 lanes.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x in 8 lanes: Cephes' expf (x = n·ln2 + r, |r| ≤ ln2/2, a degree-7 polynomial in r, times 2^n), relative error
// about 2e-7; x is clamped to [-87.3, 88.3] (so e^x stays a normal float), and a NaN stays NaN.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.3f), x));  // NaN: the second operand
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

// f over n floats, 8 lanes at a time (the tail through a zero-padded copy): y[i] = f(a[i], b[i]).
template <class F>
inline void map8(const float* a, const float* b, float* y, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, f(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  if (i < n) {
    float ta[8] = {}, tb[8] = {}, ty[8];
    std::copy(a + i, a + n, ta);
    std::copy(b + i, b + n, tb);
    _mm256_storeu_ps(ty, f(_mm256_loadu_ps(ta), _mm256_loadu_ps(tb)));
    std::copy(ty, ty + (n - i), y + i);
  }
}

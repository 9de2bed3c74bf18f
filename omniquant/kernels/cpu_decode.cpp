// One-token decode helpers of omniquant.decode (float32, CPU): each replaces a chain of small ATen
// ops whose per-op overhead dominates a small model's decode step.
//
// rms_norm: y = x·rsqrt(mean(x²) + eps)·w over the last dimension (HF's formula, float32).
// attend: the attention of one new position per sequence: rotate q and k (rotate_half convention,
//   with the tables' first halves), optionally after per-head RMSNorms on q and k, write k and v
//   into the cache at `pos`, and attend q over cache positions [start, pos] (a sliding window
//   starts later) with a softmax in float32. Grouped-query heads read their KV head. Scores four keys at a time,
//   the output in registers, one head a thread once the cache is long.
// glu: act(gate)·up of a stacked [gate | up] row (SiLU, or GELU with the tanh approximation).
// Both take e^x eight lanes at a time (simd.h's exp8, relative error about 2e-7, against std::exp's one a call).
// PackedCall: a packed linear's decoding matmul bound to its tensors (and bias); DecodeLayer: one decoder layer's
//   one-token step from those pieces, the same calls in the same order as omniquant.decode's Python step (so the
//   same numbers), without a Python round trip between them; DecodeStack: all the layers, one call a position.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <pybind11/stl.h>

#include <immintrin.h>

#include <cmath>
#include <vector>

#include "simd.h"

namespace {

inline void norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
  float ss = hsum(acc);
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

inline void rotate(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

// q·k for four keys at once, d a multiple of 8: four 8-lane sums reduced together.
inline __m128 dot4(const float* q, const float* const (&k)[4], int64_t d) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t j = 0; j < d; j += 8) {
    const __m256 qv = _mm256_loadu_ps(q + j);
    for (int i = 0; i < 4; ++i) acc[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i] + j), acc[i]);
  }
  const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  return _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
}

// o[0..8C) = Σ_t p[t]·v[t] over `keys` rows of v (d apart), in 8·C lanes held in registers.
template <int C>
inline void weigh_rows(const float* p, const float* v, int64_t keys, int64_t d, float* o) {
  __m256 acc[C];
  for (int i = 0; i < C; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t t = 0; t < keys; ++t) {
    const __m256 pt = _mm256_broadcast_ss(p + t);
    for (int i = 0; i < C; ++i) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + t * d + 8 * i), acc[i]);
  }
  for (int i = 0; i < C; ++i) _mm256_storeu_ps(o + 8 * i, acc[i]);
}

// A mask of the first n (< 8) float lanes.
inline __m256 first_lanes(int64_t n) {
  return _mm256_castsi256_ps(
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// One head's attention: softmax(q·kᵀ·scale)·v over `keys` cached rows (d apart, d a multiple of 8), into o.
void attend_head(const float* q, const float* k, const float* v, int64_t keys, int64_t d, float scale, float* o,
                 std::vector<float>& score) {
  score.resize((keys + 7) / 8 * 8);
  int64_t t = 0;
  for (; t + 4 <= keys; t += 4) {
    const float* rows[4] = {k + t * d, k + (t + 1) * d, k + (t + 2) * d, k + (t + 3) * d};
    _mm_storeu_ps(score.data() + t, dot4(q, rows, d));
  }
  for (; t < keys; ++t) {  // the last keys one at a time (the four sums of the same key)
    const float* rows[4] = {k + t * d, k + t * d, k + t * d, k + t * d};
    score[t] = _mm_cvtss_f32(dot4(q, rows, d));
  }
  float top = -INFINITY;
  for (t = 0; t < keys; ++t) top = std::max(top, score[t] *= scale);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (t = 0; t < keys; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(score.data() + t), shift));
    _mm256_storeu_ps(score.data() + t, e);
    sum = _mm256_add_ps(sum, t + 8 <= keys ? e : _mm256_and_ps(e, first_lanes(keys - t)));  // the tail: keys only
  }
  int64_t j = 0;
  for (; j + 64 <= d; j += 64) weigh_rows<8>(score.data(), v + j, keys, d, o + j);
  for (; j < d; j += 8) weigh_rows<1>(score.data(), v + j, keys, d, o + j);
  const __m256 inv = _mm256_set1_ps(1.f / hsum(sum));
  for (j = 0; j < d; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_loadu_ps(o + j), inv));
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), name, " must be a contiguous float32 tensor");
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  check_f32(x, "x");
  check_f32(w, "w");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(w.numel() == n, "w must have the last dimension's size");
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) norm_row(xp + r * n, wp, static_cast<float>(eps), n, yp + r * n);
  return y;
}

torch::Tensor attend(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                     torch::Tensor v_cache, int64_t pos, int64_t start, double scale, int64_t heads,
                     c10::optional<torch::Tensor> q_norm, c10::optional<torch::Tensor> k_norm, double eps) {
  check_f32(qkv, "qkv");
  check_f32(k_cache, "k_cache");
  check_f32(v_cache, "v_cache");
  check_f32(cos, "cos");
  check_f32(sin, "sin");
  const int64_t b = k_cache.size(0), kv_heads = k_cache.size(1), max_len = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(qkv.numel() == b * (heads + 2 * kv_heads) * d, "qkv must hold one position's q, k and v per sequence");
  TORCH_CHECK(d % 8 == 0, "the head dimension must be a multiple of 8, got ", d);
  TORCH_CHECK(pos < max_len && start <= pos && heads % kv_heads == 0, "bad cache position or head counts");
  TORCH_CHECK(cos.numel() == d / 2 && sin.numel() == d / 2, "cos and sin must be the position's half tables");
  auto work = qkv.clone();  // [b, heads + 2·kv_heads, d] as laid out (contiguous); q and k are rotated in place
  auto out = torch::empty({b, heads * d}, qkv.options());
  float *wp = work.data_ptr<float>(), *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const float* qn = q_norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm ? k_norm->data_ptr<float>() : nullptr;
  const int64_t half = d / 2, rep = heads / kv_heads, keys = pos - start + 1;
  for (int64_t s = 0; s < b; ++s) {
    float* row = wp + s * (heads + 2 * kv_heads) * d;
    for (int64_t h = 0; h < heads + kv_heads; ++h) {
      float* v = row + h * d;
      const float* nw = h < heads ? qn : kn;
      if (nw) norm_row(v, nw, static_cast<float>(eps), d, v);
      rotate(v, cp, sp, half);
    }
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t at = ((s * kv_heads + h) * max_len + pos) * d;
      std::copy(row + (heads + h) * d, row + (heads + h + 1) * d, kc + at);
      std::copy(row + (heads + kv_heads + h) * d, row + (heads + kv_heads + h + 1) * d, vc + at);
    }
  }
  float* op = out.data_ptr<float>();
  // heads in parallel at every cache length: a decode step's cached keys and values come from memory (the weights'
  // stream has pushed them out of cache), and two threads' loads overlap (measured in decode: 2-6 % a token, where
  // a warm cache of under 128 positions is faster on one thread)
  at::parallel_for(0, b * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = i / heads, h = i % heads, g = h / rep;
      const int64_t at = ((s * kv_heads + g) * max_len + start) * d;
      attend_head(wp + (s * (heads + 2 * kv_heads) + h) * d, kc + at, vc + at, keys, d, static_cast<float>(scale),
                  op + (s * heads + h) * d, score);
    }
  });
  return out;
}

torch::Tensor glu(torch::Tensor gate_up, int64_t gelu) {
  check_f32(gate_up, "gate_up");
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  auto shape = gate_up.sizes().vec();
  shape.back() = width;
  auto y = torch::empty(shape, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = gp + r * 2 * width, *u = g + width;
    float* o = yp + r * width;
    if (gelu)  // 0.5·g·(1 + tanh(c·(g + 0.044715·g³)))·u, tanh(z) = 1 − 2/(e^{2z} + 1)
      map8(g, u, o, width, [](__m256 gv, __m256 uv) {
        const __m256 z = _mm256_mul_ps(_mm256_set1_ps(2 * 0.7978845608028654f),
                                       _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), gv),
                                                       _mm256_mul_ps(gv, gv), gv));
        const __m256 one = _mm256_set1_ps(1.f);
        const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(exp8(z), one)));
        return _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), gv), _mm256_add_ps(one, t)), uv);
      });
    else  // g/(1 + e^{−g})·u
      map8(g, u, o, width, [](__m256 gv, __m256 uv) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        return _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)), uv);
      });
  }
  return y;
}

// cpu_packed.cpp
torch::Tensor matmul(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zero_scales,
                     int64_t bits, int64_t group);
// cpu_a8.cpp
torch::Tensor matmul_a8(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zero_scales,
                        int64_t bits, int64_t group, int64_t out, bool vnni);

// A packed linear's decoding matmul: matmul's (or with act8 matmul_a8's, on the a8 layout) arguments but x, bound
// once, and the bias.
struct PackedCall {
  torch::Tensor codes, scales, zs;
  c10::optional<torch::Tensor> bias;
  int64_t bits, group, out;
  bool act8, vnni;

  torch::Tensor operator()(const torch::Tensor& x) const {
    auto y = act8 ? matmul_a8(x, codes, scales, zs, bits, group, out, vnni) : matmul(x, codes, scales, zs, bits, group);
    return bias ? y + *bias : y;
  }
};

// x += y elementwise (the residual adds: in place, no ATen dispatch; the same float sums as x + y).
void add_into(torch::Tensor& x, const torch::Tensor& y) {
  TORCH_CHECK(x.numel() == y.numel() && y.is_contiguous(), "a residual add needs two tensors of one size");
  float* xp = x.data_ptr<float>();
  map8(xp, y.data_ptr<float>(), xp, x.numel(), [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); });
}

// One layer's one-token step: omniquant.decode.Decoder._fast_step's calls, in its order; x (the stack's own copy)
// takes the residual adds in place.
struct DecodeLayer {
  PackedCall qkv, o, gate_up, down;
  std::vector<c10::optional<torch::Tensor>> norms;  // attn, mlp, attn_out, mlp_out, q, k: weight or none
  std::vector<double> eps;
  double scale;
  int64_t heads, gelu;

  torch::Tensor norm(int i, const torch::Tensor& t) const { return norms[i] ? ::rms_norm(t, *norms[i], eps[i]) : t; }

  void step(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, const torch::Tensor& k_cache,
            const torch::Tensor& v_cache, int64_t pos, int64_t start) const {
    const auto out = ::attend(qkv(norm(0, x)), cos, sin, k_cache, v_cache, pos, start, scale, heads, norms[4],
                              norms[5], norms[4] ? eps[4] : 0.0);
    add_into(x, norm(2, o(out)));
    add_into(x, norm(3, down(::glu(gate_up(norm(1, x)), gelu))));
  }
};

// The layers of a decoder, each with its rotary tables ([max_len, 1, d/2]) and sliding window (0: none): one
// position through them all.
struct DecodeStack {
  std::vector<DecodeLayer> layers;
  std::vector<torch::Tensor> cos, sin;
  std::vector<int64_t> windows;

  torch::Tensor step(const torch::Tensor& x0, const std::vector<torch::Tensor>& k_caches,
                     const std::vector<torch::Tensor>& v_caches, int64_t pos) const {
    check_f32(x0, "x");
    auto x = x0.clone();
    for (size_t i = 0; i < layers.size(); ++i) {
      const int64_t start = windows[i] > 0 ? std::max<int64_t>(0, pos + 1 - windows[i]) : 0;
      layers[i].step(x, cos[i][pos], sin[i][pos], k_caches[i], v_caches[i], pos, start);
    }
    return x;
  }
};

void bind_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<PackedCall>(m, "PackedCall")
      .def(py::init<torch::Tensor, torch::Tensor, torch::Tensor, c10::optional<torch::Tensor>, int64_t, int64_t,
                    int64_t, bool, bool>())
      .def("__call__", &PackedCall::operator());
  py::class_<DecodeLayer>(m, "DecodeLayer")
      .def(py::init<PackedCall, PackedCall, PackedCall, PackedCall, std::vector<c10::optional<torch::Tensor>>,
                    std::vector<double>, double, int64_t, int64_t>());
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<std::vector<DecodeLayer>, std::vector<torch::Tensor>, std::vector<torch::Tensor>,
                    std::vector<int64_t>>())
      .def("step", &DecodeStack::step);
}

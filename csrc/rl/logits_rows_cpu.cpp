// CPU kernels of mgpt::logits_row_stats and mgpt::logits_row_grad (contract: mgpt_ops/rl/_row_ops.py).
//
// With z = logits * inv_temperature, per row (or per piece of a row):
//   stats: m = max z,  s = sum exp(z - m),  u = sum exp(z - m) (z - m),  zy = z[label - vocab_start]
//   grad : p = exp(z - lse),  dlogits = inv_t * (g_lp (onehot - p) - g_ent p (z - mean_z))
//
// Stats take ONE pass over memory: the row is walked in L1-sized blocks; a block's max is found first
// (re-reading the block from L1), then the running (m, s, u) is rescaled once if the max grew and the
// block's exponentials are added. Moving the reference point from m to m' >= m is exact algebra:
//   s' = s e^(m - m'),   u' = sum e^(z - m')(z - m') = e^(m - m') (u + (m - m') s).
// Pieces of a row (split when there are fewer rows than threads) merge with the same rule.
//
// Speed comes from loops the compiler vectorises: exp is a branch-free polynomial (exp_f32 below)
// instead of a libm call, reductions carry `omp simd` so the compiler may reassociate them, and the hot
// functions are cloned for AVX2+FMA (x86-64-v3) with a run-time pick, since the extension itself is
// built for baseline x86-64.
//
// Masked vocabulary (-inf logits) is allowed: such entries get p = 0 and contribute exactly 0 to u and
// to the gradient (the limit of p log p), rather than the 0 * inf = NaN a literal formula gives.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rl/logits_rows.h"
#include "cpu_bits.h"

// GCC refuses to if-convert the selects in exp_f32 under the default -ftrapping-math (it treats a
// speculated compare as a possible FP trap), which leaves every loop below scalar. We never inspect FP
// exception flags, so turn trapping semantics off for this file's kernels only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MGPT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MGPT_SIMD_CLONES
#endif

namespace mgpt::rl {
namespace {

constexpr int64_t kBlock = 2048;            // floats per online-max step (8 KiB: stays in L1 for the 2nd sweep)
constexpr int64_t kMinPiece = 16384;        // smallest piece of a row worth its own task
constexpr int64_t kParallelGrain = 32768;   // elements per parallel task in the gradient

using mgpt::cpu::bits_as;

// exp(x) for fp32, ~2 ulp on [-87, 88] (Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the
// Cephes degree-7 polynomial for e^r, times 2^n built in the exponent bits). Below -87 it returns 0 (the
// true value is < 2e-38, irrelevant in sums of terms <= 1), above 88 +inf; NaN propagates. Branch-free
// so loops calling it vectorise.
[[gnu::always_inline]] inline float exp_f32(float x) {
  constexpr float kHi = 88.0f, kLo = -87.0f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits
  float xc = x > kHi ? kHi : x;
  xc = xc < kLo ? kLo : xc;
  const float t = xc * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;  // ln2 split hi + lo: n * hi is exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t two_n = (bits_as<int32_t>(t) - bits_as<int32_t>(kRound) + 127) << 23;
  float result = er * bits_as<float>(two_n);
  result = x < kLo ? 0.0f : result;
  result = x > kHi ? INFINITY : result;
  return result;
}

// -inf -> -FLT_MAX, so that e * d stays 0 (not NaN) where e = exp(d) = 0.
[[gnu::always_inline]] inline float finite_floor(float d) { return d < -FLT_MAX ? -FLT_MAX : d; }

// Running softmax statistics of a stretch of z, relative to its max m. Empty: m = -FLT_MAX, s = u = 0
// (a finite sentinel keeps every m - m' finite, so no inf - inf appears while merging).
struct RowStats {
  float m = -FLT_MAX;
  float s = 0.0f;
  float u = 0.0f;
};

// Re-centre `a` on max(a.m, b.m) and add `b` (re-centred likewise): the all-reduce rule of combine_row_stats.
void merge_into(RowStats& a, const RowStats& b) {
  const float m = std::max(a.m, b.m);
  const float da = finite_floor(a.m - m), db = finite_floor(b.m - m);
  const float ea = std::exp(da), eb = std::exp(db);
  a.u = ea * (a.u + da * a.s) + eb * (b.u + db * b.s);
  a.s = ea * a.s + eb * b.s;
  a.m = m;
}

MGPT_SIMD_CLONES RowStats stats_of_span(const float* x, int64_t n, float inv_t) {
  RowStats acc;
  for (int64_t start = 0; start < n; start += kBlock) {
    const float* xb = x + start;
    const int64_t len = std::min(kBlock, n - start);
    float block_max = -FLT_MAX;
#pragma omp simd reduction(max : block_max)
    for (int64_t i = 0; i < len; ++i) {
      const float z = xb[i] * inv_t;
      block_max = z > block_max ? z : block_max;
    }
    if (block_max > acc.m) {
      const float d = finite_floor(acc.m - block_max);
      const float scale = std::exp(d);
      acc.u = scale * (acc.u + d * acc.s);
      acc.s *= scale;
      acc.m = block_max;
    }
    const float m = acc.m;
    float s = 0.0f, u = 0.0f;
#pragma omp simd reduction(+ : s, u)
    for (int64_t i = 0; i < len; ++i) {
      const float d = xb[i] * inv_t - m;
      const float e = exp_f32(d);
      s += e;
      u += e * finite_floor(d);
    }
    acc.s += s;
    acc.u += u;
  }
  return acc;
}

// What one row's gradient needs besides its logits.
struct GradRow {
  float lse, mean_z, grad_logprob, grad_entropy, inv_t;
};

// dlogits of one element that is not the label: -inv_t p (g_lp + g_ent (z - mean_z)); exactly 0 where p = 0.
[[gnu::always_inline]] inline float grad_off_label(float logit, const GradRow& g) {
  const float z = logit * g.inv_t;
  const float p = exp_f32(z - g.lse);
  const float weight = g.grad_logprob + g.grad_entropy * (z - g.mean_z);
  const float dz = p > 0.0f ? -p * weight : 0.0f;
  return dz * g.inv_t;
}

// Round-to-nearest-even fp32 -> bf16 bits (NaN -> canonical quiet NaN), as torch's .to(bfloat16) does;
// written on the bits so the loop vectorises.
[[gnu::always_inline]] inline uint16_t bf16_bits(float f) {
  const uint32_t bits = bits_as<uint32_t>(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return f != f ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

MGPT_SIMD_CLONES void grad_span_f32(const float* x, int64_t n, GradRow g, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = grad_off_label(x[i], g);
}

MGPT_SIMD_CLONES void grad_span_bf16(const float* x, int64_t n, GradRow g, uint16_t* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits(grad_off_label(x[i], g));
}

// fp16 output is rare: vectorised fp32 math into a stack block, then c10's scalar conversion.
void grad_span_f16(const float* x, int64_t n, GradRow g, c10::Half* out) {
  float block[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    grad_span_f32(x + start, len, g, block);
    for (int64_t i = 0; i < len; ++i) out[start + i] = c10::Half(block[i]);
  }
}

int64_t label_of(const at::Tensor& labels, int64_t row) {
  return labels.scalar_type() == at::kLong ? labels.const_data_ptr<int64_t>()[row]
                                           : int64_t{labels.const_data_ptr<int32_t>()[row]};
}

// Column of `label` inside this shard, or -1 when the row is ignored or its label lives in another shard.
int64_t label_column(int64_t label, int64_t vocab_start, int64_t vocab_size, int64_t ignore_index) {
  if (label == ignore_index) return -1;
  const int64_t local = label - vocab_start;
  return (local >= 0 && local < vocab_size) ? local : -1;
}

void check_on_cpu(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": the CPU kernel got argument 'logits' on ", logits.device().str());
}

at::Tensor logits_row_stats_cpu(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                                int64_t vocab_start, int64_t ignore_index) {
  check_logits_and_labels(kStatsOp, logits, labels, inv_temperature);
  check_on_cpu(kStatsOp, logits);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float inv_t = static_cast<float>(inv_temperature);
  at::Tensor stats = logits.new_empty({rows, 4});
  if (rows == 0) return stats;

  // Few rows (e.g. one long sequence position at a time): cut each row into pieces so all threads work.
  const int64_t threads = at::get_num_threads();
  int64_t pieces = 1;
  if (rows < threads) {
    pieces = std::clamp((threads + rows - 1) / rows, int64_t{1}, std::max<int64_t>(1, vocab / kMinPiece));
  }
  const int64_t piece_len = (vocab + pieces - 1) / pieces;

  const float* x = logits.const_data_ptr<float>();
  std::vector<RowStats> partial(rows * pieces);
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / piece_len);
  at::parallel_for(0, rows * pieces, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / pieces, start = (task % pieces) * piece_len;
      const int64_t len = std::min(piece_len, vocab - start);
      if (len > 0) partial[task] = stats_of_span(x + row * vocab + start, len, inv_t);
    }
  });

  float* out = stats.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) {
    RowStats acc = partial[row * pieces];
    for (int64_t k = 1; k < pieces; ++k) merge_into(acc, partial[row * pieces + k]);
    const int64_t col = label_column(label_of(labels, row), vocab_start, vocab, ignore_index);
    out[row * 4 + 0] = acc.m;
    out[row * 4 + 1] = acc.s;
    out[row * 4 + 2] = acc.u;
    out[row * 4 + 3] = col >= 0 ? x[row * vocab + col] * inv_t : 0.0f;
  }
  return stats;
}

at::Tensor logits_row_grad_cpu(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                               const at::Tensor& mean_z, const at::Tensor& grad_logprob,
                               const at::Tensor& grad_entropy, double inv_temperature, int64_t vocab_start,
                               int64_t ignore_index, at::ScalarType out_dtype) {
  check_grad_args(logits, labels, lse, mean_z, grad_logprob, grad_entropy, inv_temperature, out_dtype);
  check_on_cpu(kGradOp, logits);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const float inv_t = static_cast<float>(inv_temperature);
  at::Tensor grad = logits.new_empty(logits.sizes(), logits.options().dtype(out_dtype));
  if (rows == 0) return grad;

  const float* x = logits.const_data_ptr<float>();
  const float* lse_p = lse.const_data_ptr<float>();
  const float* mean_p = mean_z.const_data_ptr<float>();
  const float* glp_p = grad_logprob.const_data_ptr<float>();
  const float* gent_p = grad_entropy.const_data_ptr<float>();
  const int64_t elem_size = grad.element_size();
  char* out_bytes = static_cast<char*>(grad.data_ptr());

  // Split the flat [rows * vocab] range evenly, whatever the shape; each task walks its row segments.
  at::parallel_for(0, rows * vocab, kParallelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end;) {
      const int64_t row = pos / vocab, col0 = pos - row * vocab;
      const int64_t len = std::min(end - pos, vocab - col0);
      const float* xs = x + pos;
      char* os = out_bytes + pos * elem_size;
      const int64_t label = label_of(labels, row);
      if (label == ignore_index) {
        std::memset(os, 0, len * elem_size);  // all-zero bits are +0 in fp32, bf16 and fp16
      } else {
        const GradRow g{lse_p[row], mean_p[row], glp_p[row], gent_p[row], inv_t};
        if (out_dtype == at::kFloat) {
          grad_span_f32(xs, len, g, reinterpret_cast<float*>(os));
        } else if (out_dtype == at::kBFloat16) {
          grad_span_bf16(xs, len, g, reinterpret_cast<uint16_t*>(os));
        } else {
          grad_span_f16(xs, len, g, reinterpret_cast<c10::Half*>(os));
        }
        const int64_t col = label_column(label, vocab_start, vocab, ignore_index);
        if (col >= col0 && col < col0 + len) {
          const float value = grad_off_label(x[row * vocab + col], g) + g.grad_logprob * inv_t;
          char* at_label = out_bytes + (row * vocab + col) * elem_size;
          if (out_dtype == at::kFloat) {
            *reinterpret_cast<float*>(at_label) = value;
          } else if (out_dtype == at::kBFloat16) {
            *reinterpret_cast<uint16_t*>(at_label) = bf16_bits(value);
          } else {
            *reinterpret_cast<c10::Half*>(at_label) = c10::Half(value);
          }
        }
      }
      pos += len;
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CPU, m) {
  m.impl("logits_row_stats", &logits_row_stats_cpu);
  m.impl("logits_row_grad", &logits_row_grad_cpu);
}

}  // namespace mgpt::rl

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// CUDA kernels of mgpt::logits_row_stats and mgpt::logits_row_grad (contract: mgpt_ops/rl/_row_ops.py).
//
// With z = logits * inv_temperature, per row:
//   stats: m = max z,  s = sum exp(z - m),  u = sum exp(z - m) (z - m),  zy = z[label - vocab_start]
//   grad : p = exp(z - lse),  dlogits = inv_t * (g_lp (onehot - p) - g_ent p (z - mean_z))
//
// Both are memory-bound streams (stats read 4 B/element; grad reads 4 and writes 2 or 4), so the design
// is about bytes in flight:
//  * A row (Vs up to ~152K) is one CTA of 256 threads, or `pieces` CTAs when there are too few rows to
//    fill the GPU (fewer than 4 CTAs per SM); pieces of the stats then meet in a tiny merge kernel.
//  * Each thread issues kUnroll 16-byte loads before using any (64 B in flight per thread). A row that
//    does not start on a 16-byte boundary (Vs % 4 != 0) has up to 3 scalar "head" elements before its
//    aligned float4 body and up to 3 scalar "tail" elements after it.
//  * Stats are single-pass and online: a thread folds each batch of 16 loaded values into its running
//    (m, s, u) with one rescale, e^(m - m'), when the max grows:  s' = s e^(m - m'),
//    u' = e^(m - m') (u + (m - m') s). Threads, warps and pieces merge with the same rule (warp shuffles,
//    then shared memory, then the merge kernel). The empty state is m = -FLT_MAX (finite, so no inf - inf).
//  * exp is __expf (ex2.approx of d log2 e): relative error ~1e-7 near the max, growing like |d| * 6e-8
//    for terms e^d that are already tiny; well inside the 1e-5 the tests ask of fp32.
//  * -inf logits (masked vocabulary) have p = 0 and contribute exactly 0 to u and to the gradient.
//  * All element indices are int64: C * Vs exceeds 2^31 for realistic chunks.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cfloat>
#include <cstdint>

#include "rl/logits_rows.h"

namespace mgpt::rl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 4;                   // float4 loads in flight per thread per step
constexpr int kStep = kThreads * kUnroll;    // float4s a CTA consumes per step
constexpr int kCtasPerSmTarget = 4;          // below C = 4 * SMs rows, rows are cut into pieces

// ----------------------------------------------------------------------------------------------------
// Row geometry: [head scalars | nvec aligned float4s | tail scalars], and one piece's share of it.
// ----------------------------------------------------------------------------------------------------
struct RowSplit {
  int64_t head_begin, head_end;  // scalar elements [head_begin, head_end) of this piece
  int64_t vec_begin, vec_end;    // float4 indices into the aligned body, this piece's share
  int64_t body_offset;           // element index where the aligned body starts
  int64_t tail_begin, tail_end;  // scalar tail elements (only in the last piece)
};

// `aligned_ok` false: the caller cannot use 16-byte accesses at all, so the whole row is "head".
__device__ __forceinline__ RowSplit split_row(const float* row, int64_t vocab, bool aligned_ok, int piece,
                                              int pieces) {
  RowSplit r;
  int64_t head = vocab;
  if (aligned_ok) {
    const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) & 15u);  // multiple of 4
    head = min(vocab, ((16 - misalign) & 15) / 4);
  }
  const int64_t nvec = (vocab - head) / 4;
  const int64_t head_share = (head + pieces - 1) / pieces;
  r.head_begin = min(head, piece * head_share);
  r.head_end = min(head, r.head_begin + head_share);
  const int64_t vec_share = (nvec + pieces - 1) / pieces;
  r.vec_begin = min(nvec, piece * vec_share);
  r.vec_end = min(nvec, r.vec_begin + vec_share);
  r.body_offset = head;
  const bool last = piece == pieces - 1;
  r.tail_begin = head + 4 * nvec;
  r.tail_end = last ? vocab : r.tail_begin;
  return r;
}

// ----------------------------------------------------------------------------------------------------
// Online softmax statistics
// ----------------------------------------------------------------------------------------------------
struct Stats {
  float m, s, u;
};

__device__ __forceinline__ Stats empty_stats() { return {-FLT_MAX, 0.0f, 0.0f}; }

// -inf -> -FLT_MAX so that e * d stays 0 (not NaN) where e = exp(d) = 0.
__device__ __forceinline__ float finite_floor(float d) { return fmaxf(d, -FLT_MAX); }

__device__ __forceinline__ void merge_into(Stats& a, float bm, float bs, float bu) {
  const float m = fmaxf(a.m, bm);
  const float da = finite_floor(a.m - m), db = finite_floor(bm - m);
  const float ea = __expf(da), eb = __expf(db);
  a.u = ea * fmaf(da, a.s, a.u) + eb * fmaf(db, bs, bu);
  a.s = ea * a.s + eb * bs;
  a.m = m;
}

// Fold N values of z (already scaled; -inf for "no element") into `st` with one rescale.
template <int N>
__device__ __forceinline__ void absorb(Stats& st, const float (&z)[N]) {
  float batch_max = z[0];
#pragma unroll
  for (int k = 1; k < N; ++k) batch_max = fmaxf(batch_max, z[k]);
  const float m = fmaxf(st.m, batch_max);
  const float d_old = finite_floor(st.m - m);
  const float scale = __expf(d_old);
  float s = 0.0f, u = 0.0f;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = z[k] - m;
    const float e = __expf(d);
    s += e;
    u = fmaf(e, finite_floor(d), u);
  }
  st.u = fmaf(scale, fmaf(d_old, st.s, st.u), u);
  st.s = fmaf(scale, st.s, s);
  st.m = m;
}

__device__ __forceinline__ void warp_merge(Stats& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    const float s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    const float u = __shfl_xor_sync(0xffffffffu, st.u, offset);
    merge_into(st, m, s, u);
  }
}

// Merge the whole CTA's states; the result is valid in thread 0. Called once per kernel (the shared
// arrays are written once, read after one barrier, never reused).
__device__ __forceinline__ Stats block_merge(Stats st) {
  __shared__ float warp_m[kWarps], warp_s[kWarps], warp_u[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_merge(st);
  if (lane == 0) {
    warp_m[warp] = st.m;
    warp_s[warp] = st.s;
    warp_u[warp] = st.u;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? Stats{warp_m[lane], warp_s[lane], warp_u[lane]} : empty_stats();
    warp_merge(st);
  }
  return st;
}

// z at the label's column, or 0 when the row is ignored or its label lives in another shard.
__device__ __forceinline__ float label_logit(const float* row, int64_t label, int64_t vocab, float inv_t,
                                             int64_t vocab_start, int64_t ignore_index) {
  const int64_t col = label - vocab_start;
  return (label != ignore_index && col >= 0 && col < vocab) ? row[col] * inv_t : 0.0f;
}

// grid = rows * pieces. pieces == 1: writes stats[row] directly; else partial[row * pieces + piece].
template <typename Label>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(
    const float* __restrict__ logits, const Label* __restrict__ labels, float* __restrict__ stats,
    float* __restrict__ partial, int64_t vocab, int pieces, float inv_t, int64_t vocab_start,
    int64_t ignore_index) {
  const int64_t row = blockIdx.x / pieces;
  const int piece = static_cast<int>(blockIdx.x % pieces);
  const float* x = logits + row * vocab;
  const RowSplit sp = split_row(x, vocab, /*aligned_ok=*/true, piece, pieces);
  Stats st = empty_stats();

  for (int64_t j = sp.head_begin + threadIdx.x; j < sp.head_end; j += kThreads) {
    const float z[1] = {x[j] * inv_t};
    absorb(st, z);
  }
  const float4* body = reinterpret_cast<const float4*>(x + sp.body_offset);
  for (int64_t v0 = sp.vec_begin + threadIdx.x; v0 < sp.vec_end; v0 += kStep) {
    float4 q[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t v = v0 + int64_t{k} * kThreads;
      q[k] = v < sp.vec_end ? body[v] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    }
    float z[4 * kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      z[4 * k + 0] = q[k].x * inv_t;
      z[4 * k + 1] = q[k].y * inv_t;
      z[4 * k + 2] = q[k].z * inv_t;
      z[4 * k + 3] = q[k].w * inv_t;
    }
    absorb(st, z);
  }
  for (int64_t j = sp.tail_begin + threadIdx.x; j < sp.tail_end; j += kThreads) {
    const float z[1] = {x[j] * inv_t};
    absorb(st, z);
  }

  st = block_merge(st);
  if (threadIdx.x == 0) {
    if (pieces == 1) {
      float* out = stats + row * 4;
      out[0] = st.m;
      out[1] = st.s;
      out[2] = st.u;
      out[3] = label_logit(x, labels[row], vocab, inv_t, vocab_start, ignore_index);
    } else {
      float* out = partial + blockIdx.x * int64_t{3};
      out[0] = st.m;
      out[1] = st.s;
      out[2] = st.u;
    }
  }
}

// One thread per row: merge the row's pieces and read its label logit.
template <typename Label>
__global__ void row_stats_merge_kernel(const float* __restrict__ partial, const float* __restrict__ logits,
                                       const Label* __restrict__ labels, float* __restrict__ stats,
                                       int64_t rows, int64_t vocab, int pieces, float inv_t, int64_t vocab_start,
                                       int64_t ignore_index) {
  const int64_t row = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (row >= rows) return;
  Stats st = empty_stats();
  for (int k = 0; k < pieces; ++k) {
    const float* p = partial + (row * pieces + k) * 3;
    merge_into(st, p[0], p[1], p[2]);
  }
  float* out = stats + row * 4;
  out[0] = st.m;
  out[1] = st.s;
  out[2] = st.u;
  out[3] = label_logit(logits + row * vocab, labels[row], vocab, inv_t, vocab_start, ignore_index);
}

// ----------------------------------------------------------------------------------------------------
// Gradient
// ----------------------------------------------------------------------------------------------------
struct GradRow {
  float lse, mean_z, grad_logprob, grad_entropy, inv_t;
  int64_t label_col;  // column of the label in this shard, or -1
};

__device__ __forceinline__ float grad_value(float logit, const GradRow& g, bool is_label) {
  const float z = logit * g.inv_t;
  const float p = __expf(z - g.lse);
  const float weight = fmaf(g.grad_entropy, z - g.mean_z, g.grad_logprob);
  float dz = p > 0.0f ? -p * weight : 0.0f;  // p = 0 (masked -inf logit): exactly 0, never 0 * inf
  if (is_label) dz += g.grad_logprob;
  return dz * g.inv_t;
}

template <typename Out>
struct OutputOps;

template <>
struct OutputOps<float> {
  __device__ static void store1(float* p, float v) { *p = v; }
  __device__ static void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
};

template <>
struct OutputOps<__nv_bfloat16> {
  struct alignas(8) Pack {
    __nv_bfloat162 lo, hi;
  };
  __device__ static void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  __device__ static void store4(__nv_bfloat16* p, float4 v) {
    *reinterpret_cast<Pack*>(p) = Pack{__floats2bfloat162_rn(v.x, v.y), __floats2bfloat162_rn(v.z, v.w)};
  }
};

template <>
struct OutputOps<__half> {
  struct alignas(8) Pack {
    __half2 lo, hi;
  };
  __device__ static void store1(__half* p, float v) { *p = __float2half_rn(v); }
  __device__ static void store4(__half* p, float4 v) {
    *reinterpret_cast<Pack*>(p) = Pack{__floats2half2_rn(v.x, v.y), __floats2half2_rn(v.z, v.w)};
  }
};

// grid = rows * pieces. `aligned_ok`: logits and out both start on 16-byte boundaries, so the aligned
// float4 body of a logits row lines up with 4-element (8- or 16-byte) groups of the output row.
template <typename Out, typename Label>
__global__ void __launch_bounds__(kThreads) row_grad_kernel(
    const float* __restrict__ logits, const Label* __restrict__ labels, const float* __restrict__ lse,
    const float* __restrict__ mean_z, const float* __restrict__ grad_logprob,
    const float* __restrict__ grad_entropy, Out* __restrict__ out, int64_t vocab, int pieces, bool aligned_ok,
    float inv_t, int64_t vocab_start, int64_t ignore_index) {
  using Ops = OutputOps<Out>;
  const int64_t row = blockIdx.x / pieces;
  const int piece = static_cast<int>(blockIdx.x % pieces);
  const float* x = logits + row * vocab;
  Out* o = out + row * vocab;
  const RowSplit sp = split_row(x, vocab, aligned_ok, piece, pieces);
  const int64_t label = labels[row];

  if (label == ignore_index) {  // the whole row's gradient is +0; its lse/mean_z may be anything
    for (int64_t j = sp.head_begin + threadIdx.x; j < sp.head_end; j += kThreads) Ops::store1(o + j, 0.0f);
    for (int64_t v = sp.vec_begin + threadIdx.x; v < sp.vec_end; v += kThreads)
      Ops::store4(o + sp.body_offset + 4 * v, make_float4(0.0f, 0.0f, 0.0f, 0.0f));
    for (int64_t j = sp.tail_begin + threadIdx.x; j < sp.tail_end; j += kThreads) Ops::store1(o + j, 0.0f);
    return;
  }
  const int64_t col = label - vocab_start;
  const GradRow g{lse[row], mean_z[row], grad_logprob[row], grad_entropy[row], inv_t,
                  (col >= 0 && col < vocab) ? col : -1};

  for (int64_t j = sp.head_begin + threadIdx.x; j < sp.head_end; j += kThreads)
    Ops::store1(o + j, grad_value(x[j], g, j == g.label_col));
  const float4* body = reinterpret_cast<const float4*>(x + sp.body_offset);
  for (int64_t v0 = sp.vec_begin + threadIdx.x; v0 < sp.vec_end; v0 += kStep) {
    float4 q[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t v = v0 + int64_t{k} * kThreads;
      if (v < sp.vec_end) q[k] = body[v];
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t v = v0 + int64_t{k} * kThreads;
      if (v < sp.vec_end) {
        const int64_t first = sp.body_offset + 4 * v;
        const int64_t to_label = g.label_col - first;  // in [0, 4) only for the float4 holding the label
        float4 r;
        r.x = grad_value(q[k].x, g, to_label == 0);
        r.y = grad_value(q[k].y, g, to_label == 1);
        r.z = grad_value(q[k].z, g, to_label == 2);
        r.w = grad_value(q[k].w, g, to_label == 3);
        Ops::store4(o + first, r);
      }
    }
  }
  for (int64_t j = sp.tail_begin + threadIdx.x; j < sp.tail_end; j += kThreads)
    Ops::store1(o + j, grad_value(x[j], g, j == g.label_col));
}

// ----------------------------------------------------------------------------------------------------
// Host side
// ----------------------------------------------------------------------------------------------------
int multiprocessor_count(int device) {
  static std::atomic<int> cache[64] = {};  // per device; a benign re-query on a first-call race
  if (device >= 0 && device < 64) {
    int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  return count;
}

// Pieces per row: enough CTAs for kCtasPerSmTarget per SM, but every piece keeps each thread busy for
// at least one full step (no piece smaller than kStep float4s).
int pieces_per_row(int64_t rows, int64_t vocab, int device) {
  const int64_t target = int64_t{kCtasPerSmTarget} * multiprocessor_count(device);
  if (rows >= target) return 1;
  const int64_t wanted = (target + rows - 1) / rows;
  const int64_t useful = std::max<int64_t>(1, (vocab / 4) / kStep);
  return static_cast<int>(std::min(wanted, useful));
}

void check_on_cuda(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), op, ": the CUDA kernel got argument 'logits' on ", logits.device().str());
}

unsigned grid_size(int64_t rows, int pieces, const char* op) {
  const int64_t ctas = rows * pieces;
  TORCH_CHECK(ctas < (int64_t{1} << 31), op, ": too many rows for one launch (", std::to_string(rows), ")");
  return static_cast<unsigned>(ctas);
}

at::Tensor logits_row_stats_cuda(const at::Tensor& logits, const at::Tensor& labels, double inv_temperature,
                                 int64_t vocab_start, int64_t ignore_index) {
  check_logits_and_labels(kStatsOp, logits, labels, inv_temperature);
  check_on_cuda(kStatsOp, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor stats = logits.new_empty({rows, 4});
  if (rows == 0) return stats;
  const float inv_t = static_cast<float>(inv_temperature);
  const int pieces = pieces_per_row(rows, vocab, logits.get_device());
  const unsigned grid = grid_size(rows, pieces, kStatsOp);
  at::Tensor partial = pieces > 1 ? logits.new_empty({rows * pieces * 3}) : at::Tensor();
  float* partial_ptr = pieces > 1 ? partial.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto launch = [&](auto label_tag) {
    using Label = decltype(label_tag);
    const Label* label_ptr = labels.const_data_ptr<Label>();
    row_stats_kernel<Label><<<grid, kThreads, 0, stream>>>(logits.const_data_ptr<float>(), label_ptr,
                                                           stats.data_ptr<float>(), partial_ptr, vocab, pieces,
                                                           inv_t, vocab_start, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (pieces > 1) {
      constexpr int kMergeThreads = 128;
      const auto merge_grid = static_cast<unsigned>((rows + kMergeThreads - 1) / kMergeThreads);
      row_stats_merge_kernel<Label><<<merge_grid, kMergeThreads, 0, stream>>>(
          partial_ptr, logits.const_data_ptr<float>(), label_ptr, stats.data_ptr<float>(), rows, vocab, pieces,
          inv_t, vocab_start, ignore_index);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };
  if (labels.scalar_type() == at::kLong) {
    launch(int64_t{});
  } else {
    launch(int32_t{});
  }
  return stats;
}

at::Tensor logits_row_grad_cuda(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                                const at::Tensor& mean_z, const at::Tensor& grad_logprob,
                                const at::Tensor& grad_entropy, double inv_temperature, int64_t vocab_start,
                                int64_t ignore_index, at::ScalarType out_dtype) {
  check_grad_args(logits, labels, lse, mean_z, grad_logprob, grad_entropy, inv_temperature, out_dtype);
  check_on_cuda(kGradOp, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor grad = logits.new_empty(logits.sizes(), logits.options().dtype(out_dtype));
  if (rows == 0) return grad;
  const float inv_t = static_cast<float>(inv_temperature);
  const int pieces = pieces_per_row(rows, vocab, logits.get_device());
  const unsigned grid = grid_size(rows, pieces, kGradOp);
  const bool aligned_ok = (reinterpret_cast<uintptr_t>(logits.const_data_ptr()) % 16 == 0) &&
                          (reinterpret_cast<uintptr_t>(grad.data_ptr()) % 16 == 0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  auto launch = [&](auto out_tag, auto label_tag) {
    using Out = decltype(out_tag);
    using Label = decltype(label_tag);
    row_grad_kernel<Out, Label><<<grid, kThreads, 0, stream>>>(
        logits.const_data_ptr<float>(), labels.const_data_ptr<Label>(), lse.const_data_ptr<float>(),
        mean_z.const_data_ptr<float>(), grad_logprob.const_data_ptr<float>(),
        grad_entropy.const_data_ptr<float>(), static_cast<Out*>(grad.data_ptr()), vocab, pieces, aligned_ok,
        inv_t, vocab_start, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  auto with_label = [&](auto out_tag) {
    if (labels.scalar_type() == at::kLong) {
      launch(out_tag, int64_t{});
    } else {
      launch(out_tag, int32_t{});
    }
  };
  if (out_dtype == at::kFloat) {
    with_label(float{});
  } else if (out_dtype == at::kBFloat16) {
    with_label(__nv_bfloat16{});
  } else {
    with_label(__half{});
  }
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CUDA, m) {
  m.impl("logits_row_stats", &logits_row_stats_cuda);
  m.impl("logits_row_grad", &logits_row_grad_cuda);
}

}  // namespace mgpt::rl

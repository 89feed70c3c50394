// CPU kernels of mgpt::varlen_attention_fwd / mgpt::varlen_attention_bwd: packed variable-length
// bidirectional attention with optional fused rotate-half RoPE (contract: mgpt_ops/vision/_contract.py).
//
// Per sequence s and head h, with x' = x cos + rotate_half(x) sin (fp32) for q and k:
//   forward   S = scale Q' K'^T,  lse_i = log sum_j exp S_ij,  O = softmax(S) V
//   backward  P = exp(S - lse),  delta_i = <dO_i, O_i>,  dV = P^T dO,  dP = dO V^T,  dS = P (dP - delta),
//             dQ' = scale dS K',  dK' = scale dS^T Q',  then dx = dx' cos + rotate_half^T(dx' sin)
//
// Work is cut into tasks that own disjoint output rows, so results never depend on the schedule
// (deterministic, no atomics): forward tasks are (sequence, head, run of query blocks); backward tasks are
// whole (sequence, head) pairs, each producing that pair's dq, dk and dv. Tasks are sorted most expensive
// first and handed out through a shared counter, because at::parallel_for alone splits a range statically,
// which would give one long image's tasks to a single thread.
//
// A task converts the rotated K (and V) of its (sequence, head) to fp32 once: O(L D) scratch per thread,
// never O(L^2). It then walks 64 x 64 tiles with FlashAttention-2's online softmax in base 2 (log2 e is
// folded into the query scale, so each score costs one exp2). Tile products (attention_cpu_tiles.h) are
// plain loops over compile-time sizes (the head dim is a template parameter), register-blocked 4 rows x 32
// columns so GCC vectorises them; the task functions are cloned for AVX-512, AVX2 and baseline x86-64 with a
// run-time pick, since the extension itself is built for baseline x86-64.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "vision/attention_cpu_tiles.h"
#include "vision/varlen_attention.h"

// The pragma of attention_cpu_tiles.h, whose helpers the task functions below inline (GCC inlines only
// across equal optimisation settings).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

#include "cpu_simd.h"

namespace mgpt::vision {
namespace {

using namespace cpu;  // NOLINT: the building blocks of attention_cpu_tiles.h

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

struct ForwardArgs {
  TokenRows q, k, v;
  Rotary rot;
  const int32_t* cu;
  float score_mult;  // scale * log2(e): scores come out in base 2
  int64_t heads, tokens, head_dim;
  char* out;  // contiguous [N, H, D] in q's dtype
  at::ScalarType out_type;
  int64_t out_elem_size;
  float* lse;  // contiguous [H, N]
};

struct ForwardTask {
  int64_t seq, head;
  int64_t first_block, end_block;  // query blocks [first_block, end_block) of the sequence
  int64_t cost;
};

struct ForwardScratch {
  std::vector<float> keys_t, values, q, scores, acc, row_max, row_sum, tmp;
  int64_t cached_seq = -1, cached_head = -1;  // whose K/V the buffers hold

  ForwardScratch(int64_t max_len, int64_t d)
      : keys_t(round_up(max_len) * d), values(round_up(max_len) * d), q(kBlock * d), scores(kBlock * kBlock),
        acc(kBlock * d), row_max(kBlock), row_sum(kBlock), tmp(d) {}
  static int64_t round_up(int64_t n) { return (n + kBlock - 1) / kBlock * kBlock; }
};

template <int D>
MGPT_ALWAYS_INLINE void forward_task(const ForwardArgs& a, const ForwardTask& task, ForwardScratch& s) {
  const int64_t start = a.cu[task.seq], len = a.cu[task.seq + 1] - start, h = task.head;
  const int64_t key_blocks = (len + kBlock - 1) / kBlock;
  if (s.cached_seq != task.seq || s.cached_head != h) {
    for (int64_t j = 0; j < len; ++j) {
      if (j + kPrefetchAhead < len) {
        prefetch_row<D>(a.k, start + j + kPrefetchAhead, h);
        prefetch_row<D>(a.v, start + j + kPrefetchAhead, h);
      }
      float* vrow = s.values.data() + j * D;
      load_rotated_row<D>(a.k, start + j, h, a.rot, 1.0f, s.tmp.data(), vrow);  // vrow as scratch
      pack_transposed<D>(vrow, j, s.keys_t.data());
      load_row<D>(a.v.row(start + j, h), a.v.type, vrow);
    }
    zero_panel_tail<D>(len, s.keys_t.data());
    s.cached_seq = task.seq;
    s.cached_head = h;
  }
  float* q = s.q.data();
  float* scores = s.scores.data();
  float* acc = s.acc.data();
  for (int64_t qb = task.first_block; qb < task.end_block; ++qb) {
    const int64_t row0 = qb * kBlock;
    const int rows = static_cast<int>(std::min<int64_t>(kBlock, len - row0));
    for (int r = 0; r < rows; ++r) {
      if (r + kPrefetchAhead < rows) prefetch_row<D>(a.q, start + row0 + r + kPrefetchAhead, h);
      load_rotated_row<D>(a.q, start + row0 + r, h, a.rot, a.score_mult, s.tmp.data(), q + r * D);
    }
    std::fill_n(s.row_max.data(), rows, -kInf);
    std::fill_n(s.row_sum.data(), rows, 0.0f);
    std::fill_n(acc, rows * D, 0.0f);
    for (int64_t kb = 0; kb < key_blocks; ++kb) {
      const int cols = static_cast<int>(std::min<int64_t>(kBlock, len - kb * kBlock));
      product_with_panel<D>(q, rows, s.keys_t.data() + kb * D * kBlock, cols, scores);
      for (int r = 0; r < rows; ++r) {
        float* srow = scores + r * kBlock;
        float new_max = s.row_max[r];
#pragma omp simd reduction(max : new_max)
        for (int j = 0; j < cols; ++j) new_max = srow[j] > new_max ? srow[j] : new_max;
        const float rescale = exp2_fast(s.row_max[r] - new_max);  // 0 on the first block (-inf - finite)
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < cols; ++j) {
          srow[j] = exp2_fast(srow[j] - new_max);
          sum += srow[j];
        }
        s.row_sum[r] = s.row_sum[r] * rescale + sum;
        s.row_max[r] = new_max;
        if (rescale != 1.0f) {
          float* arow = acc + r * D;
#pragma omp simd
          for (int d = 0; d < D; ++d) arow[d] *= rescale;
        }
      }
      accumulate_product<D>(scores, kBlock, rows, s.values.data() + kb * kBlock * D, cols, acc);
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t token = start + row0 + r;
      store_row<D>(acc + r * D, 1.0f / s.row_sum[r], a.out_type,
                   a.out + (token * a.heads + h) * D * a.out_elem_size);
      a.lse[h * a.tokens + token] = (s.row_max[r] + std::log2(s.row_sum[r])) * kLn2;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

struct BackwardArgs {
  TokenRows dout, q, k, v, out;
  const float* lse;  // [H, N]
  int64_t lse_head_stride, lse_token_stride;
  Rotary rot;
  const int32_t* cu;
  float scale;
  int64_t heads;
  char *dq, *dk, *dv;  // contiguous [N, H, D] in q's dtype
  at::ScalarType grad_type;
  int64_t grad_elem_size;
};

struct BackwardScratch {
  // Whole-sequence fp32 copies: rotated q and k (rows), K and V as transposed panels, dout, the dq sum.
  std::vector<float> q, k, keys_t, values_t, dout, dq, lse2, delta;
  // One tile pair's P, dS, a transpose, and the dk/dv sums of the current key block.
  std::vector<float> probs, dscores, tile_t, dk, dv, tmp, tmp2;

  BackwardScratch(int64_t max_len, int64_t d) {
    const int64_t n = (max_len + kBlock - 1) / kBlock * kBlock;
    for (auto* buf : {&q, &k, &keys_t, &values_t, &dout, &dq}) buf->resize(n * d);
    for (auto* buf : {&lse2, &delta}) buf->resize(n);
    for (auto* buf : {&probs, &dscores, &tile_t}) buf->resize(kBlock * kBlock);
    for (auto* buf : {&dk, &dv}) buf->resize(kBlock * d);
    for (auto* buf : {&tmp, &tmp2}) buf->resize(d);
  }
};

template <int D>
MGPT_ALWAYS_INLINE void backward_task(const BackwardArgs& a, int64_t seq, int64_t h, BackwardScratch& s) {
  const int64_t start = a.cu[seq], len = a.cu[seq + 1] - start;
  const int64_t blocks = (len + kBlock - 1) / kBlock;
  float* tmp = s.tmp.data();
  for (int64_t j = 0; j < len; ++j) {
    const int64_t token = start + j;
    if (j + kPrefetchAhead < len) {
      for (const TokenRows* t : {&a.q, &a.k, &a.v, &a.dout, &a.out}) prefetch_row<D>(*t, token + kPrefetchAhead, h);
    }
    load_rotated_row<D>(a.q, token, h, a.rot, 1.0f, tmp, s.q.data() + j * D);
    load_rotated_row<D>(a.k, token, h, a.rot, 1.0f, tmp, s.k.data() + j * D);
    pack_transposed<D>(s.k.data() + j * D, j, s.keys_t.data());
    load_row<D>(a.v.row(token, h), a.v.type, tmp);
    pack_transposed<D>(tmp, j, s.values_t.data());
    float* dout = s.dout.data() + j * D;
    load_row<D>(a.dout.row(token, h), a.dout.type, dout);
    const float* out = s.tmp2.data();
    load_row<D>(a.out.row(token, h), a.out.type, s.tmp2.data());
    float delta = 0.0f;
#pragma omp simd reduction(+ : delta)
    for (int d = 0; d < D; ++d) delta += dout[d] * out[d];
    s.delta[j] = delta;
    s.lse2[j] = a.lse[h * a.lse_head_stride + token * a.lse_token_stride] * kLog2e;
  }
  zero_panel_tail<D>(len, s.keys_t.data());
  zero_panel_tail<D>(len, s.values_t.data());
  std::fill_n(s.dq.data(), len * D, 0.0f);

  const float score_mult = a.scale * kLog2e;
  float* probs = s.probs.data();
  float* dscores = s.dscores.data();
  float* tile_t = s.tile_t.data();
  for (int64_t kb = 0; kb < blocks; ++kb) {
    const int cols = static_cast<int>(std::min<int64_t>(kBlock, len - kb * kBlock));
    const float* keys_panel = s.keys_t.data() + kb * D * kBlock;
    const float* values_panel = s.values_t.data() + kb * D * kBlock;
    std::fill_n(s.dk.data(), cols * D, 0.0f);
    std::fill_n(s.dv.data(), cols * D, 0.0f);
    for (int64_t qb = 0; qb < blocks; ++qb) {
      const int64_t row0 = qb * kBlock;
      const int rows = static_cast<int>(std::min<int64_t>(kBlock, len - row0));
      const float* q = s.q.data() + row0 * D;
      const float* dout = s.dout.data() + row0 * D;
      product_with_panel<D>(q, rows, keys_panel, cols, probs);
      product_with_panel<D>(dout, rows, values_panel, cols, dscores);
      for (int r = 0; r < rows; ++r) {
        float* prow = probs + r * kBlock;
        float* dsrow = dscores + r * kBlock;
        const float lse2 = s.lse2[row0 + r], delta = s.delta[row0 + r];
#pragma omp simd
        for (int j = 0; j < cols; ++j) {
          const float p = exp2_fast(prow[j] * score_mult - lse2);
          prow[j] = p;
          dsrow[j] = p * (dsrow[j] - delta);
        }
      }
      transpose_tile(probs, rows, cols, tile_t);
      accumulate_product<D>(tile_t, kBlock, cols, dout, rows, s.dv.data());          // dV += P^T dO
      accumulate_product<D>(dscores, kBlock, rows, s.k.data() + kb * kBlock * D, cols,
                            s.dq.data() + row0 * D);                                   // dQ' += dS K'
      transpose_tile(dscores, rows, cols, tile_t);
      accumulate_product<D>(tile_t, kBlock, cols, q, rows, s.dk.data());             // dK' += dS^T Q'
    }
    for (int j = 0; j < cols; ++j) {
      const int64_t token = start + kb * kBlock + j;
      const int64_t offset = (token * a.heads + h) * D * a.grad_elem_size;
      unrotate_row<D>(s.dk.data() + j * D, a.rot, token);
      store_row<D>(s.dk.data() + j * D, a.scale, a.grad_type, a.dk + offset);
      store_row<D>(s.dv.data() + j * D, 1.0f, a.grad_type, a.dv + offset);
    }
  }
  for (int64_t i = 0; i < len; ++i) {
    const int64_t token = start + i;
    unrotate_row<D>(s.dq.data() + i * D, a.rot, token);
    store_row<D>(s.dq.data() + i * D, a.scale, a.grad_type, a.dq + (token * a.heads + h) * D * a.grad_elem_size);
  }
}

// One non-template entry per head dim, cloned per instruction set (everything above inlines into it).
#define MGPT_DEFINE_TASKS(D)                                                                               \
  MGPT_SIMD_CLONES void forward_task_##D(const ForwardArgs& a, const ForwardTask& t, ForwardScratch& s) {  \
    forward_task<D>(a, t, s);                                                                              \
  }                                                                                                        \
  MGPT_SIMD_CLONES void backward_task_##D(const BackwardArgs& a, int64_t seq, int64_t h, BackwardScratch& s) { \
    backward_task<D>(a, seq, h, s);                                                                        \
  }
MGPT_DEFINE_TASKS(64)
MGPT_DEFINE_TASKS(72)
MGPT_DEFINE_TASKS(80)
MGPT_DEFINE_TASKS(96)
MGPT_DEFINE_TASKS(128)
#undef MGPT_DEFINE_TASKS

using ForwardFn = void (*)(const ForwardArgs&, const ForwardTask&, ForwardScratch&);
using BackwardFn = void (*)(const BackwardArgs&, int64_t, int64_t, BackwardScratch&);

ForwardFn forward_for(int64_t d) {
  switch (d) {
    case 64: return forward_task_64;
    case 72: return forward_task_72;
    case 80: return forward_task_80;
    case 96: return forward_task_96;
    default: return forward_task_128;  // head dims were checked: 128
  }
}

BackwardFn backward_for(int64_t d) {
  switch (d) {
    case 64: return backward_task_64;
    case 72: return backward_task_72;
    case 80: return backward_task_80;
    case 96: return backward_task_96;
    default: return backward_task_128;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Scheduling and the ops
// ---------------------------------------------------------------------------------------------------------

// Runs tasks 0..count-1 (sorted most expensive first) on all threads; each thread makes one scratch and
// pulls the next task index from a shared counter.
template <typename MakeScratch, typename Body>
void run_dynamic(int64_t count, MakeScratch make_scratch, Body body) {
  if (count == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    auto scratch = make_scratch();
    for (int64_t w = begin; w < end; ++w)
      for (int64_t t = next.fetch_add(1); t < count; t = next.fetch_add(1)) body(t, scratch);
  });
}

// cu_seqlens values (the kernels index with them): starts at 0, non-decreasing, ends at N, longest
// sequence <= max_seqlen. Returns the longest length.
int64_t check_cu_seqlens_values(const char* op, const at::Tensor& cu_seqlens, int64_t tokens, int64_t max_seqlen) {
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int64_t seqs = cu_seqlens.numel() - 1;
  TORCH_CHECK(cu[0] == 0, op, ": argument 'cu_seqlens' must start at 0, got ", std::to_string(cu[0]));
  int64_t longest = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t len = int64_t{cu[s + 1]} - cu[s];
    TORCH_CHECK(len >= 0, op, ": argument 'cu_seqlens' must be non-decreasing, but entry ", std::to_string(s + 1),
                " (", std::to_string(cu[s + 1]), ") < entry ", std::to_string(s), " (", std::to_string(cu[s]), ")");
    longest = std::max(longest, len);
  }
  TORCH_CHECK(cu[seqs] == tokens, op, ": the last entry of 'cu_seqlens' must equal the number of tokens N = ",
              std::to_string(tokens), ", got ", std::to_string(cu[seqs]));
  TORCH_CHECK(longest <= max_seqlen, op, ": argument 'max_seqlen' (", std::to_string(max_seqlen),
              ") is smaller than the longest sequence in 'cu_seqlens' (", std::to_string(longest), ")");
  return longest;
}

void check_on_cpu(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, ": the CPU kernel got argument 'q' on ", q.device().str());
}

Rotary rotary_of(const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin) {
  if (!cos.has_value()) return {};
  return {cos->const_data_ptr<float>(), sin->const_data_ptr<float>(), cos->stride(0), sin->stride(0)};
}

// Forward tasks: each (sequence, head) split into runs of query blocks so that no task costs more than
// 1/8 of a thread's fair share (a long image alone still keeps every thread busy); cost ~ rows x keys.
std::vector<ForwardTask> forward_tasks(const int32_t* cu, int64_t seqs, int64_t heads) {
  const int64_t threads = at::get_num_threads();
  double total = 0;
  for (int64_t s = 0; s < seqs; ++s) total += double(cu[s + 1] - cu[s]) * double(cu[s + 1] - cu[s]) * heads;
  const double max_cost = threads > 1 ? total / double(8 * threads) : total;
  std::vector<ForwardTask> tasks;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t len = cu[s + 1] - cu[s], blocks = (len + kBlock - 1) / kBlock;
    if (len == 0) continue;
    const int64_t block_cost = std::min<int64_t>(kBlock, len) * len;
    const int64_t run = std::clamp<int64_t>(static_cast<int64_t>(max_cost / double(block_cost)), 1, blocks);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t b = 0; b < blocks; b += run)
        tasks.push_back({s, h, b, std::min(b + run, blocks), (std::min(b + run, blocks) - b) * block_cost});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const auto& x, const auto& y) { return x.cost > y.cost; });
  return tasks;
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                            int64_t max_seqlen, const std::optional<at::Tensor>& cos,
                                                            const std::optional<at::Tensor>& sin, double scale) {
  check_attention_args(kFwdOp, q, k, v, cu_seqlens, max_seqlen, cos, sin, scale);
  check_on_cpu(kFwdOp, q);
  const int64_t tokens = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t longest = check_cu_seqlens_values(kFwdOp, cu_seqlens, tokens, max_seqlen);
  at::Tensor out = at::empty({tokens, heads, d}, q.options());
  at::Tensor lse = at::empty({heads, tokens}, q.options().dtype(at::kFloat));
  if (tokens == 0 || heads == 0) return {out, lse};

  const ForwardArgs args{TokenRows(q), TokenRows(k), TokenRows(v), rotary_of(cos, sin),
                         cu_seqlens.const_data_ptr<int32_t>(), static_cast<float>(scale) * kLog2e,
                         heads, tokens, d, static_cast<char*>(out.data_ptr()), out.scalar_type(),
                         out.element_size(), lse.data_ptr<float>()};
  const std::vector<ForwardTask> tasks = forward_tasks(args.cu, cu_seqlens.numel() - 1, heads);
  const ForwardFn task_fn = forward_for(d);
  run_dynamic(static_cast<int64_t>(tasks.size()), [&] { return ForwardScratch(longest, d); },
              [&](int64_t t, ForwardScratch& s) { task_fn(args, tasks[t], s); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, const std::optional<at::Tensor>& cos,
    const std::optional<at::Tensor>& sin, double scale) {
  check_attention_args(kBwdOp, q, k, v, cu_seqlens, max_seqlen, cos, sin, scale);
  check_like_query(kBwdOp, "dout", dout, q);
  check_like_query(kBwdOp, "out", out, q);
  check_lse(kBwdOp, lse, q);
  check_on_cpu(kBwdOp, q);
  const int64_t tokens = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t longest = check_cu_seqlens_values(kBwdOp, cu_seqlens, tokens, max_seqlen);
  at::Tensor dq = at::empty({tokens, heads, d}, q.options());
  at::Tensor dk = at::empty({tokens, heads, d}, q.options());
  at::Tensor dv = at::empty({tokens, heads, d}, q.options());
  if (tokens == 0 || heads == 0) return {dq, dk, dv};

  const BackwardArgs args{TokenRows(dout), TokenRows(q), TokenRows(k), TokenRows(v), TokenRows(out),
                          lse.const_data_ptr<float>(), lse.stride(0), lse.stride(1), rotary_of(cos, sin),
                          cu_seqlens.const_data_ptr<int32_t>(), static_cast<float>(scale), heads,
                          static_cast<char*>(dq.data_ptr()), static_cast<char*>(dk.data_ptr()),
                          static_cast<char*>(dv.data_ptr()), dq.scalar_type(), dq.element_size()};
  // One task per non-empty (sequence, head), longest first.
  std::vector<std::pair<int64_t, int64_t>> pairs;  // (seq, head)
  for (int64_t s = 0; s < cu_seqlens.numel() - 1; ++s)
    if (args.cu[s + 1] > args.cu[s])
      for (int64_t h = 0; h < heads; ++h) pairs.emplace_back(s, h);
  std::stable_sort(pairs.begin(), pairs.end(), [&](const auto& x, const auto& y) {
    return args.cu[x.first + 1] - args.cu[x.first] > args.cu[y.first + 1] - args.cu[y.first];
  });
  const BackwardFn task_fn = backward_for(d);
  run_dynamic(static_cast<int64_t>(pairs.size()), [&] { return BackwardScratch(longest, d); },
              [&](int64_t t, BackwardScratch& s) { task_fn(args, pairs[t].first, pairs[t].second, s); });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace mgpt::vision

#undef MGPT_SIMD_CLONES

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The GEMM driver shared by the CPU quantized GEMMs: out[M, N] = A[M, K] @ W[N, K]^T, where A is already fp32
// and W exists only in a quantized format.
//
// The output is cut into tiles (tasks) of at most kMaxTaskRows rows x kPanelRows columns. A task dequantizes
// its kPanelRows rows of W into an fp32 panel (a few hundred KiB: it stays in L2 while it is used), multiplies
// A's rows by it with at::mm_out (MKL's sgemm on x86 builds of torch; inside the parallel region it runs on the
// calling thread) and hands the fp32 product to the caller's epilogue. So W is never materialised in fp32 as a
// whole, and is dequantized about once per call. Tasks are handed out through a shared counter; each owns
// disjoint output elements, so a result does not depend on which thread computed it. A worker keeps its last
// panel and reuses it when its next task covers the same rows of W.
//
// Why at::mm on fp32 panels and not bf16: the bf16 GEMMs of ATen round their output to bf16, and the fp32
// accumulation the ops promise needs an fp32 result.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace mgpt::quant::cpu {

inline constexpr int64_t kPanelRows = 64;     // rows of W per panel (output columns per task)
inline constexpr int64_t kMaxTaskRows = 512;  // rows of A per task: bounds the scratch, keeps tasks balanced
inline constexpr int64_t kTasksPerThread = 4;

// Output tile [m0, m0 + m_rows) x [n0, n0 + n_rows) of one GEMM `group` (an expert of a grouped GEMM; 0 else).
struct Tile {
  int64_t group, m0, m_rows, n0, n_rows;
};

// Tiles covering rows [m_begin, m_end) of A against all n rows of W number `group`. Rows are split further
// only while there are fewer than kTasksPerThread tiles per thread (re-dequantizing a panel costs 1/m_rows of
// its product).
inline void append_tiles(std::vector<Tile>& tiles, int64_t group, int64_t m_begin, int64_t m_end, int64_t n) {
  const int64_t m = m_end - m_begin;
  if (m <= 0 || n <= 0) return;
  const int64_t panels = (n + kPanelRows - 1) / kPanelRows;
  const int64_t wanted = kTasksPerThread * at::get_num_threads();
  int64_t row_blocks = std::max<int64_t>((m + kMaxTaskRows - 1) / kMaxTaskRows, (wanted + panels - 1) / panels);
  row_blocks = std::clamp<int64_t>(row_blocks, 1, std::max<int64_t>(1, m / kPanelRows));
  const int64_t rows_per_block = (m + row_blocks - 1) / row_blocks;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t n0 = p * kPanelRows;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += rows_per_block) {
      tiles.push_back({group, m0, std::min(rows_per_block, m_end - m0), n0, std::min(kPanelRows, n - n0)});
    }
  }
}

// Runs every tile. a: fp32 [M, K] contiguous. dequant(group, n0, n_rows, panel) writes rows [n0, n0 + n_rows)
// of W number `group` into panel (row-major, n_rows x K). The product is formed in K slices of at most
// k_slice columns (int8 needs them to stay exact in fp32); consume(tile, slice, product) receives each in
// order, product being fp32 row-major [tile.m_rows, tile.n_rows].
template <class Dequant, class Consume>
void run_tiles(const at::Tensor& a, const std::vector<Tile>& tiles, int64_t k_slice, const Dequant& dequant,
               const Consume& consume) {
  const int64_t k = a.size(1);
  k_slice = std::max<int64_t>(k_slice, 1);                                    // callers pass K itself, maybe 0
  const int64_t slices = std::max<int64_t>(1, (k + k_slice - 1) / k_slice);  // K = 0: one empty slice (zeros)
  int64_t max_rows = 0;
  for (const Tile& t : tiles) max_rows = std::max(max_rows, t.m_rows);
  const auto count = static_cast<int64_t>(tiles.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kPanelRows * k), product(max_rows * kPanelRows);
    int64_t cached_group = -1, cached_n0 = -1;
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
        const Tile& t = tiles[i];
        if (t.group != cached_group || t.n0 != cached_n0) {
          dequant(t.group, t.n0, t.n_rows, panel.data());
          cached_group = t.group;
          cached_n0 = t.n0;
        }
        const at::Tensor w = at::from_blob(panel.data(), {t.n_rows, k}, a.options());
        at::Tensor out = at::from_blob(product.data(), {t.m_rows, t.n_rows}, a.options());
        const at::Tensor rows = a.narrow(0, t.m0, t.m_rows);
        for (int64_t s = 0; s < slices; ++s) {
          const int64_t k0 = s * k_slice, len = std::min(k_slice, k - k0);
          at::mm_out(out, rows.narrow(1, k0, len), w.narrow(1, k0, len).t());
          consume(t, s, static_cast<const float*>(product.data()));
        }
      }
    }
  });
}

}  // namespace mgpt::quant::cpu

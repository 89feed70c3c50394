// CPU kernel of mgpt::w4a16_mm_kernel: out[m, n] = sum_k x[m, k] w_hat[n, k] with the int4 group format of
// mgpt_ops/quant/w4a16.py (the contract):
//
//   qweight int32 [N, K / 8]: code k of row n = bits [4 (k % 8), 4 (k % 8) + 4) of qweight[n, k / 8]
//   w_hat[n, k] = (code - z[n, k / G]) * s[n, k / G]     (z = 8 when zeros is None; G = group_size)
//
// x is converted to fp32 once; weight panels are decoded to fp32 (one rounding of (code - z) * s) as the panel
// driver of panel_gemm_cpu.h needs them and multiplied by MKL's sgemm (fp32 accumulation); the result is cast
// to x's dtype once.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "quant/dequant_cpu.h"
#include "quant/panel_gemm_cpu.h"
#include "quant/quant_checks.h"

namespace mgpt::quant {
namespace {

using cpu::Tile;

constexpr const char* kOp = "mgpt.w4a16_mm_kernel";
constexpr int64_t kCodesPerWord = 8;

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

at::Tensor w4a16_mm_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                        const std::optional<at::Tensor>& zeros, int64_t group_size) {
  check_cpu(kOp, "x", x);
  TORCH_CHECK(x.dim() == 2, kOp, ": argument 'x' must be 2-D [M, K], got shape ", shape_of(x));
  TORCH_CHECK(is_float_type(x.scalar_type()), kOp, ": argument 'x' must have dtype float32, bfloat16 or float16, "
              "got ", dtype_name(x.scalar_type()));
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(group_size > 0 && group_size % kCodesPerWord == 0 && k % group_size == 0, kOp,
              ": argument 'group_size' must be a positive multiple of 8 that divides K = ", std::to_string(k),
              ", got ", std::to_string(group_size));
  check_cpu(kOp, "qweight", qweight);
  check_dtype(kOp, "qweight", qweight, at::kInt);
  TORCH_CHECK(qweight.dim() == 2, kOp, ": argument 'qweight' must be 2-D [N, K / 8], got shape ",
              shape_of(qweight));
  const int64_t n = qweight.size(0), groups = k / group_size;
  check_shape2(kOp, "qweight", qweight, n, k / kCodesPerWord);
  check_cpu(kOp, "scales", scales);
  TORCH_CHECK(is_float_type(scales.scalar_type()), kOp, ": argument 'scales' must have dtype float32, bfloat16 "
              "or float16, got ", dtype_name(scales.scalar_type()));
  check_shape2(kOp, "scales", scales, n, groups);
  if (zeros.has_value()) {
    check_cpu(kOp, "zeros", *zeros);
    check_dtype(kOp, "zeros", *zeros, scales.scalar_type());
    check_shape2(kOp, "zeros", *zeros, n, groups);
  }

  if (m == 0 || n == 0) return at::empty({m, n}, x.options());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor words = qweight.contiguous();
  const at::Tensor scales_f = scales.to(at::kFloat).contiguous();
  const std::optional<at::Tensor> zeros_f =
      zeros.has_value() ? std::optional<at::Tensor>(zeros->to(at::kFloat).contiguous()) : std::nullopt;
  const int32_t* w = words.const_data_ptr<int32_t>();
  const float* s = scales_f.const_data_ptr<float>();
  const float* z = zeros_f ? zeros_f->const_data_ptr<float>() : nullptr;
  const int64_t words_per_row = k / kCodesPerWord;

  at::Tensor result = at::empty({m, n}, xf.options());
  float* out = result.data_ptr<float>();
  std::vector<Tile> tiles;
  cpu::append_tiles(tiles, 0, 0, m, n);
  cpu::run_tiles(
      xf, tiles, k,
      [&](int64_t, int64_t n0, int64_t rows, float* panel) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = n0 + r;
          cpu::decode_int4(w + row * words_per_row, k, s + row * groups, z == nullptr ? nullptr : z + row * groups,
                           group_size, panel + r * k);
        }
      },
      [&](const Tile& t, int64_t, const float* product) {
        for (int64_t i = 0; i < t.m_rows; ++i) {
          std::copy_n(product + i * t.n_rows, t.n_rows, out + (t.m0 + i) * n + t.n0);
        }
      });
  return x.scalar_type() == at::kFloat ? result : result.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CPU, m) { m.impl("w4a16_mm_kernel", &w4a16_mm_cpu); }

}  // namespace mgpt::quant

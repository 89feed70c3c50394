// CPU kernels of the FP8 / INT8 scaled GEMMs (scales are DEQUANTISATION scales, x ≈ q * scale):
//
//   mgpt::scaled_mm_kernel        out[m, n] = sa[m] sb[n] sum_k a[m, k] b[n, k] + bias[n]
//                                 (fp8 or int8 a [M, K], b [N, K]; scales [1, 1] or one per row [rows, 1];
//                                 contract: mgpt_ops/quant/scaled_gemm.py)
//   mgpt::block_scaled_mm_kernel  out[m, n] = sum_k a[m, k] sa[m, k / B] b[n, k] sb[n / B, k / B] + bias[n]
//                                 (fp8; 1 x B activation groups, B x B weight blocks, partial last blocks;
//                                 contract: mgpt_ops/quant/block_gemm.py)
//   mgpt::grouped_block_scaled_mm_kernel   the block-scaled product per expert e for rows offsets[e] .. offsets[e+1]
//                                 of a against b[e] (MoE experts; no bias)
//
// Every kernel decodes the activations to fp32 once, then runs the panel driver of panel_gemm_cpu.h: weight
// panels are decoded to fp32 as they are needed and multiplied by MKL's sgemm; the epilogue applies scales and
// bias in fp32 and the result is cast to out_dtype once.
//
// Exactness: fp8 values are exact in fp32, so for scaled_mm_kernel only the fp32 sums round (fp32
// accumulation). int8 must accumulate exactly in int32: the product is formed in K slices of 1024, whose fp32
// sums are exact integers (|sum| <= 1024 * 128^2 = 2^24), and the slices are added in int32 (this holds even if
// torch is told to run fp32 matmuls in bf16 or tf32: int8 and fp8 values are exact in both). The block-scaled
// kernels fold each scale into its operand before the product (one fp32 rounding per element, relative 2^-24)
// instead of scaling per-block partial sums: the same result to fp32 accuracy, from one large sgemm.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "quant/dequant_cpu.h"
#include "quant/panel_gemm_cpu.h"
#include "quant/quant_checks.h"

namespace mgpt::quant {
namespace {

using cpu::Tile;

constexpr const char* kScaledOp = "mgpt.scaled_mm_kernel";
constexpr const char* kBlockOp = "mgpt.block_scaled_mm_kernel";
constexpr const char* kGroupedOp = "mgpt.grouped_block_scaled_mm_kernel";
constexpr int64_t kInt8MaxK = (int64_t{1} << 31) / (128 * 128) - 1;  // K * 128^2 <= 2^31 - 1
constexpr int64_t kInt8ExactSlice = 1024;                             // 1024 * 128^2 = 2^24
constexpr int64_t kRowGrain = 16;                                     // rows per parallel step when decoding

const uint8_t* fp8_bytes(const at::Tensor& t) { return static_cast<const uint8_t*>(t.const_data_ptr()); }

// Both operands: 2-D on the CPU, float8_e4m3fn (or int8 where allowed), b [N, K] with a's K.
void check_operands(const char* op, const at::Tensor& a, const at::Tensor& b, bool int8_allowed) {
  check_cpu(op, "a", a);
  check_cpu(op, "b", b);
  const bool a_ok = a.scalar_type() == at::kFloat8_e4m3fn || (int8_allowed && a.scalar_type() == at::kChar);
  TORCH_CHECK(a_ok, op, ": argument 'a' must have dtype ", int8_allowed ? "Float8_e4m3fn or Char (int8)" :
              "Float8_e4m3fn", ", got ", dtype_name(a.scalar_type()));
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": arguments 'a' and 'b' must share one dtype, got a=",
              dtype_name(a.scalar_type()), ", b=", dtype_name(b.scalar_type()));
  TORCH_CHECK(a.dim() == 2, op, ": argument 'a' must be 2-D [M, K], got shape ", shape_of(a));
}

// [1, 1] (per tensor) or [rows, 1] (one per row of its operand), fp32 on the CPU.
void check_row_scale(const char* name, const at::Tensor& s, int64_t rows) {
  check_cpu(kScaledOp, name, s);
  check_dtype(kScaledOp, name, s, at::kFloat);
  TORCH_CHECK(s.dim() == 2 && s.size(1) == 1 && (s.size(0) == 1 || s.size(0) == rows), kScaledOp, ": argument '",
              name, "' must have shape [1, 1] or [", std::to_string(rows), ", 1], got ", shape_of(s));
}

// fp32 copy [rows, K] of an fp8 / int8 operand; with group scales [rows, ceil(K / block)] each value is
// multiplied by its scale.
at::Tensor decode_operand(const at::Tensor& q, const float* group_scales = nullptr, int64_t block = 1) {
  const at::Tensor src = q.contiguous();
  const int64_t rows = src.size(0), k = src.size(1), groups = blocks_of(k, block);
  at::Tensor out = at::empty({rows, k}, src.options().dtype(at::kFloat));
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (src.scalar_type() == at::kChar) {
        cpu::decode_int8(src.const_data_ptr<int8_t>() + r * k, k, dst + r * k);
      } else if (group_scales == nullptr) {
        cpu::decode_fp8(fp8_bytes(src) + r * k, k, dst + r * k);
      } else {
        cpu::decode_fp8_blocks(fp8_bytes(src) + r * k, k, group_scales + r * groups, block, dst + r * k);
      }
    }
  });
  return out;
}

std::optional<at::Tensor> bias_as_float(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return std::nullopt;
  return bias->to(at::kFloat).contiguous();
}

at::Tensor cast_result(const at::Tensor& result, at::ScalarType out_dtype) {
  return out_dtype == at::kFloat ? result : result.to(out_dtype);
}

// result[m0 + i, n0 + j] = sum[i, j] (* row_scale[m0 + i] * col_scale[n0 + j] when scaled) + bias[n0 + j]
// (when given), for the tile's sums held as fp32 products or int32 totals (row stride `ld`). Scales of step 0
// are per-tensor.
struct Epilogue {
  float* result;
  int64_t result_ld;
  const float* row_scale;
  int64_t row_step;
  const float* col_scale;
  int64_t col_step;
  const float* bias;

  template <typename T>
  void operator()(const Tile& t, const T* sums, int64_t ld) const {
    for (int64_t i = 0; i < t.m_rows; ++i) {
      const T* s = sums + i * ld;
      float* out = result + (t.m0 + i) * result_ld + t.n0;
      const float rs = row_scale == nullptr ? 1.0f : row_scale[(t.m0 + i) * row_step];
      for (int64_t j = 0; j < t.n_rows; ++j) {
        float v = static_cast<float>(s[j]);
        if (row_scale != nullptr) v = v * rs * col_scale[(t.n0 + j) * col_step];
        out[j] = bias == nullptr ? v : v + bias[t.n0 + j];
      }
    }
  }
};

at::Tensor scaled_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                         const at::Tensor& scale_b, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  check_operands(kScaledOp, a, b, /*int8_allowed=*/true);
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK(b.dim() == 2 && b.size(1) == k, kScaledOp, ": argument 'b' must be the weight [N, K] with K = ",
              std::to_string(k), ", got shape ", shape_of(b));
  const int64_t n = b.size(0);
  const bool is_int8 = a.scalar_type() == at::kChar;
  TORCH_CHECK(!is_int8 || k <= kInt8MaxK, kScaledOp, ": int8 operands need K <= ", std::to_string(kInt8MaxK),
              " (exact int32 accumulation), got K = ", std::to_string(k));
  check_row_scale("scale_a", scale_a, m);
  check_row_scale("scale_b", scale_b, n);
  check_out_dtype(kScaledOp, out_dtype);
  check_bias(kScaledOp, bias, n);

  at::Tensor result = at::empty({m, n}, a.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return cast_result(result, out_dtype);
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const std::optional<at::Tensor> bias_f = bias_as_float(bias);
  const Epilogue epilogue{result.data_ptr<float>(), n, sa.const_data_ptr<float>(), sa.size(0) == 1 ? 0 : 1,
                          sb.const_data_ptr<float>(), sb.size(0) == 1 ? 0 : 1,
                          bias_f ? bias_f->const_data_ptr<float>() : nullptr};
  const at::Tensor af = decode_operand(a);
  const at::Tensor bq = b.contiguous();
  std::vector<Tile> tiles;
  cpu::append_tiles(tiles, 0, 0, m, n);

  if (!is_int8) {
    const uint8_t* w = fp8_bytes(bq);
    cpu::run_tiles(
        af, tiles, k,
        [&](int64_t, int64_t n0, int64_t rows, float* panel) {
          for (int64_t r = 0; r < rows; ++r) cpu::decode_fp8(w + (n0 + r) * k, k, panel + r * k);
        },
        [&](const Tile& t, int64_t, const float* product) { epilogue(t, product, t.n_rows); });
    return cast_result(result, out_dtype);
  }

  // int8: slices of exact fp32 sums added in int32; the last slice hands the exact total to the epilogue.
  const int64_t slices = std::max<int64_t>(1, blocks_of(k, kInt8ExactSlice));
  at::Tensor acc = at::zeros({m, n}, a.options().dtype(at::kInt));
  int32_t* acc_p = acc.data_ptr<int32_t>();
  const int8_t* w = bq.const_data_ptr<int8_t>();
  cpu::run_tiles(
      af, tiles, kInt8ExactSlice,
      [&](int64_t, int64_t n0, int64_t rows, float* panel) {
        for (int64_t r = 0; r < rows; ++r) cpu::decode_int8(w + (n0 + r) * k, k, panel + r * k);
      },
      [&](const Tile& t, int64_t slice, const float* product) {
        int32_t* tile_acc = acc_p + t.m0 * n + t.n0;
        for (int64_t i = 0; i < t.m_rows; ++i) {
          const float* p = product + i * t.n_rows;
          int32_t* row = tile_acc + i * n;
          for (int64_t j = 0; j < t.n_rows; ++j) row[j] += static_cast<int32_t>(p[j]);
        }
        if (slice + 1 == slices) epilogue(t, static_cast<const int32_t*>(tile_acc), n);
      });
  return cast_result(result, out_dtype);
}

// Scales of the block-scaled kernels: fp32 on the CPU with the given shape.
void check_block_scale(const char* op, const char* name, const at::Tensor& s, std::vector<int64_t> shape) {
  check_cpu(op, name, s);
  check_dtype(op, name, s, at::kFloat);
  std::string want = "[";
  for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  TORCH_CHECK(s.sizes() == at::IntArrayRef(shape), op, ": argument '", name, "' must have shape ", want, "], got ",
              shape_of(s));
}

at::Tensor block_scaled_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                               const at::Tensor& scale_b, at::ScalarType out_dtype, int64_t block,
                               const std::optional<at::Tensor>& bias) {
  check_operands(kBlockOp, a, b, /*int8_allowed=*/false);
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK(b.dim() == 2 && b.size(1) == k, kBlockOp, ": argument 'b' must be the weight [N, K] with K = ",
              std::to_string(k), ", got shape ", shape_of(b));
  const int64_t n = b.size(0);
  TORCH_CHECK(block >= 1, kBlockOp, ": argument 'block' must be >= 1, got ", std::to_string(block));
  const int64_t kb = blocks_of(k, block);
  check_block_scale(kBlockOp, "scale_a", scale_a, {m, kb});
  check_block_scale(kBlockOp, "scale_b", scale_b, {blocks_of(n, block), kb});
  check_out_dtype(kBlockOp, out_dtype);
  check_bias(kBlockOp, bias, n);

  at::Tensor result = at::empty({m, n}, a.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return cast_result(result, out_dtype);
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous(), bq = b.contiguous();
  const std::optional<at::Tensor> bias_f = bias_as_float(bias);
  const Epilogue epilogue{result.data_ptr<float>(), n, nullptr, 0, nullptr, 0,
                          bias_f ? bias_f->const_data_ptr<float>() : nullptr};
  const at::Tensor af = decode_operand(a, sa.const_data_ptr<float>(), block);
  const uint8_t* w = fp8_bytes(bq);
  const float* sb_p = sb.const_data_ptr<float>();
  std::vector<Tile> tiles;
  cpu::append_tiles(tiles, 0, 0, m, n);
  cpu::run_tiles(
      af, tiles, k,
      [&](int64_t, int64_t n0, int64_t rows, float* panel) {
        for (int64_t r = 0; r < rows; ++r) {
          cpu::decode_fp8_blocks(w + (n0 + r) * k, k, sb_p + (n0 + r) / block * kb, block, panel + r * k);
        }
      },
      [&](const Tile& t, int64_t, const float* product) { epilogue(t, product, t.n_rows); });
  return cast_result(result, out_dtype);
}

// offsets [E + 1] int32 / int64 on the CPU: 0, non-decreasing, ending at M_total. Returns them as int64.
std::vector<int64_t> checked_offsets(const at::Tensor& offsets, int64_t experts, int64_t m_total) {
  check_cpu(kGroupedOp, "offsets", offsets);
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt, kGroupedOp,
              ": argument 'offsets' must have dtype int64 or int32, got ", dtype_name(offsets.scalar_type()));
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == experts + 1, kGroupedOp,
              ": argument 'offsets' must have shape [E + 1] = [", std::to_string(experts + 1), "], got ",
              shape_of(offsets));
  const at::Tensor host = offsets.to(at::kLong).contiguous();
  const int64_t* p = host.const_data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + experts + 1);
  TORCH_CHECK(out[0] == 0, kGroupedOp, ": argument 'offsets' must start at 0, got ", std::to_string(out[0]));
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(out[e] <= out[e + 1], kGroupedOp, ": argument 'offsets' must be non-decreasing, got offsets[",
                std::to_string(e), "] = ", std::to_string(out[e]), " > offsets[", std::to_string(e + 1), "] = ",
                std::to_string(out[e + 1]));
  }
  TORCH_CHECK(out[experts] == m_total, kGroupedOp, ": argument 'offsets' must end at M_total = ",
              std::to_string(m_total), " (the rows of 'a'), got ", std::to_string(out[experts]));
  return out;
}

at::Tensor grouped_block_scaled_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                                       const at::Tensor& scale_b, const at::Tensor& offsets,
                                       at::ScalarType out_dtype, int64_t block) {
  check_operands(kGroupedOp, a, b, /*int8_allowed=*/false);
  const int64_t m = a.size(0), k = a.size(1);
  TORCH_CHECK(b.dim() == 3 && b.size(2) == k, kGroupedOp, ": argument 'b' must be the expert weights [E, N, K] "
              "with K = ", std::to_string(k), ", got shape ", shape_of(b));
  const int64_t experts = b.size(0), n = b.size(1);
  TORCH_CHECK(block >= 1, kGroupedOp, ": argument 'block' must be >= 1, got ", std::to_string(block));
  const int64_t kb = blocks_of(k, block), nb = blocks_of(n, block);
  check_block_scale(kGroupedOp, "scale_a", scale_a, {m, kb});
  check_block_scale(kGroupedOp, "scale_b", scale_b, {experts, nb, kb});
  check_out_dtype(kGroupedOp, out_dtype);
  const std::vector<int64_t> bounds = checked_offsets(offsets, experts, m);

  at::Tensor result = at::empty({m, n}, a.options().dtype(at::kFloat));
  if (m == 0 || n == 0) return cast_result(result, out_dtype);
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous(), bq = b.contiguous();
  const Epilogue epilogue{result.data_ptr<float>(), n, nullptr, 0, nullptr, 0, nullptr};
  const at::Tensor af = decode_operand(a, sa.const_data_ptr<float>(), block);
  const uint8_t* w = fp8_bytes(bq);
  const float* sb_p = sb.const_data_ptr<float>();
  std::vector<Tile> tiles;  // experts without rows get no tiles: their weights are never decoded
  for (int64_t e = 0; e < experts; ++e) cpu::append_tiles(tiles, e, bounds[e], bounds[e + 1], n);
  cpu::run_tiles(
      af, tiles, k,
      [&](int64_t e, int64_t n0, int64_t rows, float* panel) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = n0 + r;
          cpu::decode_fp8_blocks(w + (e * n + row) * k, k, sb_p + (e * nb + row / block) * kb, block,
                                 panel + r * k);
        }
      },
      [&](const Tile& t, int64_t, const float* product) { epilogue(t, product, t.n_rows); });
  return cast_result(result, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CPU, m) {
  m.impl("scaled_mm_kernel", &scaled_mm_cpu);
  m.impl("block_scaled_mm_kernel", &block_scaled_mm_cpu);
  m.impl("grouped_block_scaled_mm_kernel", &grouped_block_scaled_mm_cpu);
}

}  // namespace mgpt::quant

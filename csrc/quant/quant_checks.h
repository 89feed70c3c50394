// Argument checks shared by the CPU kernels of the quantized GEMMs (mgpt::scaled_mm_kernel,
// mgpt::block_scaled_mm_kernel, mgpt::grouped_block_scaled_mm_kernel, mgpt::w4a16_mm_kernel).
// The public Python wrappers check the same things first (mgpt_ops/quant/scaled_gemm.py, block_gemm.py,
// w4a16.py); these are the second line of defence for anyone calling torch.ops.mgpt.* directly, so a bad
// call raises instead of reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include "tensor_messages.h"

#include <string>

namespace mgpt::quant {

using mgpt::shape_of;  // messages from strings only: see tensor_messages.h

inline std::string dtype_name(at::ScalarType t) { return c10::toString(t); }

inline void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": the CPU kernel got argument '", name, "' on ", t.device().str());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": argument '", name, "' must have dtype ", dtype_name(want), ", got ",
              dtype_name(t.scalar_type()));
}

// A 2-D tensor of exactly [rows, cols].
inline void check_shape2(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": argument '", name,
              "' must have shape [", std::to_string(rows), ", ", std::to_string(cols), "], got ", shape_of(t));
}

inline void check_out_dtype(const char* op, at::ScalarType out_dtype) {
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf, op,
              ": argument 'out_dtype' must be float32, bfloat16 or float16, got ", dtype_name(out_dtype));
}

// bias: absent, or [n] fp32 / bf16 / fp16 on the CPU.
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  check_cpu(op, "bias", b);
  TORCH_CHECK(b.dim() == 1 && b.size(0) == n, op, ": argument 'bias' must have shape [", std::to_string(n),
              "], got ", shape_of(b));
  TORCH_CHECK(b.scalar_type() == at::kFloat || b.scalar_type() == at::kBFloat16 || b.scalar_type() == at::kHalf,
              op, ": argument 'bias' must have dtype float32, bfloat16 or float16, got ",
              dtype_name(b.scalar_type()));
}

inline int64_t blocks_of(int64_t n, int64_t block) { return (n + block - 1) / block; }

}  // namespace mgpt::quant

// Argument checks shared by the CPU and CUDA kernels of mgpt::logits_row_stats / mgpt::logits_row_grad.
// The public Python wrapper checks the same things first; these are the second line of defence for
// anyone calling torch.ops.mgpt.* directly, so a bad call raises instead of reading out of bounds.
// Contract of both ops: mgpt_ops/rl/_row_ops.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "tensor_messages.h"

#include <cmath>
#include <string>

namespace mgpt::rl {

using mgpt::shape_of;  // messages from strings only: see tensor_messages.h

inline constexpr const char* kStatsOp = "mgpt.logits_row_stats";
inline constexpr const char* kGradOp = "mgpt.logits_row_grad";

// logits [C, Vs] float32 contiguous with Vs >= 1; labels [C] int64/int32 contiguous on the same device.
inline void check_logits_and_labels(const char* op, const at::Tensor& logits, const at::Tensor& labels,
                                    double inv_temperature) {
  TORCH_CHECK(logits.dim() == 2, op, ": argument 'logits' must be 2-D [C, Vs], got shape ", shape_of(logits));
  TORCH_CHECK(logits.scalar_type() == at::kFloat, op, ": argument 'logits' must have dtype float32, got ",
              c10::toString(logits.scalar_type()));
  TORCH_CHECK(logits.is_contiguous(), op, ": argument 'logits' must be contiguous; call .contiguous() first");
  TORCH_CHECK(logits.size(1) >= 1, op, ": argument 'logits' must have at least one column, got shape ",
              shape_of(logits));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(0), op, ": argument 'labels' must have shape [",
              std::to_string(logits.size(0)), "] (one label per row of logits), got ", shape_of(labels));
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": argument 'labels' must have dtype int64 or int32, got ", c10::toString(labels.scalar_type()));
  TORCH_CHECK(labels.is_contiguous(), op, ": argument 'labels' must be contiguous");
  TORCH_CHECK(labels.device() == logits.device(), op, ": argument 'labels' must be on ", logits.device().str(),
              " like 'logits', got ", labels.device().str());
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, op,
              ": argument 'inv_temperature' must be finite and > 0, got ", std::to_string(inv_temperature));
}

// A per-row float32 vector [C] on the logits' device.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == logits.size(0), op, ": argument '", name, "' must have shape [",
              std::to_string(logits.size(0)), "], got ", shape_of(t));
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": argument '", name, "' must have dtype float32, got ",
              c10::toString(t.scalar_type()));
  TORCH_CHECK(t.is_contiguous(), op, ": argument '", name, "' must be contiguous");
  TORCH_CHECK(t.device() == logits.device(), op, ": argument '", name, "' must be on ", logits.device().str(),
              " like 'logits', got ", t.device().str());
}

inline void check_grad_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                            const at::Tensor& mean_z, const at::Tensor& grad_logprob,
                            const at::Tensor& grad_entropy, double inv_temperature, at::ScalarType out_dtype) {
  check_logits_and_labels(kGradOp, logits, labels, inv_temperature);
  check_row_vector(kGradOp, "lse", lse, logits);
  check_row_vector(kGradOp, "mean_z", mean_z, logits);
  check_row_vector(kGradOp, "grad_logprob", grad_logprob, logits);
  check_row_vector(kGradOp, "grad_entropy", grad_entropy, logits);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf, kGradOp,
              ": argument 'out_dtype' must be float32, bfloat16 or float16, got ", c10::toString(out_dtype));
}

}  // namespace mgpt::rl

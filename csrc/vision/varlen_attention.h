// Argument checks shared by the kernels of mgpt::varlen_attention_fwd / mgpt::varlen_attention_bwd.
// The public Python wrapper checks the same things first; these are the second line of defence for
// anyone calling torch.ops.mgpt.* directly, so a bad call raises instead of reading out of bounds.
// Contract of both ops: mgpt_ops/vision/_contract.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "tensor_messages.h"

#include <cmath>
#include <optional>
#include <string>

namespace mgpt::vision {

using mgpt::shape_of;  // messages from strings only: see tensor_messages.h

inline constexpr const char* kFwdOp = "mgpt.varlen_attention_fwd";
inline constexpr const char* kBwdOp = "mgpt.varlen_attention_bwd";

// Head dims the kernels are written for (Qwen2.5-VL 80, Qwen3-VL 72, and the usual 64/96/128).
inline bool supported_head_dim(int64_t d) { return d == 64 || d == 72 || d == 80 || d == 96 || d == 128; }

// q: [N, H, D] fp32/bf16/fp16 with a contiguous last dimension (other strides free: views of qkv work).
inline void check_query(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.dim() == 3, op, ": argument 'q' must be 3-D [N, H, D], got shape ", shape_of(q));
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              op, ": argument 'q' must have dtype float32, bfloat16 or float16, got ",
              c10::toString(q.scalar_type()));
  TORCH_CHECK(supported_head_dim(q.size(2)), op, ": head dim (last dimension of 'q') must be one of 64, 72, 80, "
              "96, 128, got ", std::to_string(q.size(2)));
  TORCH_CHECK(q.stride(2) == 1, op, ": argument 'q' must have a contiguous last dimension (stride 1), got stride ",
              std::to_string(q.stride(2)));
}

// A token tensor that must match q in shape, dtype and device, with a contiguous last dimension.
inline void check_like_query(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": argument '", name, "' must have the shape of 'q' ", shape_of(q),
              ", got ", shape_of(t));
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": argument '", name, "' must have the dtype of 'q' (",
              c10::toString(q.scalar_type()), "), got ", c10::toString(t.scalar_type()));
  TORCH_CHECK(t.device() == q.device(), op, ": argument '", name, "' must be on ", q.device().str(),
              " like 'q', got ", t.device().str());
  TORCH_CHECK(t.stride(2) == 1, op, ": argument '", name, "' must have a contiguous last dimension (stride 1), "
              "got stride ", std::to_string(t.stride(2)));
}

// cu_seqlens: [S + 1] int32 contiguous on q's device. Its values are checked by each kernel (they live on
// the device).
inline void check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& q,
                             int64_t max_seqlen) {
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
              ": argument 'cu_seqlens' must be 1-D [S + 1] with S >= 0, got shape ", shape_of(cu_seqlens));
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": argument 'cu_seqlens' must have dtype int32, got ",
              c10::toString(cu_seqlens.scalar_type()));
  TORCH_CHECK(cu_seqlens.is_contiguous(), op, ": argument 'cu_seqlens' must be contiguous");
  TORCH_CHECK(cu_seqlens.device() == q.device(), op, ": argument 'cu_seqlens' must be on ", q.device().str(),
              " like 'q', got ", cu_seqlens.device().str());
  TORCH_CHECK(max_seqlen >= 0, op, ": argument 'max_seqlen' must be >= 0, got ", std::to_string(max_seqlen));
}

// cos, sin: both absent, or both [N, D] float32 with a contiguous last dimension on q's device.
inline void check_rotary(const char* op, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                         const at::Tensor& q) {
  TORCH_CHECK(cos.has_value() == sin.has_value(), op, ": arguments 'cos' and 'sin' must be given together or "
              "both be None");
  if (!cos.has_value()) return;
  const at::Tensor* tables[2] = {&*cos, &*sin};
  const char* names[2] = {"cos", "sin"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *tables[i];
    TORCH_CHECK(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(2), op, ": argument '", names[i],
                "' must have shape [N, D] = [", std::to_string(q.size(0)), ", ", std::to_string(q.size(2)),
                "], got ", shape_of(t));
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": argument '", names[i], "' must have dtype float32, got ",
                c10::toString(t.scalar_type()));
    TORCH_CHECK(t.device() == q.device(), op, ": argument '", names[i], "' must be on ", q.device().str(),
                " like 'q', got ", t.device().str());
    TORCH_CHECK(t.stride(1) == 1, op, ": argument '", names[i], "' must have a contiguous last dimension");
  }
}

inline void check_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale), op, ": argument 'scale' must be finite, got ", std::to_string(scale));
}

// Everything both ops share: q, k, v, cu_seqlens, max_seqlen, cos, sin, scale.
inline void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                 const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                                 double scale) {
  check_query(op, q);
  check_like_query(op, "k", k, q);
  check_like_query(op, "v", v, q);
  check_cu_seqlens(op, cu_seqlens, q, max_seqlen);
  check_rotary(op, cos, sin, q);
  check_scale(op, scale);
}

// lse: [H, N] float32 on q's device (any strides).
inline void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& q) {
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), op,
              ": argument 'lse' must have shape [H, N] = [", std::to_string(q.size(1)), ", ",
              std::to_string(q.size(0)), "], got ", shape_of(lse));
  TORCH_CHECK(lse.scalar_type() == at::kFloat, op, ": argument 'lse' must have dtype float32, got ",
              c10::toString(lse.scalar_type()));
  TORCH_CHECK(lse.device() == q.device(), op, ": argument 'lse' must be on ", q.device().str(), " like 'q', got ",
              lse.device().str());
}

}  // namespace mgpt::vision

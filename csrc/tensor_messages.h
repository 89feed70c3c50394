// Helpers for TORCH_CHECK messages shared by every kernel family.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace mgpt {

// Messages are built from strings only (std::to_string, Device::str, toString): in the CUDA build on the
// GPU machine (torch 2.11+cu130) streaming a number into TORCH_CHECK's message from this extension crashed
// once, while strings streamed fine (cause not established; see issue notes).
inline std::string shape_of(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

}  // namespace mgpt

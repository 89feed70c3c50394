// Shared by the CUTLASS GEMM faces (scaled_mm_sm90.cu, block_scaled_mm_sm90.cu): the headers a CUTLASS 3
// sm_90a GEMM is built from, the argument-device check, and the launch of a built GemmUniversalAdapter with
// its workspace on the current stream. Include only where the CUTLASS headers exist (inside
// `#if __has_include(<cutlass/cutlass.h>)`).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <optional>
#include <string>

#include "quant/quant_checks.h"

namespace mgpt::quant {

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& a) {
  TORCH_CHECK(t.device() == a.device(), op, ": argument '", name, "' must be on ", a.device().str(), ", got ",
              t.device().str());
}

// What both FP8 faces share: e4m3 operands, a [M, K] and b [N, K] both K-major (what wgmma wants), fp32
// accumulation, 128 x 128 x 128 tiles on 1 x 2 clusters, the cooperative epilogue. A face derives from it and adds
// its scales, its mainloop schedule and its epilogue tree.
struct Fp8GemmCommon {
  using ElementA = cutlass::float_e4m3_t;
  using ElementB = cutlass::float_e4m3_t;
  using ElementAcc = float;
  using LayoutA = cutlass::layout::RowMajor;     // a [M, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // B = b^T [K, N], i.e. b [N, K] row-major
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignAB = 16;  // fp8 elements per 16-byte TMA row unit
  using TileShape = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using ClusterShape = cute::Shape<cute::_1, cute::_2, cute::_1>;
  using EpilogueSchedule = cutlass::epilogue::TmaWarpSpecializedCooperative;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
};

// Packed (contiguous) strides of a [M, K], b [N, K] and out [M, N] in the layouts of a GemmUniversal ``Kernel``.
template <typename Kernel>
struct PackedStrides {
  typename Kernel::StrideA a;
  typename Kernel::StrideB b;
  typename Kernel::StrideD d;

  PackedStrides(int m, int n, int k)
      : a(cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, cute::make_shape(m, k, 1))),
        b(cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(n, k, 1))),
        d(cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(m, n, 1))) {}
};

// Run ``args`` on a's device and current stream; a problem CUTLASS cannot take (alignment, size) is an error
// naming the operands, never a launch.
template <typename Gemm>
void run_cutlass_gemm(const char* op, const typename Gemm::Arguments& args, const at::Tensor& a,
                      const at::Tensor& b) {
  Gemm gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, op,
              ": CUTLASS cannot run this problem (alignment or size): a ", shape_of(a), ", b ", shape_of(b));
  at::Tensor workspace = at::empty({static_cast<int64_t>(Gemm::get_workspace_size(args))},
                                   a.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.get_device()).stream();
  const cutlass::Status status = gemm.run(args, workspace.data_ptr(), stream);
  TORCH_CHECK(status == cutlass::Status::kSuccess, op, ": CUTLASS launch failed: ", cutlassGetStatusString(status));
}

// The common body of an FP8 GEMM face after its argument checks: out [M, N] in ``out_dtype`` on a's device,
// contiguous operands and scales, the bias in fp32 (a null pointer when absent), then
// ``Fp8Gemm<ElementD>::run(a, b, scale_a, scale_b, bias, out)`` for the output dtype.
template <template <typename> class Fp8Gemm>
at::Tensor launch_fp8_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                           const at::Tensor& scale_b, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t m = a.size(0), n = b.size(0);
  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  const at::Tensor a_c = a.contiguous(), b_c = b.contiguous();
  const at::Tensor sa = scale_a.contiguous(), sb = scale_b.contiguous();
  const std::optional<at::Tensor> bias_f =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat).contiguous()) : std::nullopt;
  const float* bias_p = bias_f ? bias_f->const_data_ptr<float>() : nullptr;
  if (out_dtype == at::kBFloat16) {
    Fp8Gemm<cutlass::bfloat16_t>::run(a_c, b_c, sa, sb, bias_p, out);
  } else if (out_dtype == at::kHalf) {
    Fp8Gemm<cutlass::half_t>::run(a_c, b_c, sa, sb, bias_p, out);
  } else {
    Fp8Gemm<float>::run(a_c, b_c, sa, sb, bias_p, out);
  }
  return out;
}

}  // namespace mgpt::quant

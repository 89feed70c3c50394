// CUDA kernel of mgpt::scaled_mm_kernel for Hopper (sm_90a): FP8 e4m3 GEMM with per-row or per-tensor
// dequantisation scales, built from CUTLASS 3 (TMA loads, warp-specialised wgmma mainloop, epilogue visitor tree).
// Contract: mgpt_ops/quant/scaled_gemm.py.
//
//   out[m, n] = cast_out( scale_a[m] * (scale_b[n] * acc[m, n]) + bias[n] ),   acc = sum_k a[m, k] b[n, k]
//
// a [M, K] row-major and b [N, K] row-major (= B^T column-major: both operands K-major, what wgmma wants).
// The mainloop is CUTLASS's FP8 warp-specialised cooperative kernel WITHOUT "fast accumulation": Hopper's FP8
// MMA accumulates with reduced precision, so the collective promotes the partial sums into fp32 registers
// every few K blocks -- the fp32 accumulation the contract promises. Scales are broadcast in the epilogue as
// a column vector (scale_a: one per row m) and a row vector (scale_b: one per column n); each is a runtime
// choice between vector and scalar (per-tensor) through CUTLASS's dynamic broadcast stride. Bias is converted
// to fp32 on the host; a null bias pointer broadcasts 0.
//
// NOT VERIFIED ON A GPU: this file is compiled for sm_90a in CI (MGPT_CUDA=compile-only) but has never run.
// For that reason the `cuda` face of mgpt.scaled_mm is not in the automatic preference: it runs only when
// pinned with mgpt_ops.use_backend("cuda"). It takes fp8 operands only: int8 runs on the triton face.
//
// TMA requires 16-byte aligned rows: K % 16 == 0 (fp8 rows) and N * sizeof(out) % 16 == 0, checked below.
//
// Without the CUTLASS headers (nvidia-cutlass not installed: CMakeLists.txt then adds no CUTLASS include path)
// this file compiles to nothing, the CUDA kernel is not registered, and the cuda face reports itself missing.
#if __has_include(<cutlass/cutlass.h>)
#include "quant/cutlass_gemm.h"

namespace mgpt::quant {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

constexpr const char* kOp = "mgpt.scaled_mm_kernel";

template <typename ElementD>
struct RowScaledFp8Gemm : Fp8GemmCommon {
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperative;

  // Epilogue visitor tree: scale_a[m] * (scale_b[n] * acc) + bias[n].
  using ScaleA = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, _0>>;
  using ScaleB = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, _0>>;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using TimesScaleB = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>, ScaleB,
                                      fusion::Sm90AccFetch>;
  using Output = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>,
                                 ScaleA, TimesScaleB, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule, Output>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, kAlignAB, ElementB, LayoutB, kAlignAB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static void run(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a, const at::Tensor& scale_b,
                  const float* bias, at::Tensor& out) {
    const int m = static_cast<int>(a.size(0)), n = static_cast<int>(b.size(0)), k = static_cast<int>(a.size(1));
    const PackedStrides<Kernel> strides(m, n, k);

    typename Output::Arguments epilogue_args{
        {scale_a.const_data_ptr<float>(), 0.0f, {scale_a.size(0) != 1, _0{}, _0{}}},  // ScaleA
        {{scale_b.const_data_ptr<float>(), 0.0f, {_0{}, scale_b.size(0) != 1, _0{}}}, {}, {}},  // TimesScaleB
        {bias, 0.0f, {}},                                                                       // Bias
        {}};                                                                                    // multiply-add
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(a.const_data_ptr()), strides.a, static_cast<const ElementB*>(b.const_data_ptr()),
         strides.b},
        {epilogue_args, nullptr, strides.d, static_cast<ElementD*>(out.data_ptr()), strides.d}};

    run_cutlass_gemm<Gemm>(kOp, args, a, b);
  }
};

at::Tensor scaled_mm_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                          const at::Tensor& scale_b, at::ScalarType out_dtype, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.is_cuda(), kOp, ": the CUDA kernel got argument 'a' on ", a.device().str());
  TORCH_CHECK(a.scalar_type() == at::kFloat8_e4m3fn && b.scalar_type() == at::kFloat8_e4m3fn, kOp,
              ": the CUDA kernel takes float8_e4m3fn operands only (int8 runs on the triton face), got a=",
              dtype_name(a.scalar_type()), ", b=", dtype_name(b.scalar_type()));
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && b.size(1) == a.size(1), kOp,
              ": arguments 'a' [M, K] and 'b' [N, K] must share K, got ", shape_of(a), " and ", shape_of(b));
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  check_same_device(kOp, "b", b, a);
  for (const auto& [name, s, rows] : {std::tuple{"scale_a", &scale_a, m}, std::tuple{"scale_b", &scale_b, n}}) {
    check_same_device(kOp, name, *s, a);
    check_dtype(kOp, name, *s, at::kFloat);
    TORCH_CHECK(s->dim() == 2 && s->size(1) == 1 && (s->size(0) == 1 || s->size(0) == rows), kOp, ": argument '",
                name, "' must have shape [1, 1] or [", std::to_string(rows), ", 1], got ", shape_of(*s));
  }
  check_out_dtype(kOp, out_dtype);
  const int64_t out_bytes = at::elementSize(out_dtype);
  TORCH_CHECK(k % 16 == 0 && (n * out_bytes) % 16 == 0, kOp, ": the CUDA kernel needs K % 16 == 0 and 16-byte "
              "aligned output rows, got K = ", std::to_string(k), ", N = ", std::to_string(n));
  if (bias.has_value()) check_same_device(kOp, "bias", *bias, a);

  return launch_fp8_gemm<RowScaledFp8Gemm>(a, b, scale_a, scale_b, out_dtype, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CUDA, m) { m.impl("scaled_mm_kernel", &scaled_mm_sm90); }

}  // namespace mgpt::quant

#endif  // __has_include(<cutlass/cutlass.h>)

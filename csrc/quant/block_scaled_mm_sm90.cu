// CUDA kernel of mgpt::block_scaled_mm_kernel for Hopper (sm_90a): the FP8 GEMM of Qwen's / DeepSeek-V3's
// block-quantized checkpoints, built from CUTLASS 3's blockwise-scaling mainloop. Contract:
// mgpt_ops/quant/block_gemm.py.
//
//   out[m, n] = cast_out( sum_kb scale_a[m, kb] scale_b[n / 128, kb] sum_{k in block kb} a[m, k] b[n, k] + bias[n] )
//
// a [M, K] and b [N, K] row-major (both K-major, what wgmma wants); scale_a [M, ceil(K/128)] (1 x 128 activation
// groups) and scale_b [ceil(N/128), ceil(K/128)] (128 x 128 weight blocks), both fp32 row-major -- CUTLASS's
// K-major scale layouts, so the tensors go in as they are (no transpose). The mainloop multiplies each 128-wide
// K block's wgmma partial sums by their scales in fp32 registers before adding them to the accumulator
// (DeepSeek-V3's promotion, the same arithmetic as the Triton face); the epilogue adds the bias and casts.
// Partial blocks need nothing special: TMA fills rows / columns past M, N, K with zeros, and the scale tensors
// already have ceil(./128) entries.
//
// NOT VERIFIED ON A GPU: compiled for sm_90a in CI (MGPT_CUDA=compile-only) but never run. For that reason the
// `cuda` face of mgpt.block_scaled_mm is not in the automatic preference: it runs only when pinned with
// mgpt_ops.use_backend("cuda"). TMA needs 16-byte aligned rows: K % 16 == 0 (fp8) and N * sizeof(out) % 16 == 0.
//
// Without the CUTLASS headers this file compiles to nothing and the CUDA kernel is not registered.
#if __has_include(<cutlass/cutlass.h>)
#include "quant/cutlass_gemm.h"
#include <cutlass/detail/blockwise_scale_layout.hpp>

namespace mgpt::quant {
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

constexpr const char* kOp = "mgpt.block_scaled_mm_kernel";
constexpr int kBlock = 128;  // the quantisation block: 1 x 128 activation groups, 128 x 128 weight blocks

template <typename ElementD>
struct BlockScaledFp8Gemm : Fp8GemmCommon {  // ElementAcc (fp32) is also the scales' type, as the mainloop needs
  static constexpr int kAlignD = 16 / sizeof(ElementD);
  static_assert(size<2>(TileShape{}) == kBlock, "one K step of the tile = one quantisation block");
  // scale_a: one scale per row and K block (granularity 1 x 128); scale_b: per 128 x 128 block. K-major both.
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock, cute::GMMA::Major::K,
                                                                cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using KernelSchedule = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8BlockScaledAccum;

  // Epilogue visitor tree: acc + bias[n] (a null bias pointer broadcasts 0), cast to ElementD.
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using Output = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, ElementD, float, kRound>, fusion::Sm90AccFetch,
                                 Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, LayoutD, kAlignD, ElementD, LayoutD,
      kAlignD, EpilogueSchedule, Output>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, cute::tuple<LayoutA, LayoutSFA>, kAlignAB,
      ElementB, cute::tuple<LayoutB, LayoutSFB>, kAlignAB, ElementAcc, TileShape, ClusterShape,
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
    // [M, ceil(K/128)] and [ceil(N/128), ceil(K/128)] row-major: exactly these K-major layouts
    const LayoutSFA layout_sfa = ScaleConfig::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
    const LayoutSFB layout_sfb = ScaleConfig::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));

    typename Output::Arguments epilogue_args{{}, {bias, 0.0f, {}}, {}};  // acc, bias, plus
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(a.const_data_ptr()), strides.a, static_cast<const ElementB*>(b.const_data_ptr()),
         strides.b, scale_a.const_data_ptr<float>(), layout_sfa, scale_b.const_data_ptr<float>(), layout_sfb},
        {epilogue_args, nullptr, strides.d, static_cast<ElementD*>(out.data_ptr()), strides.d}};

    run_cutlass_gemm<Gemm>(kOp, args, a, b);
  }
};

at::Tensor block_scaled_mm_sm90(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale_a,
                                const at::Tensor& scale_b, at::ScalarType out_dtype, int64_t block,
                                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.is_cuda(), kOp, ": the CUDA kernel got argument 'a' on ", a.device().str());
  TORCH_CHECK(block == kBlock, kOp, ": the CUDA kernel takes block=128 only, got ", std::to_string(block));
  check_dtype(kOp, "a", a, at::kFloat8_e4m3fn);
  check_dtype(kOp, "b", b, at::kFloat8_e4m3fn);
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && b.size(1) == a.size(1), kOp,
              ": arguments 'a' [M, K] and 'b' [N, K] must share K, got ", shape_of(a), " and ", shape_of(b));
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1);
  check_same_device(kOp, "b", b, a);
  check_same_device(kOp, "scale_a", scale_a, a);
  check_same_device(kOp, "scale_b", scale_b, a);
  check_dtype(kOp, "scale_a", scale_a, at::kFloat);
  check_dtype(kOp, "scale_b", scale_b, at::kFloat);
  check_shape2(kOp, "scale_a", scale_a, m, blocks_of(k, kBlock));
  check_shape2(kOp, "scale_b", scale_b, blocks_of(n, kBlock), blocks_of(k, kBlock));
  check_out_dtype(kOp, out_dtype);
  const int64_t out_bytes = at::elementSize(out_dtype);
  TORCH_CHECK(k % 16 == 0 && (n * out_bytes) % 16 == 0, kOp, ": the CUDA kernel needs K % 16 == 0 and 16-byte "
              "aligned output rows, got K = ", std::to_string(k), ", N = ", std::to_string(n));
  if (bias.has_value()) {
    check_same_device(kOp, "bias", *bias, a);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, kOp, ": argument 'bias' must have shape [",
                std::to_string(n), "], got ", shape_of(*bias));
  }

  return launch_fp8_gemm<BlockScaledFp8Gemm>(a, b, scale_a, scale_b, out_dtype, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgpt, CUDA, m) { m.impl("block_scaled_mm_kernel", &block_scaled_mm_sm90); }

}  // namespace mgpt::quant

#endif  // __has_include(<cutlass/cutlass.h>)

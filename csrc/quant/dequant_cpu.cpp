// Row decoders of the quantized formats into fp32 (declarations and contracts: dequant_cpu.h).
//
// They are written as plain loops over branch-free element formulas so GCC vectorises them; the functions are
// cloned for AVX-512, AVX2 and baseline x86-64 with a run-time pick, since the extension itself is built for
// baseline x86-64. fp8 is decoded with bit arithmetic rather than a 256-entry table: a table lookup per element
// becomes a gather (or stays scalar), while the formula is a few vector integer ops.
#include "quant/dequant_cpu.h"

#include <cmath>
#include <cstring>

// As in the other CPU kernels: without this GCC keeps the selects below as branches (it treats a speculated
// compare as a possible FP trap) and the loops stay scalar. Nothing here inspects FP exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

#include "cpu_simd.h"
#include "cpu_bits.h"

namespace mgpt::quant::cpu {
namespace {

using mgpt::cpu::bits_as;

// e4m3fn: sign bit, 4 exponent bits e (bias 7), 3 mantissa bits m; no infinities, 0x7F / 0xFF are NaN.
//   e >= 1: 2^(e - 7) (1 + m / 8)  = the fp32 whose exponent field is e + 120 and whose top mantissa bits are m
//   e == 0: m 2^-9 (subnormals and zero), computed from the integer m, so it is exact and never an fp32
//           denormal (a flush-to-zero mode could not change it)
[[gnu::always_inline]] inline float fp8_value(uint8_t byte) {
  const uint32_t magnitude = byte & 0x7Fu;
  const uint32_t sign = static_cast<uint32_t>(byte & 0x80u) << 24;
  const float normal = bits_as<float>((magnitude << 20) + (120u << 23));
  const float subnormal = static_cast<float>(magnitude) * 0x1p-9f;
  float value = magnitude < 8u ? subnormal : normal;
  value = magnitude == 0x7Fu ? NAN : value;
  return bits_as<float>(bits_as<uint32_t>(value) | sign);
}

}  // namespace

MGPT_SIMD_CLONES void decode_fp8(const uint8_t* q, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = fp8_value(q[i]);
}

MGPT_SIMD_CLONES void decode_fp8_blocks(const uint8_t* q, int64_t n, const float* scales, int64_t block,
                                        float* out) {
  for (int64_t start = 0, b = 0; start < n; start += block, ++b) {
    const int64_t len = n - start < block ? n - start : block;
    const float scale = scales[b];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) out[start + i] = fp8_value(q[start + i]) * scale;
  }
}

MGPT_SIMD_CLONES void decode_int8(const int8_t* q, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]);
}

MGPT_SIMD_CLONES void decode_int4(const int32_t* words, int64_t n, const float* scales, const float* zeros,
                                  int64_t group, float* out) {
  constexpr int kCodesPerWord = 8;
  const int64_t words_per_group = group / kCodesPerWord;
  for (int64_t g = 0; g < n / group; ++g) {
    const float scale = scales[g];
    const float zero = zeros == nullptr ? 8.0f : zeros[g];
    const int32_t* w = words + g * words_per_group;
    float* o = out + g * group;
    for (int64_t j = 0; j < words_per_group; ++j) {
      const uint32_t word = static_cast<uint32_t>(w[j]);
      // Eight independent lanes: the compiler turns them into one 8-wide shift / convert / multiply.
      for (int i = 0; i < kCodesPerWord; ++i) {
        const float code = static_cast<float>((word >> (4 * i)) & 0xFu);
        o[j * kCodesPerWord + i] = (code - zero) * scale;
      }
    }
  }
}

}  // namespace mgpt::quant::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// fp32 building blocks of the CPU kernels of mgpt::varlen_attention_fwd / _bwd (attention_cpu.cpp is the
// only includer): exp2, bf16/fp16 conversions, rows of token tensors (load, rotate, store, pack) and the two
// tile products. All are force-inlined into the per-head-dim task functions there, which are cloned per
// instruction set, so every clone gets its own vector code for them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_bits.h"

// GCC will not if-convert the selects in exp2_fast under the default -ftrapping-math (a speculated compare
// counts as a possible FP trap), leaving the softmax loops of the AVX2 and baseline clones scalar; we never
// read FP exception flags. GCC inlines only across equal optimisation settings, so attention_cpu.cpp uses the
// same pragma, and c10's fp16 conversions (compiled without it) would stay calls: hence our own below.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

#define MGPT_ALWAYS_INLINE [[gnu::always_inline]] inline

namespace mgpt::vision::cpu {

constexpr int kBlock = 64;     // query rows and key columns of one tile
constexpr int kRows = 4;       // rows of a register block
constexpr int kCols = 32;      // columns of a register block
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.69314718055994531f;
constexpr float kInf = std::numeric_limits<float>::infinity();

using mgpt::cpu::bits_as;

// 2^x in fp32, branch-free so loops calling it vectorise. x = n + f with n = round(x), |f| <= 1/2;
// 2^f = e^(f ln 2) by its Taylor series to degree 7 (truncation < 6e-9 relative), 2^n put in the exponent
// bits. Below -126 the value would be subnormal (< 1.2e-38, nothing beside a softmax sum >= 1): 0, which
// also covers -inf (masked or not-yet-seen scores). Above 127: +inf. NaN propagates.
MGPT_ALWAYS_INLINE float exp2_fast(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa
  float xc = x < -126.0f ? -126.0f : x;
  xc = xc > 127.0f ? 127.0f : xc;
  const float t = xc + kRound;
  const float n = t - kRound;
  const float f = xc - n;
  float p = 1.5252733804059838e-05f;
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428441e-03f;
  p = p * f + 9.6181291076284772e-03f;
  p = p * f + 5.5504108664821576e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.0f;
  const int32_t two_n = (bits_as<int32_t>(t) - bits_as<int32_t>(kRound) + 127) << 23;
  float result = p * bits_as<float>(two_n);
  result = x < -126.0f ? 0.0f : result;
  result = x > 127.0f ? kInf : result;
  return x != x ? x : result;
}

// Round-to-nearest-even fp32 -> bf16 bits (NaN -> quiet NaN), as torch's .to(bfloat16) does. Written on
// integer bits (integer selects vectorise under -ftrapping-math too), as are the fp16 conversions below.
MGPT_ALWAYS_INLINE uint16_t bf16_bits(float f) {
  const uint32_t bits = bits_as<uint32_t>(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// fp16 bits -> fp32, exact. Normals re-bias the exponent (15 -> 127: add 112 << 23); subnormals are
// m * 2^-24 with m the 10-bit mantissa (computed as an integer product, so no fp32 subnormal is involved and
// flush-denormal modes cannot zero them); inf / NaN keep an all-ones exponent.
MGPT_ALWAYS_INLINE float f16_value(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t magnitude = h & 0x7FFFu;
  const float subnormal = static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f;
  uint32_t bits = magnitude < 0x400u ? bits_as<uint32_t>(subnormal) : (magnitude << 13) + 0x38000000u;
  bits = magnitude >= 0x7C00u ? (magnitude << 13) | 0x7F800000u : bits;
  return bits_as<float>(bits | sign);
}

// Round-to-nearest-even fp32 -> fp16 bits, as torch's .to(float16) does: >= 65520 -> inf, NaN -> quiet NaN.
MGPT_ALWAYS_INLINE uint16_t f16_bits(float f) {
  const uint32_t bits = bits_as<uint32_t>(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  // Normal results: re-bias the exponent (127 -> 15) and round off 13 mantissa bits to nearest even.
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the result is m * 2^-24, m = rint(|f| 2^24) <= 1024 (1024 is the smallest normal's bits):
  // adding 1.5 * 2^23 makes the fp32 adder round |f| 2^24 to an integer held in the low mantissa bits.
  const float shifted = bits_as<float>(a) * 0x1p24f + 12582912.0f;
  const uint32_t subnormal = bits_as<uint32_t>(shifted) - 0x4B400000u;
  uint32_t h = a < 0x38800000u ? subnormal : normal;
  h = a >= 0x477FF000u ? 0x7C00u : h;
  h = a > 0x7F800000u ? 0x7E00u : h;
  return static_cast<uint16_t>(sign | h);
}

// ---------------------------------------------------------------------------------------------------------
// Rows of token tensors: conversion to and from fp32, rotation
// ---------------------------------------------------------------------------------------------------------

// A [N, H, D] tensor with a contiguous last dimension, addressed as rows (token, head).
struct TokenRows {
  const char* base;
  int64_t token_stride, head_stride, elem_size;  // strides in elements
  at::ScalarType type;

  explicit TokenRows(const at::Tensor& t)
      : base(static_cast<const char*>(t.const_data_ptr())), token_stride(t.stride(0)),
        head_stride(t.stride(1)), elem_size(t.element_size()), type(t.scalar_type()) {}
  const void* row(int64_t token, int64_t head) const {
    return base + (token * token_stride + head * head_stride) * elem_size;
  }
};

// Rows of one head are H * D elements apart, so consecutive rows of a task sit on different pages and the
// hardware prefetcher does not follow them; asking for a row a few tokens ahead hides most of the latency.
constexpr int kPrefetchAhead = 4;

template <int D>
MGPT_ALWAYS_INLINE void prefetch_row(const TokenRows& t, int64_t token, int64_t head) {
#if defined(__GNUC__)
  const char* p = static_cast<const char*>(t.row(token, head));
  for (int64_t b = 0; b < D * t.elem_size; b += 64) __builtin_prefetch(p + b);
#endif
}

template <int D>
MGPT_ALWAYS_INLINE void load_row(const void* src, at::ScalarType type, float* dst) {
  if (type == at::kFloat) {
    std::memcpy(dst, src, D * sizeof(float));
  } else if (type == at::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int d = 0; d < D; ++d) dst[d] = bits_as<float>(uint32_t{s[d]} << 16);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int d = 0; d < D; ++d) dst[d] = f16_value(s[d]);
  }
}

// dst = src * mult, rounded once to `type`.
template <int D>
MGPT_ALWAYS_INLINE void store_row(const float* src, float mult, at::ScalarType type, void* dst) {
  if (type == at::kFloat) {
    float* o = static_cast<float*>(dst);
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] = src[d] * mult;
  } else if (type == at::kBFloat16) {
    uint16_t* o = static_cast<uint16_t*>(dst);
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] = bf16_bits(src[d] * mult);
  } else {
    uint16_t* o = static_cast<uint16_t*>(dst);
#pragma omp simd
    for (int d = 0; d < D; ++d) o[d] = f16_bits(src[d] * mult);
  }
}

// The rotary tables (cos, sin [N, D] fp32, rows possibly strided); `cos == nullptr` means no RoPE.
struct Rotary {
  const float* cos = nullptr;
  const float* sin = nullptr;
  int64_t cos_stride = 0, sin_stride = 0;
};

// out = (x cos + rotate_half(x) sin) * mult with rotate_half(x) = (-x[D/2:], x[:D/2]); x * mult without RoPE.
template <int D>
MGPT_ALWAYS_INLINE void rotate_row(const float* x, const Rotary& rot, int64_t token, float mult, float* out) {
  constexpr int kHalf = D / 2;
  if (rot.cos == nullptr) {
#pragma omp simd
    for (int d = 0; d < D; ++d) out[d] = x[d] * mult;
    return;
  }
  const float* c = rot.cos + token * rot.cos_stride;
  const float* s = rot.sin + token * rot.sin_stride;
#pragma omp simd
  for (int d = 0; d < kHalf; ++d) {
    out[d] = (x[d] * c[d] - x[d + kHalf] * s[d]) * mult;
    out[d + kHalf] = (x[d + kHalf] * c[d + kHalf] + x[d] * s[d + kHalf]) * mult;
  }
}

// The rotation's transpose, in place: g = g cos + rotate_half^T(g sin), rotate_half^T(y) = (y[D/2:], -y[:D/2]).
template <int D>
MGPT_ALWAYS_INLINE void unrotate_row(float* g, const Rotary& rot, int64_t token) {
  constexpr int kHalf = D / 2;
  if (rot.cos == nullptr) return;
  const float* c = rot.cos + token * rot.cos_stride;
  const float* s = rot.sin + token * rot.sin_stride;
#pragma omp simd
  for (int d = 0; d < kHalf; ++d) {
    const float lo = g[d], hi = g[d + kHalf];
    g[d] = lo * c[d] + hi * s[d + kHalf];
    g[d + kHalf] = hi * c[d + kHalf] - lo * s[d];
  }
}

// Loads the fp32 row of (token, head) of `src`, rotated and scaled, into `out` (`tmp`: D floats).
template <int D>
MGPT_ALWAYS_INLINE void load_rotated_row(const TokenRows& src, int64_t token, int64_t head, const Rotary& rot,
                                         float mult, float* tmp, float* out) {
  load_row<D>(src.row(token, head), src.type, tmp);
  rotate_row<D>(tmp, rot, token, mult, out);
}

// Row j of a sequence into a packed transposed store: key block j / 64 is a [D][64] panel, so the score
// kernel reads 64 consecutive floats per d.
template <int D>
MGPT_ALWAYS_INLINE void pack_transposed(const float* row, int64_t j, float* panels) {
  float* panel = panels + (j / kBlock) * D * kBlock + j % kBlock;
  for (int d = 0; d < D; ++d) panel[d * kBlock] = row[d];
}

// Zero the columns of the last panel past the sequence, so the score kernel never reads garbage.
template <int D>
MGPT_ALWAYS_INLINE void zero_panel_tail(int64_t len, float* panels) {
  for (int64_t j = len; j % kBlock != 0; ++j) {
    float* panel = panels + (j / kBlock) * D * kBlock + j % kBlock;
    for (int d = 0; d < D; ++d) panel[d * kBlock] = 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tile products (fp32)
// ---------------------------------------------------------------------------------------------------------

// C[r][j0 + j] = sum_d A[r][d] panel[d][j0 + j] for r < R, j < 32. A: rows of D floats; panel: [D][64].
template <int D, int R>
MGPT_ALWAYS_INLINE void product_with_panel_block(const float* a, const float* panel, int j0, float* c) {
  float acc[R][kCols] = {};
  for (int d = 0; d < D; ++d) {
    const float* p = panel + d * kBlock + j0;
    for (int r = 0; r < R; ++r) {
      const float ar = a[r * D + d];
#pragma omp simd
      for (int j = 0; j < kCols; ++j) acc[r][j] += ar * p[j];
    }
  }
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int j = 0; j < kCols; ++j) c[r * kBlock + j0 + j] = acc[r][j];
  }
}

// C [rows][64] = A [rows][D] x panel [D][64], columns computed up to `cols` rounded up to 32.
template <int D>
MGPT_ALWAYS_INLINE void product_with_panel(const float* a, int rows, const float* panel, int cols, float* c) {
  for (int j0 = 0; j0 < cols; j0 += kCols) {
    int r = 0;
    for (; r + kRows <= rows; r += kRows) product_with_panel_block<D, kRows>(a + r * D, panel, j0, c + r * kBlock);
    for (; r < rows; ++r) product_with_panel_block<D, 1>(a + r * D, panel, j0, c + r * kBlock);
  }
}

// C[r][c0 + c] += sum_{j < depth} P[r][j] B[j][c0 + c] for r < R, c < W. B: rows of D floats.
template <int D, int R, int W>
MGPT_ALWAYS_INLINE void accumulate_block(const float* p, int ldp, const float* b, int depth, int c0, float* c) {
  float acc[R][W];
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int x = 0; x < W; ++x) acc[r][x] = c[r * D + c0 + x];
  }
  for (int j = 0; j < depth; ++j) {
    const float* bj = b + j * D + c0;
    for (int r = 0; r < R; ++r) {
      const float pr = p[r * ldp + j];
#pragma omp simd
      for (int x = 0; x < W; ++x) acc[r][x] += pr * bj[x];
    }
  }
  for (int r = 0; r < R; ++r) {
#pragma omp simd
    for (int x = 0; x < W; ++x) c[r * D + c0 + x] = acc[r][x];
  }
}

// Columns [C0, D) in chunks of 32 (D = 72 -> 32, 32, 8), each chunk's width a compile-time constant.
template <int D, int R, int C0 = 0>
MGPT_ALWAYS_INLINE void accumulate_rows(const float* p, int ldp, const float* b, int depth, float* c) {
  if constexpr (C0 < D) {
    constexpr int kWidth = D - C0 < kCols ? D - C0 : kCols;
    accumulate_block<D, R, kWidth>(p, ldp, b, depth, C0, c);
    accumulate_rows<D, R, C0 + kWidth>(p, ldp, b, depth, c);
  }
}

// C [rows][D] += P [rows][depth] (row stride ldp) x B [depth][D].
template <int D>
MGPT_ALWAYS_INLINE void accumulate_product(const float* p, int ldp, int rows, const float* b, int depth, float* c) {
  int r = 0;
  for (; r + kRows <= rows; r += kRows) accumulate_rows<D, kRows>(p + r * ldp, ldp, b, depth, c + r * D);
  for (; r < rows; ++r) accumulate_rows<D, 1>(p + r * ldp, ldp, b, depth, c + r * D);
}

// dst [cols][64] = src [rows][64] transposed (the top-left rows x cols corner).
MGPT_ALWAYS_INLINE void transpose_tile(const float* src, int rows, int cols, float* dst) {
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) dst[j * kBlock + r] = src[r * kBlock + j];
}

}  // namespace mgpt::vision::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// Row decoders of the quantized formats into fp32, for the CPU quantized GEMMs (dequant_cpu.cpp).
// Each writes n fp32 values; the loops are vectorised (AVX-512 / AVX2 clones picked at run time).
#pragma once

#include <cstdint>

namespace mgpt::quant::cpu {

// float8_e4m3fn bytes -> their exact fp32 values (every fp8 value is representable in fp32).
void decode_fp8(const uint8_t* q, int64_t n, float* out);

// float8_e4m3fn bytes times one fp32 scale per run of `block` elements: out[k] = value(q[k]) * scales[k / block].
void decode_fp8_blocks(const uint8_t* q, int64_t n, const float* scales, int64_t block, float* out);

// int8 -> fp32 (exact).
void decode_int8(const int8_t* q, int64_t n, float* out);

// One row of the int4 format of mgpt_ops/quant/w4a16.py: code k is bits [4 (k % 8), 4 (k % 8) + 4) of words[k / 8];
// out[k] = (code - zero) * scale of group k / group (zeros == nullptr: symmetric, zero = 8). n % group == 0 and
// group % 8 == 0.
void decode_int4(const int32_t* words, int64_t n, const float* scales, const float* zeros, int64_t group,
                 float* out);

}  // namespace mgpt::quant::cpu

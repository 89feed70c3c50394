// MGPT_SIMD_CLONES: build a CPU function for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline, picked at run
// time, so one wheel is fast on every x86 machine. Other compilers / architectures get the plain function.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MGPT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MGPT_SIMD_CLONES
#endif

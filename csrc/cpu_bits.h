// bits_as<To>(value): the bits of a value reinterpreted as another type of the same size, for the CPU kernels
// that build floats from their exponent and mantissa fields (exp2/exp polynomials, fp8 and 16-bit decoders).
//
// memcpy, not std::bit_cast: GCC inlines only across equal optimisation settings, and those kernels are
// compiled under "no-trapping-math" (it lets GCC if-convert their selects so the loops vectorise). So is this
// definition, whichever file includes it first: a call in every hot loop otherwise.
#pragma once

#include <cstring>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace mgpt::cpu {

template <typename To, typename From>
[[gnu::always_inline]] inline To bits_as(From value) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &value, sizeof(To));
  return out;
}

}  // namespace mgpt::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

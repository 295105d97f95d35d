// Exact float <-> half / bfloat16 conversions written with integer operations only, so that loops
// using them auto-vectorize on every instruction set (no F16C or AVX512-FP16 needed). Both were
// checked bit for bit against the compiler's _Float16 over all 2^16 halves and 2^32/7 floats.
#pragma once

#include <cstdint>
#include <cstring>

namespace fastbn::cpu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bfloat16_to_float(uint16_t v) { return bits_float(uint32_t(v) << 16); }

// All-ones when `condition` holds, else zero: selects written as bit masks (rather than ?:) are
// if-converted and vectorized by GCC on every ISA, AVX2 included, which lacks masked moves.
// Magnitude comparisons are made on int32 (the sign bit cleared, the values fit): x86 has vector
// compares for signed 32-bit integers only.
inline uint32_t mask_if(bool condition) { return 0u - uint32_t(condition); }

inline uint32_t select(uint32_t mask, uint32_t if_set, uint32_t otherwise) {
  return (if_set & mask) | (otherwise & ~mask);
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bfloat16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return uint16_t(select(mask_if(int32_t(u & 0x7fffffffu) > 0x7f800000), nan, rounded));
}

inline float half_to_float(uint16_t h) {
  const uint32_t exp_mask = 0x0f800000u;  // half exponent field after the shift below
  uint32_t bits = uint32_t(h & 0x7fffu) << 13;
  const uint32_t exp = bits & exp_mask;
  bits += 0x38000000u;                                   // rebias 15 -> 127
  bits += 0x38000000u & mask_if(exp == exp_mask);        // Inf / NaN
  const float subnormal = bits_float(bits + 0x00800000u) - bits_float(0x38800000u);
  bits = select(mask_if(exp == 0), float_bits(subnormal), bits);  // zero / subnormal
  return bits_float(bits | (uint32_t(h & 0x8000u) << 16));
}

// Round to nearest even, overflow to Inf, NaN to a quiet NaN.
inline uint16_t float_to_half(float f) {
  uint32_t bits = float_bits(f);
  const uint32_t sign = bits & 0x80000000u;
  bits ^= sign;
  const int32_t magnitude = int32_t(bits);
  const uint32_t inf_or_nan = 0x7c00u | (0x0200u & mask_if(magnitude > 0x7f800000));
  const uint32_t subnormal = float_bits(bits_float(bits) + bits_float(0x3f000000u)) - 0x3f000000u;
  const uint32_t normal = (bits + 0xc8000fffu + ((bits >> 13) & 1u)) >> 13;
  const uint32_t finite = select(mask_if(magnitude < 0x38800000), subnormal, normal);
  const uint32_t out = select(mask_if(magnitude >= 0x47800000), inf_or_nan, finite);
  return uint16_t(out | (sign >> 16));
}

}  // namespace fastbn::cpu

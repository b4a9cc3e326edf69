// Scalar float helpers without branches or libm calls, so that GCC/Clang auto-vectorise the
// loops that call them at any ISA (the extension is built for the baseline ISA; target_kernels.cpp
// adds AVX2/AVX-512 clones). Accuracy is about 1 ulp (Cephes single-precision polynomials).
#pragma once

#include <cstdint>
#include <cstring>

// Helpers called from the ISA clones must be inlined into them to be compiled for that ISA.
#if defined(__GNUC__)
#define ADVENT_INLINE inline __attribute__((always_inline))
#else
#define ADVENT_INLINE inline
#endif

namespace advent_fast {

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

ADVENT_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Shifted logits y = x - max are clamped to this before exp: exp_nonpositive returns exactly 0
// at and just above it, and log p = y - log(sum) stays finite for a masked (-inf) class, so
// p * log p = 0 * finite = 0 there without a branch.
constexpr float kMinShiftedLogit = -88.0f;

// exp(y) for y in [kMinShiftedLogit, 0] or NaN (NaN stays NaN); 0 for y < -87.68 (under
// FLT_MIN / 2). y = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two parts, Cody-Waite),
// exp(y) = 2^n exp(r) with exp(r) from the Cephes polynomial.
ADVENT_INLINE float exp_nonpositive(float y) {
  // 1.5 * 2^23: adding it rounds to an integer and leaves n in the low mantissa bits.
  constexpr float kRoundMagic = 12582912.0f;
  const float rounded = y * 1.44269504088896341f + kRoundMagic;
  const float n = rounded - kRoundMagic;
  float r = y - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float exp_r = poly * (r * r) + r + 1.0f;
  // 2^n from its exponent field n + 127: n in [-127, 0], and n = -127 gives the field 0, i.e. +0.
  const uint32_t n_bits = float_to_bits(rounded) - float_to_bits(kRoundMagic);
  return exp_r * bits_to_float((n_bits + 127u) << 23);
}

// log(x) for a positive normal x or NaN (a softmax denominator, in [1, C]).
// x = m 2^e with m in [sqrt(1/2), sqrt(2)), log x = log(m) + e ln2, log(m) by a polynomial in
// m - 1.
ADVENT_INLINE float log_positive(float x) {
  const uint32_t bits = float_to_bits(x);
  float exponent = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const bool below_sqrt_half = m < 0.707106781186547524f;
  exponent = below_sqrt_half ? exponent - 1.0f : exponent;
  m = below_sqrt_half ? m + m - 1.0f : m - 1.0f;
  const float m2 = m * m;
  float poly = 7.0376836292e-2f;
  poly = poly * m - 1.1514610310e-1f;
  poly = poly * m + 1.1676998740e-1f;
  poly = poly * m - 1.2420140846e-1f;
  poly = poly * m + 1.4249322787e-1f;
  poly = poly * m - 1.6668057665e-1f;
  poly = poly * m + 2.0000714765e-1f;
  poly = poly * m - 2.4999993993e-1f;
  poly = poly * m + 3.3333331174e-1f;
  float result = poly * m * m2;
  result = result + exponent * -2.12194440e-4f;
  result = result - 0.5f * m2;
  result = m + result;
  result = result + exponent * 0.693359375f;
  return x != x ? x : result;
}

// IEEE binary16 <-> float, bit-exact with c10::Half (round to nearest even), branch-free.
ADVENT_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
  // Normal numbers: move the fields into place, then rescale the exponent bias 15 -> 127.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: the mantissa as the low bits of 0.5's mantissa, minus 0.5.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized)
                                                : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

inline uint16_t float_to_half_bits(float f) {
  // Scaling by 2^112 then 2^-110 makes the FPU round the mantissa to 10 bits (and overflow to inf).
  const uint32_t w = float_to_bits(f);
  const float magnitude = bits_to_float(w & 0x7FFFFFFFu);
  float base = (magnitude * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// bfloat16 <-> float, bit-exact with c10::BFloat16 (round to nearest even, NaN -> 0x7FC0).
ADVENT_INLINE float bf16_bits_to_float(uint16_t b) {
  return bits_to_float(static_cast<uint32_t>(b) << 16);
}

inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

}  // namespace advent_fast

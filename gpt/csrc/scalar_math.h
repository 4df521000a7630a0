// Element conversions and exp for sol's CPU kernels, written so that GCC vectorises the
// loops that call them (c10's conversion operators and std::exp are calls it does not
// always inline inside a simd loop). Shared by gpt/csrc/fused_ops.cpp and the engine's
// paged attention kernel.

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sol {

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// bf16 is the top half of a float32: a shift.
template <>
inline float to_float(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// float -> T with PyTorch's rounding (to nearest, ties to even; NaN stays NaN), so a
// fused kernel rounds its intermediates exactly where the unfused ops did.
template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }

template <>
inline c10::BFloat16 from_float(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  return out;
}

// exp(x) for x <= 0: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and a degree-6
// polynomial (relative error ~2e-7, below float32's own rounding at this scale).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);                     // below this, exp underflows to 0 anyway
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// x * sigmoid(x) from exp of a non-positive argument only (no overflow for any x).
inline float silu(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  const float sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  return x * sigmoid;
}

}  // namespace sol

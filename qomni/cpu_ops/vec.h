// Vectors of 16 fp32 lanes for qomni's CPU kernels (weight_stream.cpp, layer_ops.cpp).
//
// GCC vector extensions, compiled with -march=native: one zmm per vector with AVX-512, two ymm
// with AVX2. bf16 values are held in fp32 lanes; `rnd_v` / `rnd` round them as c10::BFloat16
// does, so a kernel can reproduce a bf16 reference's rounding after each operation.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qomni::vec {

constexpr int64_t L = 16;  // lanes of one vector

using f32v = float __attribute__((vector_size(4 * L)));
using u16v = uint16_t __attribute__((vector_size(2 * L)));
using u32v = uint32_t __attribute__((vector_size(4 * L)));
using i32v = int32_t __attribute__((vector_size(4 * L)));

inline f32v load(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32v load(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  u16v h;
  std::memcpy(&h, p, sizeof h);
  u32v w = __builtin_convertvector(h, u32v) << 16;
  f32v v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

using f32v8 = float __attribute__((vector_size(32)));
using f32v4 = float __attribute__((vector_size(16)));

inline float hsum(f32v v) {  // a tree of halves: a serial sum of 16 lanes costs 16 latencies
  f32v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  f32v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

inline f32v bits_to_f32(u32v b) {
  f32v v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

inline u32v f32_to_bits(f32v v) {
  u32v b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// Rounded to bf16, to nearest even, kept in fp32 (as c10::BFloat16 rounds; NaN stays NaN).
template <typename W>
inline f32v rnd_v(f32v v) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    const u32v b = f32_to_bits(v);
    return bits_to_f32((b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u);
  }
  return v;
}

template <typename W>
inline void store(W* p, f32v v) {  // v already rounded to W
  if constexpr (std::is_same_v<W, c10::BFloat16>) {
    const u16v h = __builtin_convertvector(f32_to_bits(v) >> 16, u16v);
    std::memcpy(p, &h, sizeof h);
  } else {
    std::memcpy(p, &v, sizeof v);
  }
}

// v rounded to W's precision (bf16: to nearest even), kept in fp32.
template <typename W>
inline float rnd(float v) {
  if constexpr (std::is_same_v<W, c10::BFloat16>) return static_cast<float>(c10::BFloat16(v));
  return v;
}

// e^x in fp32, within 2 ulp (a degree-5 polynomial on [-ln2/2, ln2/2], scaled by 2^n).
inline f32v exp_v(f32v x) {
  const f32v lo = x < -87.3f ? f32v{} - 87.3f : x;
  x = lo > 88.7f ? f32v{} + 88.7f : lo;
  const f32v shift = f32v{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const f32v n = (x * 1.44269504f + shift) - shift;
  const f32v r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  f32v p = f32v{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  using i32v = int32_t __attribute__((vector_size(4 * L)));
  const i32v e = __builtin_convertvector(n, i32v) << 23;
  return bits_to_f32(f32_to_bits(p) + (u32v)e);
}

}  // namespace qomni::vec

// The x86-64 baseline level's vector type (SSE2: every x86-64 CPU has it), used in place
// of ATen's generic Vectorized<float> there: that one is a plain array whose operations,
// once inlined into the kernels' loops, GCC left scalar and spilled (the baseline fused
// step ran 4-12x torch's). GCC vector extensions of 4 floats, one SSE register (8 floats
// made GCC lower the selects lane by lane, with branches). Only what the kernels use (simd.h's Vec interface); bf16 / fp16 convert
// per element through c10 (no baseline instructions for them).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "level.h"

PARQ_CPU_BEGIN

struct VecSse2 {
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  F v;

  static constexpr int64_t size() { return 4; }
  VecSse2() : v{} {}
  VecSse2(float x) : v{x, x, x, x} {}  // NOLINT: broadcast, as Vectorized's
  explicit VecSse2(F f) : v(f) {}
  static VecSse2 loadu(const void* p) {
    VecSse2 r;
    std::memcpy(&r.v, p, sizeof(F));
    return r;
  }
  void store(void* p) const { std::memcpy(p, &v, sizeof(F)); }
  VecSse2 abs() const { return VecSse2(reinterpret_cast<F>(reinterpret_cast<I>(v) & 0x7fffffff)); }
  VecSse2 sqrt() const {
    F r;
    for (int i = 0; i < 4; ++i) r[i] = __builtin_sqrtf(v[i]);
    return VecSse2(r);
  }
};

inline VecSse2 operator+(VecSse2 a, VecSse2 b) { return VecSse2(a.v + b.v); }
inline VecSse2 operator-(VecSse2 a, VecSse2 b) { return VecSse2(a.v - b.v); }
inline VecSse2 operator*(VecSse2 a, VecSse2 b) { return VecSse2(a.v * b.v); }
inline VecSse2 operator/(VecSse2 a, VecSse2 b) { return VecSse2(a.v / b.v); }
#define PARQ_SSE2_BITWISE(OP)                                                            \
  inline VecSse2 operator OP(VecSse2 a, VecSse2 b) {                                     \
    return VecSse2(reinterpret_cast<VecSse2::F>(reinterpret_cast<VecSse2::I>(a.v)       \
                                                    OP reinterpret_cast<VecSse2::I>(b.v))); \
  }
PARQ_SSE2_BITWISE(&)
PARQ_SSE2_BITWISE(|)
PARQ_SSE2_BITWISE(^)
#undef PARQ_SSE2_BITWISE

// 8 bf16 / fp16 values (two VecSse2 of floats), converted per element by c10.
template <typename T>
struct Packed16 {
  T vals[8];
  void store(T* p) const { std::memcpy(p, vals, sizeof(vals)); }
};

template <typename T>
inline void sse2_to_float(const T* p, VecSse2& a, VecSse2& b) {
  for (int i = 0; i < 4; ++i) {
    a.v[i] = static_cast<float>(p[i]);
    b.v[i] = static_cast<float>(p[i + 4]);
  }
}

template <typename T>
inline Packed16<T> sse2_from_float(VecSse2 a, VecSse2 b) {
  Packed16<T> out;
  for (int i = 0; i < 4; ++i) {
    out.vals[i] = static_cast<T>(a.v[i]);
    out.vals[i + 4] = static_cast<T>(b.v[i]);
  }
  return out;
}

PARQ_CPU_END

// The vector layer of the CPU kernels: ATen's at::vec::Vectorized<float> (one source for
// every level: 8 lanes with AVX2, 16 with AVX-512, NEON's or a plain array's elsewhere),
// plus the few things it does not give in the form the kernels need, each a small
// per-level helper: lane masks (AVX-512 keeps them in mask registers), selects and
// max / min with C's `a > b ? a : b` semantics (ATen's maximum propagates NaN), streaming
// stores, the store fence. No FMA anywhere: every multiply and add rounds as in the
// scalar code (setup.py also builds with -ffp-contract=off), so every level gives the
// same bits as the scalar forms in levels.h, base_update.h and project_levels.h.
//
// Needs torch >= 2.4 (at::vec::convert_to_float / convert_from_float for BFloat16 and
// Half; setup.py's floor).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include "level.h"

#if defined(CPU_CAPABILITY_DEFAULT) && (defined(__x86_64__) || defined(_M_X64))
#define PARQ_VEC_SSE2 1
#include "vec_sse2.h"
#endif

PARQ_CPU_BEGIN

#ifdef PARQ_VEC_SSE2
using Vec = VecSse2;  // x86-64 baseline (vec_sse2.h)
#else
using Vec = at::vec::Vectorized<float>;  // AVX2, AVX-512; NEON on aarch64
#endif
constexpr int64_t kW = Vec::size();  // float lanes of this level

inline Vec bc(float v) { return Vec(v); }

// --- lane masks: lt / gt / eq, and, select(m, no, yes) -------------------------------
#if defined(CPU_CAPABILITY_AVX512)
using Mask = __mmask16;
inline Mask lt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline Mask gt(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline Mask ge(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline Mask unordered(Vec a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
inline Mask mask_and(Mask a, Mask b) { return a & b; }
inline Mask mask_or(Mask a, Mask b) { return a | b; }
inline Mask all_lanes() { return static_cast<Mask>(0xFFFF); }
inline bool all_set(Mask m) { return m == all_lanes(); }
inline Vec select(Mask m, Vec no, Vec yes) { return _mm512_mask_blend_ps(m, no, yes); }
#elif defined(CPU_CAPABILITY_AVX2)
using Mask = __m256;  // all-ones lanes are true
inline Mask lt(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline Mask gt(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline Mask ge(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
inline Mask eq(Vec a, Vec b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline Mask unordered(Vec a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
inline Mask mask_and(Mask a, Mask b) { return _mm256_and_ps(a, b); }
inline Mask mask_or(Mask a, Mask b) { return _mm256_or_ps(a, b); }
inline Mask all_lanes() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
inline bool all_set(Mask m) { return _mm256_movemask_ps(m) == 0xFF; }
inline Vec select(Mask m, Vec no, Vec yes) { return _mm256_blendv_ps(no, yes, m); }
#else
// The baseline level: GCC vector extensions as wide as ATen's Vec (SSE2 on x86-64, NEON on
// aarch64): ATen's generic comparisons and blendv branch per lane.
typedef float VecF __attribute__((vector_size(sizeof(Vec))));
typedef int32_t VecI __attribute__((vector_size(sizeof(Vec))));
using Mask = VecI;  // -1 lanes are true
inline VecF raw(Vec v) {
  VecF r;
  std::memcpy(&r, &v, sizeof r);
  return r;
}
inline Vec wrap(VecF r) {
  static_assert(sizeof(Vec) == sizeof(VecF));
  Vec v;
  std::memcpy(static_cast<void*>(&v), &r, sizeof r);  // (Vec has a constructor: -Wclass-memaccess)
  return v;
}
inline Mask lt(Vec a, Vec b) { return raw(a) < raw(b); }
inline Mask gt(Vec a, Vec b) { return raw(a) > raw(b); }
inline Mask ge(Vec a, Vec b) { return raw(a) >= raw(b); }
inline Mask eq(Vec a, Vec b) { return raw(a) == raw(b); }
inline Mask unordered(Vec a) { return raw(a) != raw(a); }
inline Mask mask_and(Mask a, Mask b) { return a & b; }
inline Mask mask_or(Mask a, Mask b) { return a | b; }
inline Mask all_lanes() { return Mask{} == Mask{}; }
inline bool all_set(Mask m) {
  int32_t all = -1;
  for (int64_t i = 0; i < kW; ++i) all &= m[i];  // (4 lanes on x86-64, NEON's on aarch64)
  return all == -1;
}
inline Vec select(Mask m, Vec no, Vec yes) { return wrap(m ? raw(yes) : raw(no)); }
#endif

// a > b ? a : b and a < b ? a : b (b when unordered): x86's maxps / minps exactly.
#if defined(CPU_CAPABILITY_AVX512)
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
#elif defined(CPU_CAPABILITY_AVX2)
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
#else  // a > b ? a : b lane by lane
inline Vec vmax(Vec a, Vec b) { return select(gt(a, b), b, a); }
inline Vec vmin(Vec a, Vec b) { return select(lt(a, b), b, a); }
#endif
inline Vec vclamp(Vec v, Vec lo, Vec hi) { return vmin(vmax(v, lo), hi); }  // clampf

inline Vec vneg(Vec v) { return v ^ Vec(-0.0f); }  // -v (flips the sign bit, as C's -v)

// finite(v): v - v == 0 (NaN for NaN and +-Inf), as sources.h's scalar finite().
inline Mask finite_mask(Vec v) { return eq(v - v, Vec(0.0f)); }

// rne (levels.h) on a vector: the same float operations, so the same value everywhere.
inline Vec vrne(Vec v) {
  const Vec two23(8388608.0f);
  const Vec a = v.abs();
  const Vec r = (a + two23) - two23;
  const Vec sign = v & Vec(-0.0f);
  return select(lt(a, two23), v, r | sign);  // copysign(r, v); |v| >= 2^23 or NaN: v
}

// --- memory: prefetch, streaming stores -----------------------------------------------
// Software prefetch kPrefetch elements (2 KB of float32) ahead: the loops do enough
// arithmetic per line that the hardware prefetcher alone leaves their loads waiting. A
// prefetch past the end of a buffer never faults. (Plain calls: GCC 12 dropped prefetches
// made in a lambda.)
constexpr int64_t kPrefetch = 512;
inline __attribute__((always_inline)) void prefetch(const void* p) {
  __builtin_prefetch(p, 0, 3);
}

// Streaming stores (written, never read: no read of the line first) need this alignment
// of the destination; 0: this level stores normally.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kStreamAlign = 64;
inline void stream_raw(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
inline void stream_raw(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
inline void stream_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kStreamAlign = 32;
inline void stream_raw(void* p, __m256 v) { _mm256_stream_ps(static_cast<float*>(p), v); }
inline void stream_raw(void* p, __m256i v) {
  _mm256_stream_si256(static_cast<__m256i*>(p), v);
}
inline void stream_fence() { _mm_sfence(); }
#else
constexpr int64_t kStreamAlign = 0;
template <typename V>
inline void stream_raw(void*, V) {}  // never called: kStreamAlign == 0 stores normally
inline void stream_fence() {}
#endif

// Is out + i a place where a whole vector can be streamed?
template <typename T>
inline bool stream_aligned(const T* out) {
  return kStreamAlign == 0 || (reinterpret_cast<uintptr_t>(out) & (kStreamAlign - 1)) == 0;
}

// --- Pack<T>: one vector's worth of T in float32 registers ----------------------------
// float: one Vec (kW elements); bf16 / fp16: two Vecs (2 kW elements, one vector of T),
// converted in registers (RNE on the way back, as c10's scalar conversions).
template <typename T>
struct Pack {
  static constexpr int N = std::is_same_v<T, float> ? 1 : 2;
  static constexpr int64_t kElems = N * kW;
  Vec v[N];

  static Pack load(const T* p) {
    if constexpr (N == 1) {
      return Pack{{Vec::loadu(p)}};
    } else {
#ifdef PARQ_VEC_SSE2
      Pack r;
      sse2_to_float(p, r.v[0], r.v[1]);
      return r;
#else
      auto [a, b] = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
      return Pack{{a, b}};
#endif
    }
  }
  // The values as one vector of T (a Vec for float32).
  auto packed() const {
    if constexpr (N == 1) {
      return v[0];
    } else {
#ifdef PARQ_VEC_SSE2
      return sse2_from_float<T>(v[0], v[1]);
#else
      return at::vec::convert_from_float<T>(v[0], v[1]);
#endif
    }
  }
  void store(T* p) const { packed().store(p); }
  // A streaming store where the level has them (p aligned: stream_aligned), else a store.
  void stream(T* p) const {
    if constexpr (kStreamAlign == 0) {
      store(p);
    } else {
      stream_raw(p, packed());
    }
  }
  // The values of a vector of T (what storing `packed()` keeps).
  template <typename P>
  static Pack unpack(const P& t) {
    if constexpr (N == 1) {
      return Pack{{t}};
    } else {
#ifdef PARQ_VEC_SSE2
      Pack r;
      sse2_to_float(t.vals, r.v[0], r.v[1]);
      return r;
#else
      auto [a, b] = at::vec::convert_to_float<T>(t);
      return Pack{{a, b}};
#endif
    }
  }
};

// Lanes whose value stays finite when stored as T: |v| below the smallest magnitude that
// rounds (to nearest even) to infinity in T; false for NaN and +-Inf. For float32 the same
// lanes as finite(v), for bf16 / fp16 the finite(T(v)) of the scalar code, without the
// conversion.
template <typename T>
inline Mask stored_finite(Vec v) {
  if constexpr (std::is_same_v<T, float>) {
    return lt(v.abs(), Vec(INFINITY));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return lt(v.abs(), Vec(std::bit_cast<float>(0x7F7F8000u)));  // a tie: rounds up to inf
  } else {
    return lt(v.abs(), Vec(65520.0f));  // halfway between 65504 (max) and 65536
  }
}

PARQ_CPU_END

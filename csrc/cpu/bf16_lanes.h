// bf16 in vector registers the cheap way, on the x86 levels (AVX2, AVX-512, and the SSE2
// baseline): what step_bf16.h's loops are made of.
//
// * Widening: a vector of 2 kW bf16 becomes two float vectors by interleaving zero words
//   (unpacklo / unpackhi_epi16: one instruction each). The lanes come out in an order of
//   their own within each 128-bit block, and narrowing (packus_epi32 of the high halves)
//   puts them back: a loop that widens and narrows every stream the same way, and works
//   lane by lane, never sees the order; store_natural writes a pair in memory order.
// * Rounding: c10's round to nearest even (bits + 0x7fff + the kept lsb) without its NaN
//   case (the caller has checked the values: abs_bits), and the value as stored is the
//   rounded bits with the low half cleared, not a second conversion.
// NEON (aarch64): kBf16Lanes is false, and the loops keep simd.h's generic Pack<BFloat16>.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "level.h"
#include "simd.h"
#include "sources.h"

#if defined(PARQ_VEC_SSE2)
#include <emmintrin.h>
#endif

PARQ_CPU_BEGIN

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2) || defined(PARQ_VEC_SSE2)
constexpr bool kBf16Lanes = true;
// HardBf16 needs a byte shuffle (SSSE3's pshufb, AVX-512's vpermw): not at the baseline.
#if defined(PARQ_VEC_SSE2)
constexpr bool kHardBf16Lanes = false;
#else
constexpr bool kHardBf16Lanes = true;
#endif

#if defined(CPU_CAPABILITY_AVX512)
using IVec = __m512i;  // 32 bf16, or 16 int32
inline IVec iload(const void* p) { return _mm512_loadu_si512(p); }
inline void istore(void* p, IVec v) { _mm512_storeu_si512(p, v); }
inline IVec iset(uint32_t v) { return _mm512_set1_epi32(static_cast<int>(v)); }
inline IVec iset16(int16_t v) { return _mm512_set1_epi16(v); }
inline IVec ibits(Vec v) { return _mm512_castps_si512(v); }
inline Vec fbits(IVec v) { return Vec(_mm512_castsi512_ps(v)); }
inline IVec iand(IVec a, IVec b) { return _mm512_and_si512(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
inline IVec isrl16(IVec a) { return _mm512_srli_epi32(a, 16); }
inline IVec imax(IVec a, IVec b) { return _mm512_max_epi32(a, b); }
inline bool any_gt(IVec a, IVec b) { return _mm512_cmpgt_epi32_mask(a, b) != 0; }
inline Vec widen_lo(IVec b) { return fbits(_mm512_unpacklo_epi16(_mm512_setzero_si512(), b)); }
inline Vec widen_hi(IVec b) { return fbits(_mm512_unpackhi_epi16(_mm512_setzero_si512(), b)); }
inline IVec narrow_hi(IVec a, IVec b) { return _mm512_packus_epi32(isrl16(a), isrl16(b)); }
// 16-bit lanes: bf16 bits -> keys ordered as the values; c - (a > b); table[c] (c < 16)
inline IVec key16(IVec s) {
  const IVec neg = _mm512_sub_epi16(_mm512_set1_epi16(INT16_MIN), s);
  return _mm512_mask_blend_epi16(_mm512_movepi16_mask(s), s, neg);
}
inline IVec count_gt16(IVec c, IVec a, IVec b) {
  return _mm512_sub_epi16(c, _mm512_movm_epi16(_mm512_cmpgt_epi16_mask(a, b)));
}
struct Table16 {
  IVec t;
  explicit Table16(const uint16_t (&v)[16]) {
    alignas(64) uint16_t w[32];
    for (int k = 0; k < 32; ++k) w[k] = v[k & 15];
    t = _mm512_load_si512(w);
  }
  IVec operator()(IVec c) const { return _mm512_permutexvar_epi16(c, t); }
};
#elif defined(CPU_CAPABILITY_AVX2)
using IVec = __m256i;  // 16 bf16, or 8 int32
inline IVec iload(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void istore(void* p, IVec v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
inline IVec iset(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }
inline IVec iset16(int16_t v) { return _mm256_set1_epi16(v); }
inline IVec ibits(Vec v) { return _mm256_castps_si256(v); }
inline Vec fbits(IVec v) { return Vec(_mm256_castsi256_ps(v)); }
inline IVec iand(IVec a, IVec b) { return _mm256_and_si256(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
inline IVec isrl16(IVec a) { return _mm256_srli_epi32(a, 16); }
inline IVec imax(IVec a, IVec b) { return _mm256_max_epi32(a, b); }
inline bool any_gt(IVec a, IVec b) {
  const IVec m = _mm256_cmpgt_epi32(a, b);
  return !_mm256_testz_si256(m, m);
}
inline Vec widen_lo(IVec b) { return fbits(_mm256_unpacklo_epi16(_mm256_setzero_si256(), b)); }
inline Vec widen_hi(IVec b) { return fbits(_mm256_unpackhi_epi16(_mm256_setzero_si256(), b)); }
inline IVec narrow_hi(IVec a, IVec b) { return _mm256_packus_epi32(isrl16(a), isrl16(b)); }
// 16-bit lanes: bf16 bits -> keys ordered as the values; c - (a > b); table[c] (c < 16)
inline IVec key16(IVec s) {
  const IVec neg = _mm256_sub_epi16(_mm256_set1_epi16(INT16_MIN), s);
  return _mm256_blendv_epi8(s, neg, _mm256_srai_epi16(s, 15));
}
inline IVec count_gt16(IVec c, IVec a, IVec b) {
  return _mm256_sub_epi16(c, _mm256_cmpgt_epi16(a, b));
}
struct Table16 {  // the low and the high bytes of 16 values, looked up with pshufb
  IVec lo, hi;
  explicit Table16(const uint16_t (&v)[16]) {
    alignas(32) uint8_t l[32], h[32];
    for (int k = 0; k < 32; ++k) {
      l[k] = static_cast<uint8_t>(v[k & 15] & 0xFF);
      h[k] = static_cast<uint8_t>(v[k & 15] >> 8);
    }
    lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(l));
    hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(h));
  }
  IVec operator()(IVec c) const {  // c's high bytes are 0: they index byte 0, dropped
    const IVec a = _mm256_and_si256(_mm256_shuffle_epi8(lo, c), _mm256_set1_epi16(0x00FF));
    return _mm256_or_si256(a, _mm256_slli_epi16(_mm256_shuffle_epi8(hi, c), 8));
  }
};
#else  // the x86-64 baseline (SSE2): 8 bf16 per vector, the halves in memory order
using IVec = __m128i;  // 8 bf16, or 4 int32
inline IVec iload(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void istore(void* p, IVec v) { _mm_storeu_si128(static_cast<__m128i*>(p), v); }
inline IVec iset(uint32_t v) { return _mm_set1_epi32(static_cast<int>(v)); }
inline IVec iset16(int16_t v) { return _mm_set1_epi16(v); }
inline IVec ibits(Vec v) { return _mm_castps_si128(static_cast<__m128>(v.v)); }
inline Vec fbits(IVec v) { return Vec(static_cast<VecSse2::F>(_mm_castsi128_ps(v))); }
inline IVec iand(IVec a, IVec b) { return _mm_and_si128(a, b); }
inline IVec iadd(IVec a, IVec b) { return _mm_add_epi32(a, b); }
inline IVec isrl16(IVec a) { return _mm_srli_epi32(a, 16); }
inline IVec imax(IVec a, IVec b) {  // (SSE4.1's pmaxsd)
  const IVec m = _mm_cmpgt_epi32(a, b);
  return _mm_or_si128(_mm_and_si128(m, a), _mm_andnot_si128(m, b));
}
inline bool any_gt(IVec a, IVec b) { return _mm_movemask_epi8(_mm_cmpgt_epi32(a, b)) != 0; }
inline Vec widen_lo(IVec b) { return fbits(_mm_unpacklo_epi16(_mm_setzero_si128(), b)); }
inline Vec widen_hi(IVec b) { return fbits(_mm_unpackhi_epi16(_mm_setzero_si128(), b)); }
// (no packus_epi32 before SSE4.1: the arithmetic shift keeps each value in int16's range)
inline IVec narrow_hi(IVec a, IVec b) {
  return _mm_packs_epi32(_mm_srai_epi32(a, 16), _mm_srai_epi32(b, 16));
}
#endif

// Two float vectors of one bf16 vector (in widen's lane order).
struct Bf16Pair {
  Vec v[2];
};
inline Bf16Pair widen(const c10::BFloat16* p) {
  const IVec b = iload(p);
  return {{widen_lo(b), widen_hi(b)}};
}

// The order key of bf16 bits as an int16 (-0 and +0 the same key), and back.
inline int16_t bf16_key(uint16_t b) {
  const int s = static_cast<int16_t>(b);
  return static_cast<int16_t>(s >= 0 ? s : INT16_MIN - s);
}
inline uint16_t bf16_from_key(int k) {
  return static_cast<uint16_t>(static_cast<int16_t>(k >= 0 ? k : INT16_MIN - k));
}
// The smallest bf16 above m (m finite): x > m <=> x >= it, for every bf16 x.
inline uint16_t bf16_above(float m) {
  const c10::BFloat16 r(m);  // the nearest (RNE): if above m, nothing lies between
  if (static_cast<float>(r) > m) return r.x;
  return bf16_from_key(bf16_key(r.x) + 1);
}

template <int NL>
struct HardBf16;  // (declared on every level: step_bf16.h names it, used where kHardBf16Lanes)
#if !defined(PARQ_VEC_SSE2)
// HARD onto NL stored levels, in bf16's own 16-bit lanes (2 kW per vector, memory order):
// h = Q_c with c = #{j : M_j < x} (project_one's chain) counted with integer compares of
// order keys, x > M_j read as key(x) >= key(bf16_above(M_j)), and p = bf16(Q_c) looked up
// from a table of the levels rounded once. For bf16 x the same p as the float chain and
// its rounding, in half the compares (16-bit lanes) and without the conversions.
template <int NL>
struct HardBf16 {
  IVec kt[NL - 1];  // key(bf16_above(M_j)) - 1: key(x) > kt_j <=> M_j < x
  Table16 table;
  static Table16 levels(const float* Q) {
    uint16_t v[16];
    for (int k = 0; k < 16; ++k) v[k] = c10::BFloat16(Q[k < NL ? k : NL - 1]).x;
    return Table16(v);
  }
  HardBf16(const float* Q, const float* M) : table(levels(Q)) {
    for (int j = 0; j + 1 < NL; ++j) {
      kt[j] = iset16(static_cast<int16_t>(bf16_key(bf16_above(M[j])) - 1));
    }
  }
  IVec operator()(IVec x) const {  // x: 2 kW bf16; returns p as bf16
    const IVec k = key16(x);
    IVec c = iset16(0);
#pragma GCC unroll 16
    for (int j = 0; j + 1 < NL; ++j) c = count_gt16(c, k, kt[j]);
    return table(c);
  }
};

#endif

// A vector of p: streamed where the level has streaming stores (p aligned for them).
inline void istream(void* p, IVec v) {
  if constexpr (kStreamAlign == 0) {
    istore(p, v);
  } else {
    stream_raw(p, v);
  }
}

// The pair of a widened vector, stored in memory order (2 kW floats).
#if defined(CPU_CAPABILITY_AVX512)
inline void store_natural(float* out, Vec lo, Vec hi) {
  // lo = blocks (0, 2, 4, 6) of 4 elements, hi = (1, 3, 5, 7)
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
}
#elif defined(PARQ_VEC_SSE2)
inline void store_natural(float* out, Vec lo, Vec hi) {  // already in memory order
  lo.store(out);
  hi.store(out + 4);
}
#else
inline void store_natural(float* out, Vec lo, Vec hi) {  // lo = blocks (0, 2), hi = (1, 3)
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}
#endif

// The rounding constants, made once per loop.
struct Bf16Round {
  IVec one = iset(1), bias = iset(0x7FFF), high = iset(0xFFFF0000u), abs = iset(0x7FFFFFFF);
  IVec max_finite = iset(0x7F7F7FFF);  // |bits| above: inf or NaN as stored (0x7F7F8000 rounds up)
  // bits whose high half is RNE(v) in bf16 (c10's rounding; v not NaN)
  IVec rne(Vec v) const {
    const IVec b = ibits(v);
    return iadd(b, iadd(iand(isrl16(b), one), bias));
  }
  Vec as_stored(IVec r) const { return fbits(iand(r, high)); }
  IVec abs_bits(Vec v) const { return iand(ibits(v), abs); }
  IVec narrow(const Vec (&v)[2]) const { return narrow_hi(rne(v[0]), rne(v[1])); }
  // Is a new latent (w) or state value (n1, n2, n3 as the pattern has them) not finite as
  // stored in bf16?
  template <Pattern P>
  bool any_not_finite(const Vec (&w)[2], const Vec (&n1)[2], const Vec (&n2)[2],
                      const Vec (&n3)[2]) const {
    IVec big = imax(abs_bits(w[0]), abs_bits(w[1]));
    for (int j = 0; j < 2; ++j) {
      if constexpr (P != Pattern::kSgd) big = imax(big, abs_bits(n1[j]));
      if constexpr (P == Pattern::kAdam || P == Pattern::kAdamAmsgrad) {
        big = imax(big, abs_bits(n2[j]));
      }
      if constexpr (P == Pattern::kAdamAmsgrad) big = imax(big, abs_bits(n3[j]));
    }
    return any_gt(big, max_finite);
  }
};

#else
constexpr bool kBf16Lanes = false;
constexpr bool kHardBf16Lanes = false;
#endif

PARQ_CPU_END

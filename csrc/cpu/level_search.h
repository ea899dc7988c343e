// The projection onto 8 or 16 sorted levels (3 and 4 bits) by a branch-free binary
// search with in-register table lookups, on the levels that have them (AVX2: vpermps and
// vpermilps; AVX-512: vpermps over 16 lanes). project_levels.h's chains of selects cost
// NL - 1 compares and blends per vector for HARD and twice that for PARQ (60 vector ops
// per PARQ vector at 4 bits); the search costs log2(NL) compares and lookups. The levels
// without such lookups (the x86-64 baseline, NEON) count the sorted entries below x and
// read the result per lane from tables (the SearchV of the #else branch below).
//
// The same values as the chains wherever the levels are sorted ascending and finite (SPEC
// §3: Q is sorted; levels_sorted checks a row's padded levels, and the loops take the
// chains where it fails). With A sorted (the midpoints M for HARD, the levels Q for PARQ):
//
// * the count n = #{j < NL - 1 : A_j < x} is found bit by bit from the top: A_{NL/2 - 1}
//   < x decides the top bit, then A at the middle of the half it picked, and so on (a NaN
//   x compares false everywhere: n = 0, as the chains' defaults). The first bits give c
//   (n = 2c or 2c + 1); the last compare is A_{2c} < x.
// * HARD: Q_n (the chain's Q_c with c = #{j : M_j < x}): Q_{2c+1} or Q_{2c}.
// * PARQ: n = min(#{j : Q_j < x}, NL - 1). Where Q_{2c} < x: hi = Q_{2c+1}, and lo =
//   Q_{2c+1} if it is below x too (only for 2c + 1 = NL - 1: no level is not below x, and
//   the chains give Q_{NL-1} for both) else Q_{2c}. Else: hi = Q_{2c}, lo = Q_{max(2c-1, 0)}.
//   The largest level below x and the smallest not below it, as the chains.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../levels.h"
#include "project_levels.h"
#include "simd.h"

PARQ_CPU_BEGIN

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)

// N = 4 or 8 floats, looked up by a lane index in [0, N).
template <int N>
struct Table;

#if defined(CPU_CAPABILITY_AVX512)
using Idx = __m512i;
// 2 b1 + b0 from two lane masks.
inline Idx two_bits(Mask b1, Mask b0) {
  const Idx c = _mm512_maskz_mov_epi32(b1, _mm512_set1_epi32(2));
  return _mm512_mask_add_epi32(c, b0, c, _mm512_set1_epi32(1));
}
// 2 c + b
inline Idx push_bit(Idx c, Mask b) {
  const Idx c2 = _mm512_slli_epi32(c, 1);
  return _mm512_mask_add_epi32(c2, b, c2, _mm512_set1_epi32(1));
}
template <int N>
struct Table {  // vpermps over 16 lanes serves both sizes
  __m512 t = _mm512_setzero_ps();
  Table() = default;
  explicit Table(const float* v) {
    alignas(64) float a[16] = {};
    for (int j = 0; j < N; ++j) a[j] = v[j];
    t = _mm512_load_ps(a);
  }
  Vec operator()(Idx i) const { return _mm512_permutexvar_ps(i, t); }
};
#else  // AVX2: a mask lane is -1 where true
using Idx = __m256i;
inline Idx as_idx(Mask m) { return _mm256_castps_si256(m); }
inline Idx two_bits(Mask b1, Mask b0) {
  return _mm256_sub_epi32(_mm256_and_si256(as_idx(b1), _mm256_set1_epi32(2)), as_idx(b0));
}
inline Idx push_bit(Idx c, Mask b) { return _mm256_sub_epi32(_mm256_slli_epi32(c, 1), as_idx(b)); }
template <>
struct Table<4> {  // in both 128-bit halves: vpermilps reads an index's low 2 bits per half
  __m256 t = _mm256_setzero_ps();
  Table() = default;
  explicit Table(const float* v) : t(_mm256_setr_ps(v[0], v[1], v[2], v[3], v[0], v[1], v[2], v[3])) {}
  Vec operator()(Idx i) const { return _mm256_permutevar_ps(t, i); }
};
template <>
struct Table<8> {  // vpermps
  __m256 t = _mm256_setzero_ps();
  Table() = default;
  explicit Table(const float* v) : t(_mm256_loadu_ps(v)) {}
  Vec operator()(Idx i) const { return _mm256_permutevar8x32_ps(t, i); }
};
#endif
#endif

// Does this level search NL levels (else: the chains of project_levels.h)? Every level
// from 8 levels: by lookups in registers where the level has them, else by a count and a
// table read per lane (below).
template <int NL>
constexpr bool kSearches = NL >= 8;

// Sorted ascending, finite levels, and sorted midpoints: the search's condition.
template <int NL>
inline bool levels_sorted(const LevelsN<NL>& l) {
  bool ok = std::isfinite(l.Q[0]);
  for (int j = 0; j + 1 < NL; ++j) ok = ok && std::isfinite(l.Q[j + 1]) && l.Q[j] <= l.Q[j + 1];
  for (int j = 0; j + 2 < NL; ++j) ok = ok && l.M[j] <= l.M[j + 1];
  return ok;
}

template <int NL>
struct SearchV;  // with lookups in registers (AVX2, AVX-512) or without (below)

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// A row's levels for the search: A (M for HARD, Q for PARQ) at the search's steps, and the
// levels the last step picks from. H = NL / 2 entries per table.
template <int NL>
struct SearchV {
  static constexpr int H = NL == 16 ? 8 : 4;  // (NL = 4: never built, see below)
  Vec top, left, right;  // A_{H-1}; A_{H/2-1}, A_{3H/2-1}
  Table<4> quarter;      // NL = 16: A_1, A_5, A_9, A_13
  Table<H> even;         // A_0, A_2, ..., A_{NL-2}: the last step's compare
  Table<H> q_even;       // HARD: Q_0, Q_2, ...
  Table<H> q_odd;        // Q_1, Q_3, ..., Q_{NL-1}
  Table<H> q_before;     // PARQ: Q_{max(2c-1, 0)}: Q_0, Q_1, Q_3, ..., Q_{NL-3}
  Vec inv_rho;
  SearchV(const LevelsN<NL>& l, const ProjectArgs& p, bool hard) : inv_rho(p.inv_rho) {
    static_assert(NL == 8 || NL == 16);
    const float* A = hard ? l.M : l.Q;
    top = Vec(A[H - 1]);
    left = Vec(A[H / 2 - 1]);
    right = Vec(A[3 * H / 2 - 1]);
    float a[H], qe[H], qo[H], qb[H];
    for (int c = 0; c < H; ++c) {
      a[c] = A[2 * c];
      qe[c] = l.Q[2 * c];
      qo[c] = l.Q[2 * c + 1];
      qb[c] = l.Q[c == 0 ? 0 : 2 * c - 1];
    }
    if constexpr (NL == 16) {
      const float q[4] = {A[1], A[5], A[9], A[13]};
      quarter = Table<4>(q);
    }
    even = Table<H>(a);
    q_even = Table<H>(qe);
    q_odd = Table<H>(qo);
    q_before = Table<H>(qb);
  }
  // c: n = 2c or 2c + 1 (the first log2(NL) - 1 bits of the count).
  inline __attribute__((always_inline)) Idx prefix(Vec x) const {
    const Mask b1 = lt(top, x);
    const Mask b0 = lt(select(b1, left, right), x);
    Idx c = two_bits(b1, b0);
    if constexpr (NL == 16) c = push_bit(c, lt(quarter(c), x));
    return c;
  }
};

template <int PROX, int NL, bool kFinite = false>
inline __attribute__((always_inline)) Vec project_vec(Vec x, const SearchV<NL>& l) {
  static_assert(PROX == kNone || PROX == kHard || PROX == kParq);
  Vec y = x;
  if constexpr (PROX == kHard) {
    const Idx c = l.prefix(x);
    y = select(lt(l.even(c), x), l.q_even(c), l.q_odd(c));
  } else if constexpr (PROX == kParq) {
    const Idx c = l.prefix(x);
    const Vec e = l.even(c), o = l.q_odd(c);  // Q_{2c}, Q_{2c+1}
    const Mask b = lt(e, x);
    const Vec hi = select(b, e, o);
    const Vec lo = select(b, l.q_before(c), select(lt(o, x), e, o));
    y = parq_in_interval(x, lo, hi, l.inv_rho);
  }
  return keep_nonfinite<kFinite>(x, y);
}
#endif

#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// The levels without an in-register lookup (the x86-64 baseline's SSE2, NEON): the count
// n = #{j : A_j < x} of the sorted A (M for HARD, Q for PARQ) from one compare and one
// integer subtract per entry (a NaN x: n = 0, as the chains' defaults), then the result
// read per lane from tables indexed by n. HARD: Q_n. PARQ, with n over all NL levels: the
// levels below x are Q_0 .. Q_{n-1}, so lo = Q_{max(n-1, 0)} and hi = Q_{min(n, NL-1)}
// (the chains' largest level below x and smallest not below it), and their midpoint
// (lo + hi) * 0.5 (parq_in_interval's) is a third table. At 16 levels 32 vector ops and
// 3 table reads per lane for PARQ, against the chains' 16 compares and 30 selects (three
// ops each without SSE4's blendv).
template <int NL>
struct SearchV {
  Vec a[NL];  // A: NL - 1 midpoints (HARD) or NL levels (PARQ)
  float t_lo[NL + 1] = {}, t_hi[NL + 1] = {}, t_mid[NL + 1] = {};  // HARD: Q_n in t_lo
  Vec inv_rho;
  SearchV(const LevelsN<NL>& l, const ProjectArgs& p, bool hard) : inv_rho(p.inv_rho) {
    for (int j = 0; j < NL; ++j) a[j] = Vec(hard ? l.M[j < NL - 1 ? j : NL - 2] : l.Q[j]);
    for (int n = 0; n <= NL; ++n) {
      if (hard) {
        t_lo[n] = l.Q[n < NL ? n : NL - 1];
      } else {
        t_lo[n] = l.Q[n > 0 ? n - 1 : 0];
        t_hi[n] = l.Q[n < NL ? n : NL - 1];
        t_mid[n] = (t_lo[n] + t_hi[n]) * 0.5f;
      }
    }
  }
  static Vec lookup(const float* t, Mask n) {  // t[n] per lane
#if defined(PARQ_VEC_SSE2)
    return Vec(VecSse2::F{t[n[0]], t[n[1]], t[n[2]], t[n[3]]});
#else
    alignas(64) float v[kW];
    for (int64_t k = 0; k < kW; ++k) v[k] = t[n[k]];
    return Vec::loadu(v);
#endif
  }
};

template <int PROX, int NL, bool kFinite = false>
inline __attribute__((always_inline)) Vec project_vec(Vec x, const SearchV<NL>& l) {
  static_assert(PROX == kNone || PROX == kHard || PROX == kParq);
  Vec y = x;
  if constexpr (PROX == kHard || PROX == kParq) {
    constexpr int NA = PROX == kHard ? NL - 1 : NL;
    Mask n = lt(l.a[0], x);  // -1 where true: n counts down
#pragma GCC unroll 16
    for (int j = 1; j < NA; ++j) n = n + lt(l.a[j], x);
    n = -n;
    if constexpr (PROX == kHard) {
      y = SearchV<NL>::lookup(l.t_lo, n);
    } else {
      const Vec lo = SearchV<NL>::lookup(l.t_lo, n), hi = SearchV<NL>::lookup(l.t_hi, n);
      const Vec c = SearchV<NL>::lookup(l.t_mid, n);
      y = parq_about(x, c, lo, hi, l.inv_rho);
    }
  }
  return keep_nonfinite<kFinite>(x, y);
}
#endif

// A row's levels in vector registers for project_vec: searched (kSearch) or the chains'.
template <int PROX, int NL, bool kSearch>
inline auto levels_vec(const LevelsN<NL>& l, const ProjectArgs& p) {
  if constexpr (kSearch) {
    return SearchV<NL>(l, p, PROX == kHard);
  } else {
    return LevelsV<NL>(l, p);
  }
}

// fn(std::true_type{}) where project_vec<PROX> searches these levels (a level with lookups,
// NL >= 8, HARD or PARQ, levels_sorted), else fn(std::false_type{}).
template <int PROX, int NL, typename F>
inline decltype(auto) with_search(const LevelsN<NL>& l, const F& fn) {
  if constexpr (kSearches<NL> && (PROX == kHard || PROX == kParq)) {
    if (levels_sorted(l)) return fn(std::true_type{});
  }
  return fn(std::false_type{});
}

// ys[0, n) in place (the general path's write pass).
template <int PROX, int NL>
inline void project_block(float* __restrict__ ys, int64_t n, const LevelsN<NL>& l,
                          const ProjectArgs& p) {
  if constexpr (PROX == kNone) return;
  with_search<PROX>(l, [&](auto search) {
    const auto lv = levels_vec<PROX, NL, decltype(search)::value>(l, p);
    int64_t i = 0;
    for (; i + kW <= n; i += kW) project_vec<PROX, NL>(Vec::loadu(ys + i), lv).store(ys + i);
    for (; i < n; ++i) ys[i] = project_one<PROX, NL>(ys[i], l, p);
  });
}

PARQ_CPU_END

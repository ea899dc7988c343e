// Projection of a block of values onto a level set of K <= 4 levels (1-bit, ternary,
// 2-bit): HARD (nearest level), RELAX, PARQ (SPEC §4) and ProxQuant l1 / l2 (SPEC §9,
// scalar form only: the compiler vectorizes it); a non-finite value is kept as
// it is. The fused step's non-update loop (step_loop.h) and the write pass's PARQ
// (write_pass.h) use it.
//
// Two forms with the same float operations: a scalar one (any ISA; the compiler
// vectorizes it) and an AVX-512 one, because GCC turns the scalar form's chains of
// selects into mask arithmetic through general registers, which doubles the loop.
#pragma once

#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../levels.h"

namespace parq {

// Up to 4 levels, padded with the last level (the lookups give the same values:
// a padded level is never below x unless Q[K-1] is, and then it equals it).
struct Levels4 {
  float Q[4];
  float M[3];  // midpoints (Q_j + Q_{j+1}) / 2
};

inline Levels4 pad_levels(const float* Q, int K) {
  Levels4 l{};
  for (int j = 0; j < 4; ++j) l.Q[j] = Q[j < K ? j : K - 1];
  for (int j = 0; j < 3; ++j) l.M[j] = (l.Q[j] + l.Q[j + 1]) / 2;
  return l;
}

// The map's scalars: PARQ multiplies by 1 / rho (computed once: within SPEC §6's
// 1e-6 max|x| / rho of the division), RELAX mixes keep * x + theta * hard(x).
struct ProjectArgs {
  float inv_rho;
  float keep;
  float theta;
  float lam = 0.0f;       // ProxQuant lambda
  float l2_denom = 1.0f;  // ProxQuant l2: 1 + lambda
};

template <int PROX>
constexpr bool kNeedsHard4 =
    PROX == kHard || PROX == kRelax || PROX == kProxQuantL1 || PROX == kProxQuantL2;

// One value. The interval [lo, hi] of SPEC §4: lo = the largest level below x (Q_0 if
// none), hi = the smallest level not below x (Q_3 if none); a_j = Q_j < x is monotone.
template <int PROX>
inline __attribute__((always_inline)) float project4(float x, const Levels4& l,
                                                     const ProjectArgs& p) {
  float y = x;
  if constexpr (kNeedsHard4<PROX>) {
    float h = l.M[0] < x ? l.Q[1] : l.Q[0];
    h = l.M[1] < x ? l.Q[2] : h;
    h = l.M[2] < x ? l.Q[3] : h;
    if constexpr (PROX == kProxQuantL1) {
      y = prox_quant_l1(x, h, p.lam);
    } else if constexpr (PROX == kProxQuantL2) {
      y = prox_quant_l2(x, h, p.lam, p.l2_denom);
    } else {
      y = PROX == kHard ? h : p.keep * x + p.theta * h;
    }
  } else if constexpr (PROX == kParq) {
    const bool a0 = l.Q[0] < x, a1 = l.Q[1] < x, a2 = l.Q[2] < x, a3 = l.Q[3] < x;
    float lo = a1 ? l.Q[1] : l.Q[0];
    lo = a2 ? l.Q[2] : lo;
    lo = a3 ? l.Q[3] : lo;
    float hi = a2 ? l.Q[3] : l.Q[2];
    hi = a1 ? hi : l.Q[1];
    hi = a0 ? hi : l.Q[0];
    const float c = (lo + hi) / 2;
    y = clampf(c + (x - c) * p.inv_rho, lo, hi);
  }
  return x - x == 0.0f ? y : x;  // finite(x), sources.h
}

#if defined(__AVX512F__)
// 16 values; the same operations as project4 (the selects as masked blends).
template <int PROX>
inline __attribute__((always_inline)) __m512 project16(__m512 x, const Levels4& l,
                                                       const ProjectArgs& p) {
  auto lt = [](__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); };
  auto pick = [](__mmask16 m, __m512 no, __m512 yes) { return _mm512_mask_blend_ps(m, no, yes); };
  const __m512 q0 = _mm512_set1_ps(l.Q[0]), q1 = _mm512_set1_ps(l.Q[1]),
               q2 = _mm512_set1_ps(l.Q[2]), q3 = _mm512_set1_ps(l.Q[3]);
  __m512 y = x;
  if constexpr (PROX == kHard || PROX == kRelax) {
    __m512 h = pick(lt(_mm512_set1_ps(l.M[0]), x), q0, q1);
    h = pick(lt(_mm512_set1_ps(l.M[1]), x), h, q2);
    h = pick(lt(_mm512_set1_ps(l.M[2]), x), h, q3);
    y = PROX == kHard ? h
                      : _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(p.keep), x),
                                      _mm512_mul_ps(_mm512_set1_ps(p.theta), h));
  } else if constexpr (PROX == kParq) {
    const __mmask16 a0 = lt(q0, x), a1 = lt(q1, x), a2 = lt(q2, x), a3 = lt(q3, x);
    __m512 lo = pick(a1, q0, q1);
    lo = pick(a2, lo, q2);
    lo = pick(a3, lo, q3);
    __m512 hi = pick(a2, q2, q3);
    hi = pick(a1, q1, hi);
    hi = pick(a0, q0, hi);
    const __m512 c = _mm512_mul_ps(_mm512_add_ps(lo, hi), _mm512_set1_ps(0.5f));  // exact: / 2
    y = _mm512_add_ps(c, _mm512_mul_ps(_mm512_sub_ps(x, c), _mm512_set1_ps(p.inv_rho)));
    y = _mm512_min_ps(_mm512_max_ps(y, lo), hi);  // finite operands: clampf's values
  }
  const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(), _CMP_EQ_OQ);
  return pick(ok, x, y);
}
#endif

// ys[0, n) in place.
template <int PROX>
inline void project_block(float* __restrict__ ys, int64_t n, const Levels4& l,
                          const ProjectArgs& p) {
  if constexpr (PROX == kNone) return;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (PROX != kProxQuantL1 && PROX != kProxQuantL2) {
    for (; i + 16 <= n; i += 16) {
      _mm512_storeu_ps(ys + i, project16<PROX>(_mm512_loadu_ps(ys + i), l, p));
    }
  }
#endif
  for (; i < n; ++i) ys[i] = project4<PROX>(ys[i], l, p);
}

}  // namespace parq

// Projection of a block of values onto a level set of K <= 4 levels (1-bit, ternary,
// 2-bit): HARD (nearest level), RELAX, PARQ (SPEC §4) and ProxQuant l1 / l2 (SPEC §9); a
// non-finite value is kept as it is. The fused step's non-update loop (step_loop.h) and the write pass's PARQ
// (write_pass.h) use it.
//
// Two forms with the same float operations: a scalar one (heads and tails of rows) and a
// vector one (simd.h, every level), because GCC turns the scalar form's chains of selects
// into mask arithmetic through general registers, or into a scalar loop with branches
// where the levels are read through a reference.
#pragma once

#include <cstdint>

#include "../levels.h"
#include "simd.h"

PARQ_CPU_BEGIN

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

// The levels and the map's scalars broadcast to vectors, once per row range (outside the
// loops: through references GCC re-broadcast them per vector, or left the selects scalar).
struct LevelsV {
  Vec q0, q1, q2, q3, m0, m1, m2, inv_rho, keep, theta, lam, l2_denom;
  LevelsV(const Levels4& l, const ProjectArgs& p)
      : q0(l.Q[0]), q1(l.Q[1]), q2(l.Q[2]), q3(l.Q[3]), m0(l.M[0]), m1(l.M[1]), m2(l.M[2]),
        inv_rho(p.inv_rho), keep(p.keep), theta(p.theta), lam(p.lam), l2_denom(p.l2_denom) {}
};

// A vector of values; the same operations as project4 (the selects as blends).
template <int PROX>
inline __attribute__((always_inline)) Vec project_vec(Vec x, const LevelsV& l) {
  Vec y = x;
  if constexpr (kNeedsHard4<PROX>) {
    Vec h = select(lt(l.m0, x), l.q0, l.q1);
    h = select(lt(l.m1, x), h, l.q2);
    h = select(lt(l.m2, x), h, l.q3);
    if constexpr (PROX == kHard) {
      y = h;
    } else if constexpr (PROX == kRelax) {
      y = l.keep * x + l.theta * h;
    } else if constexpr (PROX == kProxQuantL1) {  // prox_quant_l1 (levels.h)
      const Vec d = x - h;
      const Mask pos = ge(d, Vec(0.0f));
      const Vec m = vmax(select(pos, vneg(d), d) - l.lam, Vec(0.0f));
      y = h + select(pos, vneg(m), m);
    } else {  // kProxQuantL2: prox_quant_l2
      y = (x + l.lam * h) / l.l2_denom;
    }
  } else if constexpr (PROX == kParq) {
    const Mask a0 = lt(l.q0, x), a1 = lt(l.q1, x), a2 = lt(l.q2, x), a3 = lt(l.q3, x);
    Vec lo = select(a1, l.q0, l.q1);
    lo = select(a2, lo, l.q2);
    lo = select(a3, lo, l.q3);
    Vec hi = select(a2, l.q2, l.q3);
    hi = select(a1, l.q1, hi);
    hi = select(a0, l.q0, hi);
    const Vec c = (lo + hi) * Vec(0.5f);  // exact: (lo + hi) / 2
    y = vclamp(c + (x - c) * l.inv_rho, lo, hi);
  }
  return select(finite_mask(x), x, y);
}

// ys[0, n) in place.
template <int PROX>
inline void project_block(float* __restrict__ ys, int64_t n, const Levels4& l,
                          const ProjectArgs& p) {
  if constexpr (PROX == kNone) return;
  const LevelsV lv(l, p);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) project_vec<PROX>(Vec::loadu(ys + i), lv).store(ys + i);
  for (; i < n; ++i) ys[i] = project4<PROX>(ys[i], l, p);
}

PARQ_CPU_END

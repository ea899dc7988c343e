// Projection of a block of values onto a level set of K <= 16 levels (1 to 4 bits,
// ternary): HARD (nearest level), RELAX, PARQ (SPEC §4) and ProxQuant l1 / l2 (SPEC §9); a
// non-finite value is kept as it is. The fused step's non-update loop (step_loop.h), its
// pipelined update rows (step_update.h) and the write passes (write_direct.h,
// write_pass.h) use it.
//
// The levels are padded to NL = 4, 8 or 16 (level_slots picks the smallest that holds K),
// and NL is a template argument, so the chains of selects unroll into NL - 1 compares and
// blends per vector: no search, no gather, on every instruction-set level. At 8 and 16
// levels, sorted level sets are searched instead (level_search.h: the same values).
// Two forms with the same float operations: a scalar one (heads and tails of rows) and a
// vector one (simd.h, every level), because GCC turns the scalar form's chains of selects
// into mask arithmetic through general registers, or into a scalar loop with branches
// where the levels are read through a reference.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../levels.h"
#include "simd.h"

PARQ_CPU_BEGIN

constexpr int kMaxFastLevels = 16;  // 4 bits

// The padded size that serves K levels (K <= kMaxFastLevels).
constexpr int level_slots(int64_t K) { return K <= 4 ? 4 : (K <= 8 ? 8 : 16); }

// Up to NL levels, padded with the last level (the lookups give the same values: a
// padded level is never below x unless Q[K-1] is, and then it equals it).
template <int NL>
struct LevelsN {
  float Q[NL];
  float M[NL - 1];  // midpoints (Q_j + Q_{j+1}) / 2
};

template <int NL>
inline LevelsN<NL> pad_levels(const float* Q, int K) {
  LevelsN<NL> l{};
  for (int j = 0; j < NL; ++j) l.Q[j] = Q[j < K ? j : K - 1];
  for (int j = 0; j + 1 < NL; ++j) l.M[j] = (l.Q[j] + l.Q[j + 1]) / 2;
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
constexpr bool kNeedsHard =
    PROX == kHard || PROX == kRelax || PROX == kProxQuantL1 || PROX == kProxQuantL2;

// One value. hard: h = Q_c with c = #{j : M_j < x}. PARQ's interval [lo, hi] of SPEC §4:
// lo = the largest level below x (Q_0 if none), hi = the smallest level not below x
// (Q_{NL-1} if none); a_j = Q_j < x is monotone in j.
template <int PROX, int NL>
inline __attribute__((always_inline)) float project_one(float x, const LevelsN<NL>& l,
                                                        const ProjectArgs& p) {
  float y = x;
  if constexpr (kNeedsHard<PROX>) {
    float h = l.Q[0];
#pragma GCC unroll 16
    for (int j = 0; j + 1 < NL; ++j) h = l.M[j] < x ? l.Q[j + 1] : h;
    if constexpr (PROX == kProxQuantL1) {
      y = prox_quant_l1(x, h, p.lam);
    } else if constexpr (PROX == kProxQuantL2) {
      y = prox_quant_l2(x, h, p.lam, p.l2_denom);
    } else {
      y = PROX == kHard ? h : p.keep * x + p.theta * h;
    }
  } else if constexpr (PROX == kParq) {
    float lo = l.Q[0];
#pragma GCC unroll 16
    for (int j = 1; j < NL; ++j) lo = l.Q[j] < x ? l.Q[j] : lo;
    float hi = l.Q[NL - 1];
#pragma GCC unroll 16
    for (int j = NL - 2; j >= 0; --j) hi = l.Q[j] < x ? hi : l.Q[j];
    const float c = (lo + hi) / 2;
    y = clampf(c + (x - c) * p.inv_rho, lo, hi);
  }
  return x - x == 0.0f ? y : x;  // finite(x), sources.h
}

// The levels and the map's scalars broadcast to vectors, once per row range (outside the
// loops: through references GCC re-broadcast them per vector, or left the selects scalar).
template <int NL>
struct LevelsV {
  Vec q[NL], m[NL - 1];
  Vec inv_rho, keep, theta, lam, l2_denom;
  LevelsV(const LevelsN<NL>& l, const ProjectArgs& p)
      : inv_rho(p.inv_rho), keep(p.keep), theta(p.theta), lam(p.lam), l2_denom(p.l2_denom) {
    for (int j = 0; j < NL; ++j) q[j] = Vec(l.Q[j]);
    for (int j = 0; j + 1 < NL; ++j) m[j] = Vec(l.M[j]);
  }
};

// PARQ's map of x in its interval [lo, hi] about the midpoint c = (lo + hi) * 0.5
// (project_one's last line), on vectors; parq_in_interval computes c, a caller that
// looked it up with lo and hi passes it.
inline __attribute__((always_inline)) Vec parq_about(Vec x, Vec c, Vec lo, Vec hi,
                                                     Vec inv_rho) {
  return vclamp(c + (x - c) * inv_rho, lo, hi);
}
inline __attribute__((always_inline)) Vec parq_in_interval(Vec x, Vec lo, Vec hi, Vec inv_rho) {
  return parq_about(x, (lo + hi) * Vec(0.5f), lo, hi, inv_rho);  // exact: (lo + hi) / 2
}

// y, or x itself where x is not finite (kFinite: the caller knows every lane of x is).
template <bool kFinite>
inline __attribute__((always_inline)) Vec keep_nonfinite(Vec x, Vec y) {
  if constexpr (kFinite) {
    return y;
  } else {
    return select(finite_mask(x), x, y);
  }
}

// A vector of values; the same operations as project_one (the selects as blends).
// kFinite: the caller knows every lane of x is finite (no select of x's non-finite lanes).
template <int PROX, int NL, bool kFinite = false>
inline __attribute__((always_inline)) Vec project_vec(Vec x, const LevelsV<NL>& l) {
  Vec y = x;
  if constexpr (kNeedsHard<PROX>) {
    Vec h = l.q[0];
#pragma GCC unroll 16
    for (int j = 0; j + 1 < NL; ++j) h = select(lt(l.m[j], x), h, l.q[j + 1]);
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
    Vec lo = l.q[0];
#pragma GCC unroll 16
    for (int j = 1; j < NL; ++j) lo = select(lt(l.q[j], x), lo, l.q[j]);
    Vec hi = l.q[NL - 1];
#pragma GCC unroll 16
    for (int j = NL - 2; j >= 0; --j) hi = select(lt(l.q[j], x), l.q[j], hi);
    y = parq_in_interval(x, lo, hi, l.inv_rho);
  }
  return keep_nonfinite<kFinite>(x, y);
}

// fn(std::integral_constant<int, NL>{}) with the padded size that serves K levels.
template <typename F>
inline decltype(auto) with_level_slots(int64_t K, const F& fn) {
  if (K <= 4) return fn(std::integral_constant<int, 4>{});
  if (K <= 8) return fn(std::integral_constant<int, 8>{});
  return fn(std::integral_constant<int, 16>{});
}

PARQ_CPU_END

// The fused step's single loop for non-update steps (the common step: levels are
// recomputed once per quant_period): per element, the base update of the latent and
// its state, the projection onto the stored levels and the store of p, in one loop
// with no intermediate buffer, so that -O3 keeps everything in vector registers.
//
// Served here: level sets of K <= 4 (compare-select; 1-bit, ternary, 2-bit), prox maps
// NONE / HARD / PARQ / RELAX, no shrink, not the first step of a momentum buffer. The
// same float operations in the same order as the general path (sources.h +
// row_stats.h: update_element, the K <= 4 compare chains, prox_parq). Anything else
// goes through the general path.
#pragma once

#include <cstdint>

#include "../base_update.h"
#include "../levels.h"
#include "row_stats.h"
#include "sources.h"

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

// One row range [o, o + n) in one loop (restrict pointers: distinct tensors, validated).
template <Pattern P, int PROX, typename T>
int step_loop_impl(const StepArgs& s, T* __restrict__ L, const T* __restrict__ G,
                       T* __restrict__ B1, T* __restrict__ B2, T* __restrict__ B3,
                       T* __restrict__ out, int64_t n, const Levels4& lv, const OpArgs& a) {
  const float rho = a.prox_arg, keep = a.relax_keep, theta = a.prox_arg;
  float Q[4], M[3];
  for (int j = 0; j < 4; ++j) Q[j] = lv.Q[j];
  for (int j = 0; j < 3; ++j) M[j] = lv.M[j];
  int kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(update_element<P, false>(s, L, G, B1, B2, B3, i, kept));
    float y = x;
    if constexpr (PROX == kHard || PROX == kRelax) {
      float h = Q[0];
      for (int j = 0; j < 3; ++j) h = M[j] < x ? Q[j + 1] : h;
      y = PROX == kHard ? h : keep * x + theta * h;
    } else if constexpr (PROX == kParq) {
      float lo = Q[0], hi = Q[3];
      for (int j = 0; j < 4; ++j) lo = Q[j] < x ? Q[j] : lo;
      for (int j = 3; j >= 0; --j) hi = Q[j] < x ? hi : Q[j];
      y = prox_parq(x, lo, hi, rho);
    }
    out[i] = static_cast<T>(finite(x) ? y : x);  // a non-finite x is written as it is
  }
  return kept;
}

template <Pattern P, int PROX, typename T>
int step_loop(const StepSource<T>& src, int64_t o, int64_t n, const Levels4& lv,
                  const OpArgs& a) {
  auto at = [o](T* t) { return t != nullptr ? t + o : nullptr; };
  return step_loop_impl<P, PROX, T>(*src.s, src.lat + o, src.grad + o, at(src.b1), at(src.b2),
                                    at(src.b3), src.p + o, n, lv, a);
}

// Does the single loop serve this call (non-update steps without a shrink)? The
// general path serves the rest (the shrink, the first step of a momentum buffer).
inline bool step_loop_serves(const OpArgs& a, const StepArgs& s) {
  const int64_t prox = a.prox_kind;
  return !a.update && !s.init_buf && a.K <= 4 && a.gamma == 1.0f &&
         (prox == kNone || prox == kHard || prox == kParq || prox == kRelax);
}

// The single loop over [o, o + n) of a row whose levels are Qrow; returns nonzero when an
// element kept its old values (a non-finite update).
template <typename T>
int step_loop_row(const StepSource<T>& src, int64_t o, int64_t n, const float* Qrow,
                      const OpArgs& a) {
  const int64_t prox = a.prox_kind;
  const Levels4 lv = pad_levels(Qrow, static_cast<int>(a.K));
  const StepArgs& s = *src.s;
  const Pattern p = s.kind == kSgd ? (s.has_momentum ? Pattern::kSgdMomentum : Pattern::kSgd)
                                   : (s.amsgrad ? Pattern::kAdamAmsgrad : Pattern::kAdam);
#define PARQ_STEP_LOOP(PAT)                                              \
  switch (prox) {                                                        \
    case kNone:                                                          \
      return step_loop<PAT, kNone>(src, o, n, lv, a);                    \
    case kHard:                                                          \
      return step_loop<PAT, kHard>(src, o, n, lv, a);                    \
    case kParq:                                                          \
      return step_loop<PAT, kParq>(src, o, n, lv, a);                    \
    default:                                                             \
      return step_loop<PAT, kRelax>(src, o, n, lv, a);                   \
  }
  switch (p) {
    case Pattern::kSgd:
      PARQ_STEP_LOOP(Pattern::kSgd)
    case Pattern::kSgdMomentum:
      PARQ_STEP_LOOP(Pattern::kSgdMomentum)
    case Pattern::kAdam:
      PARQ_STEP_LOOP(Pattern::kAdam)
    default:
      PARQ_STEP_LOOP(Pattern::kAdamAmsgrad)
  }
#undef PARQ_STEP_LOOP
}

}  // namespace parq

// The fused step's loop for non-update steps (the common step: levels are recomputed
// once per quant_period): one pass over a row range that applies the base update to the
// latent and its state, projects onto the stored levels and stores p, in vector
// registers on every level and dtype (step_vec.h).
//
// Served here: level sets of K <= 4 (1-bit, ternary, 2-bit), prox maps NONE / HARD /
// PARQ / RELAX / PROXQUANT_L1 / PROXQUANT_L2, no shrink, not the first step of a
// momentum buffer. The same float operations as the general path (sources.h +
// write_pass.h), except that PARQ multiplies by 1 / rho (project4.h). Anything else goes
// through the general path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../base_update.h"
#include "../levels.h"
#include "project4.h"
#include "row_stats.h"
#include "level.h"
#include "sources.h"
#include "step_vec.h"

PARQ_CPU_BEGIN

template <Pattern P, int PROX, typename T>
int step_loop_src(const StepSource<T>& src, int64_t o, int64_t n, const Levels4& lv,
              const OpArgs& a) {
  auto at = [o](T* t) { return t != nullptr ? t + o : nullptr; };
  const ProjectArgs pa{1.0f / a.prox_arg, a.relax_keep, a.prox_arg, a.prox_arg, a.l2_denom};
  return step_loop<P, PROX, T>(*src.s, src.lat + o, src.grad + o, at(src.b1), at(src.b2),
                               at(src.b3), src.p + o, n, lv, pa);
}

// Does the single loop serve this call (non-update steps without a shrink)? The
// general path serves the rest (the shrink, the first step of a momentum buffer).
inline bool step_loop_serves(const OpArgs& a, const StepArgs& s) {
  const int64_t prox = a.prox_kind;
  const bool parq_ok = prox != kParq || std::isfinite(1.0f / a.prox_arg);  // not a denormal rho
  return !a.update && !s.init_buf && a.K <= 4 && a.gamma == 1.0f && parq_ok &&
         (prox == kNone || prox == kHard || prox == kParq || prox == kRelax ||
          prox == kProxQuantL1 || prox == kProxQuantL2);
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
      return step_loop_src<PAT, kNone>(src, o, n, lv, a);                    \
    case kHard:                                                          \
      return step_loop_src<PAT, kHard>(src, o, n, lv, a);                    \
    case kParq:                                                          \
      return step_loop_src<PAT, kParq>(src, o, n, lv, a);                    \
    case kProxQuantL1:                                                   \
      return step_loop_src<PAT, kProxQuantL1>(src, o, n, lv, a);             \
    case kProxQuantL2:                                                   \
      return step_loop_src<PAT, kProxQuantL2>(src, o, n, lv, a);             \
    default:                                                             \
      return step_loop_src<PAT, kRelax>(src, o, n, lv, a);                   \
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

PARQ_CPU_END

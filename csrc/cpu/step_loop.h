// The fused step's loop for non-update steps (the common step: levels are recomputed
// once per quant_period): one pass over a row range that applies the base update to the
// latent and its state, projects onto the stored levels and stores p, in vector
// registers on every level and dtype (step_vec.h).
//
// Served here: level sets of K <= 16 (1 to 4 bits) with prox maps NONE / HARD / PARQ, and
// of K <= 4 also RELAX / PROXQUANT_L1 / PROXQUANT_L2; no shrink, not the first step of a
// momentum buffer. The same float operations as the general path (sources.h +
// write_pass.h), except that PARQ multiplies by 1 / rho (project_levels.h). Anything else
// goes through the general path. bf16 on AVX2 / AVX-512 takes step_bf16.h's loop.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../base_update.h"
#include "../levels.h"
#include "level.h"
#include "level_search.h"
#include "project_levels.h"
#include "row_stats.h"
#include "sources.h"
#include "step_bf16.h"
#include "step_vec.h"

PARQ_CPU_BEGIN

template <Pattern P, int PROX, int NL, typename T>
int step_loop_src(const StepSource<T>& src, int64_t o, int64_t n, const float* Qrow,
                  const OpArgs& a) {
  auto at = [o](T* t) { return t != nullptr ? t + o : nullptr; };
  const ProjectArgs pa{1.0f / a.prox_arg, a.relax_keep, a.prox_arg, a.prox_arg, a.l2_denom};
  const LevelsN<NL> lv = pad_levels<NL>(Qrow, static_cast<int>(a.K));
  return with_search<PROX>(lv, [&](auto search) {
    constexpr bool S = decltype(search)::value;
    if constexpr (std::is_same_v<T, c10::BFloat16> && kBf16Lanes) {
      if (bf16_loop_serves<PROX>(lv)) {
        return step_loop_bf16<P, PROX, NL, S>(*src.s, src.lat + o, src.grad + o, at(src.b1),
                                              at(src.b2), at(src.b3), src.p + o, n, lv, pa);
      }
    }
    return step_loop<P, PROX, NL, T, S>(*src.s, src.lat + o, src.grad + o, at(src.b1),
                                        at(src.b2), at(src.b3), src.p + o, n, lv, pa);
  });
}

// Does the single loop serve this call (non-update steps without a shrink)? The
// general path serves the rest (the shrink, the first step of a momentum buffer).
inline bool step_loop_serves(const OpArgs& a, const StepArgs& s) {
  const int64_t prox = a.prox_kind;
  const bool parq_ok = prox != kParq || std::isfinite(1.0f / a.prox_arg);  // not a denormal rho
  const bool any_k = prox == kNone || prox == kHard || prox == kParq;
  const bool k4 = prox == kRelax || prox == kProxQuantL1 || prox == kProxQuantL2;
  return !a.update && !s.init_buf && a.gamma == 1.0f && parq_ok &&
         ((any_k && a.K <= kMaxFastLevels) || (k4 && a.K <= 4));
}

template <Pattern P, int NL, typename T>
int step_loop_prox(const StepSource<T>& src, int64_t o, int64_t n, const float* Qrow,
                   const OpArgs& a) {
  switch (a.prox_kind) {
    case kNone:
      return step_loop_src<P, kNone, 4>(src, o, n, Qrow, a);
    case kHard:
      return step_loop_src<P, kHard, NL>(src, o, n, Qrow, a);
    case kParq:
      return step_loop_src<P, kParq, NL>(src, o, n, Qrow, a);
    default:
      break;
  }
  if constexpr (NL == 4) {  // step_loop_serves: K <= 4 only
    switch (a.prox_kind) {
      case kProxQuantL1:
        return step_loop_src<P, kProxQuantL1, 4>(src, o, n, Qrow, a);
      case kProxQuantL2:
        return step_loop_src<P, kProxQuantL2, 4>(src, o, n, Qrow, a);
      default:
        return step_loop_src<P, kRelax, 4>(src, o, n, Qrow, a);
    }
  }
  return 0;  // not reached (step_loop_serves)
}

// The single loop over [o, o + n) of a row whose levels are Qrow; returns nonzero when an
// element kept its old values (a non-finite update).
template <typename T>
int step_loop_row(const StepSource<T>& src, int64_t o, int64_t n, const float* Qrow,
                  const OpArgs& a) {
  const StepArgs& s = *src.s;
  const Pattern p = s.kind == kSgd ? (s.has_momentum ? Pattern::kSgdMomentum : Pattern::kSgd)
                                   : (s.amsgrad ? Pattern::kAdamAmsgrad : Pattern::kAdam);
  return with_level_slots(a.K, [&](auto nl) {
    constexpr int NL = decltype(nl)::value;
    switch (p) {
      case Pattern::kSgd:
        return step_loop_prox<Pattern::kSgd, NL>(src, o, n, Qrow, a);
      case Pattern::kSgdMomentum:
        return step_loop_prox<Pattern::kSgdMomentum, NL>(src, o, n, Qrow, a);
      case Pattern::kAdam:
        return step_loop_prox<Pattern::kAdam, NL>(src, o, n, Qrow, a);
      default:
        return step_loop_prox<Pattern::kAdamAmsgrad, NL>(src, o, n, Qrow, a);
    }
  });
}

PARQ_CPU_END

// The fused step's loop for non-update steps (the common step: levels are recomputed
// once per quant_period), over blocks of kStepBlock elements of a row: the base update
// of the latent and its state (one vectorized loop, into an L1 buffer), the projection
// onto the stored levels (project4.h) and the store of p (streaming for fp32 with
// AVX-512): one sweep over memory. float32 with AVX-512 takes step_avx512.h's loop
// (the same operations, in registers, without the buffer).
//
// Served here: level sets of K <= 4 (1-bit, ternary, 2-bit), prox maps NONE / HARD /
// PARQ / RELAX / PROXQUANT_L1 / PROXQUANT_L2, no shrink, not the first step of a
// momentum buffer (ProxQuant on the buffered loop only). The same float
// operations as the general path (sources.h + write_pass.h), except that PARQ
// multiplies by 1 / rho (project4.h). Anything else goes through the general path.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../base_update.h"
#include "../levels.h"
#include "project4.h"
#include "row_stats.h"
#include "sources.h"
#include "step_avx512.h"

namespace parq {

constexpr int64_t kStepBlock = 512;  // elements per L1 block of the portable loop

// One row range [o, o + n) (restrict pointers: distinct tensors, validated).
template <Pattern P, int PROX, typename T>
int step_loop_impl(const StepArgs& s, T* __restrict__ L, const T* __restrict__ G,
                   T* __restrict__ B1, T* __restrict__ B2, T* __restrict__ B3,
                   T* __restrict__ out, int64_t n, const Levels4& lv, const OpArgs& a) {
  const ProjectArgs pa{1.0f / a.prox_arg, a.relax_keep, a.prox_arg, a.prox_arg, a.l2_denom};
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> &&
                (PROX == kNone || PROX == kHard || PROX == kParq || PROX == kRelax)) {
    return avx512::step_loop<P, PROX>(s, L, G, B1, B2, B3, out, n, lv, pa);
  }
#endif
  alignas(64) float ys[kStepBlock];
  int kept = 0;
  for (int64_t b = 0; b < n; b += kStepBlock) {
    const int64_t m = std::min(kStepBlock, n - b);
    T* lb = L + b;
    const T* gb = G + b;
    T* b1 = B1 ? B1 + b : nullptr;
    T* b2 = B2 ? B2 + b : nullptr;
    T* b3 = B3 ? B3 + b : nullptr;
    for (int64_t i = 0; i < m; ++i) {
      ys[i] = static_cast<float>(update_element<P, false>(s, lb, gb, b1, b2, b3, i, kept));
    }
    project_block<PROX>(ys, m, lv, pa);
    store_block(out + b, ys, m);
  }
  return kept;  // the streaming stores are fenced once per thread (stream_fence)
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
      return step_loop<PAT, kNone>(src, o, n, lv, a);                    \
    case kHard:                                                          \
      return step_loop<PAT, kHard>(src, o, n, lv, a);                    \
    case kParq:                                                          \
      return step_loop<PAT, kParq>(src, o, n, lv, a);                    \
    case kProxQuantL1:                                                   \
      return step_loop<PAT, kProxQuantL1>(src, o, n, lv, a);             \
    case kProxQuantL2:                                                   \
      return step_loop<PAT, kProxQuantL2>(src, o, n, lv, a);             \
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

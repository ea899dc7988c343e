// The fused step's bf16 loops on the x86 levels (AVX2, AVX-512, the SSE2 baseline):
// step_loop's non-update pass and update_into's first pass of update steps (step_vec.h)
// with bf16_lanes.h's conversions:
//
// * a block of 2 kW elements is checked once (every new latent and state value finite as
//   stored, on the absolute bits: one integer max per vector), then rounded without a
//   NaN case; the latent as stored is the rounded bits, not a second conversion;
// * the projection skips the select that keeps non-finite x (x is finite, and so are the
//   levels: levels_finite), so p is finite and rounds the same way; HARD maps the stored
//   bf16 latent to p in 16-bit lanes (HardBf16, bf16_lanes.h).
//
// A block with a value that is not finite as stored goes through the scalar code
// (update_element, project_one) element by element: the same operations, so the same
// bits as step_vec.h's loops and the general path (tests/test_cpu_levels.py).
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../base_update.h"
#include "bf16_lanes.h"
#include "level.h"
#include "level_search.h"
#include "project_levels.h"
#include "simd.h"
#include "sources.h"
#include "step_vec.h"

PARQ_CPU_BEGIN

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2) || defined(PARQ_VEC_SSE2)
// Does step_loop_bf16 serve these levels? Finite (then p is finite too), and for HARD
// sorted (HardBf16 counts the midpoints below x, the chain takes the last one).
template <int PROX, int NL>
inline bool bf16_loop_serves(const LevelsN<NL>& l) {
  bool fine = true;
  for (int j = 0; j < NL; ++j) fine = fine && std::isfinite(l.Q[j]);
  if constexpr (PROX == kHard) {
    for (int j = 0; j + 1 < NL; ++j) fine = fine && l.Q[j] <= l.Q[j + 1];
  }
  return fine;
}

// One block of 2 kW elements at i, both loops' first half: the base update (update_vec)
// and, where every new latent and state value is finite as stored, their bf16 stores.
// Returns false, having stored nothing, when one is not: the caller redoes the block per
// element.
struct Bf16Block {
  IVec r0, r1;  // Bf16Round::rne of the new latent's two halves
  IVec stored;  // narrow_hi(r0, r1): what L holds now
};
template <Pattern P, bool kInit>
inline __attribute__((always_inline)) bool update_block_bf16(
    const StepV& sv, const Bf16Round& rd, c10::BFloat16* L, const c10::BFloat16* G,
    c10::BFloat16* B1, c10::BFloat16* B2, c10::BFloat16* B3, int64_t i, Bf16Block& b) {
  constexpr bool kAdamLike = P == Pattern::kAdam || P == Pattern::kAdamAmsgrad;
  constexpr bool kAms = P == Pattern::kAdamAmsgrad;
  prefetch_update<P>(L, G, B1, B2, B3, i);
  const Bf16Pair l0 = widen(L + i), gr = widen(G + i);
  Bf16Pair o1{}, o2{}, o3{};
  if constexpr (P != Pattern::kSgd && !kInit) o1 = widen(B1 + i);
  if constexpr (kAdamLike) o2 = widen(B2 + i);
  if constexpr (kAms) o3 = widen(B3 + i);
  Vec w[2], n1[2], n2[2], n3[2];
  for (int j = 0; j < 2; ++j) {
    w[j] = update_vec<P, kInit>(sv, l0.v[j], gr.v[j], o1.v[j], o2.v[j], o3.v[j], n1[j], n2[j],
                                n3[j]);
  }
  if (__builtin_expect(rd.any_not_finite<P>(w, n1, n2, n3), 0)) return false;
  b.r0 = rd.rne(w[0]);
  b.r1 = rd.rne(w[1]);
  b.stored = narrow_hi(b.r0, b.r1);
  istore(L + i, b.stored);
  if constexpr (P != Pattern::kSgd) istore(B1 + i, rd.narrow(n1));
  if constexpr (kAdamLike) istore(B2 + i, rd.narrow(n2));
  if constexpr (kAms) istore(B3 + i, rd.narrow(n3));
  return true;
}

// update_into (step_vec.h) for bf16: the same results, bit for bit.
template <Pattern P, bool kInit>
int update_into_bf16(const StepArgs& s_arg, c10::BFloat16* __restrict__ L,
                     const c10::BFloat16* __restrict__ G, c10::BFloat16* __restrict__ B1,
                     c10::BFloat16* __restrict__ B2, c10::BFloat16* __restrict__ B3,
                     float* __restrict__ xs, int64_t n) {
  const StepArgs s = s_arg;  // a local copy: its scalars stay in registers
  const StepV sv(s);
  const Bf16Round rd;
  constexpr int64_t E = 2 * kW;
  int kept = 0;
  auto scalar = [&](int64_t k) {
    xs[k] = static_cast<float>(update_element<P, kInit>(s, L, G, B1, B2, B3, k, kept));
  };
  int64_t i = 0;
  for (; i + E <= n; i += E) {
    Bf16Block b;
    if (update_block_bf16<P, kInit>(sv, rd, L, G, B1, B2, B3, i, b)) {
      store_natural(xs + i, rd.as_stored(b.r0), rd.as_stored(b.r1));
    } else {  // per element
      for (int64_t k = i; k < i + E; ++k) scalar(k);
    }
  }
  for (; i < n; ++i) scalar(i);
  return kept;
}

// step_loop (step_vec.h) for bf16: the same results, bit for bit.
template <Pattern P, int PROX, int NL, bool kSearch = false>
int step_loop_bf16(const StepArgs& s_arg, c10::BFloat16* __restrict__ L,
                   const c10::BFloat16* __restrict__ G, c10::BFloat16* __restrict__ B1,
                   c10::BFloat16* __restrict__ B2, c10::BFloat16* __restrict__ B3,
                   c10::BFloat16* __restrict__ out, int64_t n, const LevelsN<NL>& lv_arg,
                   const ProjectArgs& pa_arg) {
  using BF = c10::BFloat16;
  const StepArgs s = s_arg;  // local copies: the loop's stores cannot reach them
  const LevelsN<NL> lv = lv_arg;
  const ProjectArgs pa = pa_arg;
  const StepV sv(s);
  const auto lvv = levels_vec<PROX, NL, kSearch>(lv, pa);
  const Bf16Round rd;
  struct None {
    None(const float*, const float*) {}
  };
  constexpr bool kHardLanes = PROX == kHard && kHardBf16Lanes;
  const std::conditional_t<kHardLanes, HardBf16<NL>, None> hard(lv.Q, lv.M);
  constexpr int64_t E = 2 * kW;
  int kept = 0;
  auto scalar = [&](int64_t i) {
    const float x = static_cast<float>(update_element<P, false>(s, L, G, B1, B2, B3, i, kept));
    out[i] = static_cast<BF>(project_one<PROX, NL>(x, lv, pa));
  };
  int64_t i = 0;
  for (; i < n && !stream_aligned(out + i); ++i) scalar(i);
  for (; i + E <= n; i += E) {
    Bf16Block b;
    if (!update_block_bf16<P, false>(sv, rd, L, G, B1, B2, B3, i, b)) {  // per element
      for (int64_t k = i; k < i + E; ++k) scalar(k);
      continue;
    }
    if constexpr (kHardLanes) {  // in bf16's 16-bit lanes
      istream(out + i, hard(b.stored));
      continue;
    }
    Vec x[2] = {rd.as_stored(b.r0), rd.as_stored(b.r1)};
    if constexpr (PROX != kNone) {
      for (int j = 0; j < 2; ++j) x[j] = project_vec<PROX, NL, true>(x[j], lvv);
    }
    istream(out + i, rd.narrow(x));
  }
  for (; i < n; ++i) scalar(i);
  return kept;
}
#endif

PARQ_CPU_END

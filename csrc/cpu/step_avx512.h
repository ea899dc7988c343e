// The fused step's non-update loop for float32 with AVX-512: one pass per 16 elements,
// everything in registers (base update, finiteness, projection, streaming store of p).
//
// The same float operations in the same order as the portable loop (step_loop.h:
// update_element of sources.h / base_update.h, then project4.h), so both give the same
// bits; written with intrinsics because the portable loop has to go through an L1
// buffer (GCC's code for the projection's selects is poor when it is fused with the
// update), and that round trip costs about a tenth of the step. No FMA: each
// multiply and add rounds as in the scalar code. The head (until p is 64-byte
// aligned) and the tail go through the portable per-element code. The same update
// also serves the first pass of update steps (update_into) and the pipelined update
// rows (step_update.h).
#pragma once

#if defined(__AVX512F__)

#include <immintrin.h>

#include <cstdint>

#include "../base_update.h"
#include "project4.h"
#include "sources.h"

namespace parq {
namespace avx512 {

inline __m512 bc(float v) { return _mm512_set1_ps(v); }
inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
// finite(v): v - v == 0 (NaN for NaN and +-Inf)
inline __mmask16 finite16(__m512 v) {
  return _mm512_cmp_ps_mask(sub(v, v), _mm512_setzero_ps(), _CMP_EQ_OQ);
}

// Software prefetch of the streams the update reads, kPrefetch elements (2 KB) ahead of
// element i. The loops do enough arithmetic per line that the hardware prefetcher alone
// leaves their loads waiting: with it the loop runs at the speed of torch's fused SGD
// on this project's CPU (a C++ micro-benchmark: 1.16-1.26x -> 0.98-1.07x). A prefetch
// past the end of a buffer is harmless (it never faults).
constexpr int64_t kPrefetch = 512;

inline __attribute__((always_inline)) void prefetch_line(const float* t) {
  _mm_prefetch(reinterpret_cast<const char*>(t), _MM_HINT_T0);
}

// (Plain calls: GCC 12 dropped these prefetches when they were made in a lambda.)
template <Pattern P>
inline __attribute__((always_inline)) void prefetch16(const float* L, const float* G,
                                                      const float* B1, const float* B2,
                                                      const float* B3, int64_t i) {
  prefetch_line(L + i + kPrefetch);
  prefetch_line(G + i + kPrefetch);
  if constexpr (P != Pattern::kSgd) prefetch_line(B1 + i + kPrefetch);
  constexpr bool kAdamLike = P == Pattern::kAdam || P == Pattern::kAdamAmsgrad;
  if constexpr (kAdamLike) prefetch_line(B2 + i + kPrefetch);
  if constexpr (P == Pattern::kAdamAmsgrad) prefetch_line(B3 + i + kPrefetch);
}

// The base update of 16 elements at i (base_update.h, in its order); the rejected
// lanes (a non-finite new latent or state) keep their old values. Returns the latent
// as stored; ok collects the accepted lanes.
template <Pattern P>
inline __attribute__((always_inline)) __m512 update16(const StepArgs& s, float* L,
                                                      const float* G, float* B1, float* B2,
                                                      float* B3, int64_t i, __mmask16& ok) {
  const __m512 l0 = _mm512_loadu_ps(L + i);
  __m512 g = mul(_mm512_loadu_ps(G + i), bc(s.gsign));
  __m512 w;
  __mmask16 fine;
  if constexpr (P == Pattern::kSgd || P == Pattern::kSgdMomentum) {
    g = add(g, mul(bc(s.l2), l0));
    if constexpr (P == Pattern::kSgdMomentum) {
      const __m512 b0 = _mm512_loadu_ps(B1 + i);
      const __m512 buf = add(mul(b0, bc(s.momentum)), mul(bc(s.keep_grad), g));
      g = add(mul(bc(s.nest_g), g), mul(bc(s.nest_b), buf));
      w = add(l0, mul(bc(s.neg_lr), g));
      fine = finite16(w) & finite16(buf);
      _mm512_storeu_ps(B1 + i, _mm512_mask_blend_ps(fine, b0, buf));
    } else {
      w = add(l0, mul(bc(s.neg_lr), g));
      fine = finite16(w);
    }
  } else {
    constexpr bool kAms = P == Pattern::kAdamAmsgrad;
    const __m512 m0 = _mm512_loadu_ps(B1 + i), v0 = _mm512_loadu_ps(B2 + i);
    const __m512 wd = mul(l0, bc(s.decay));
    g = add(g, mul(bc(s.l2), wd));
    const __m512 d = sub(g, m0);
    const __m512 m = add(mul(bc(s.lerp_a), add(m0, mul(bc(s.lerp_w), d))),
                         mul(bc(s.lerp_b), sub(g, mul(d, bc(s.lerp_w_comp)))));
    const __m512 v = add(mul(v0, bc(s.beta2)), mul(mul(bc(s.one_minus_beta2), g), g));
    __m512 vv = v, x0{}, vmax{};
    if constexpr (kAms) {
      x0 = _mm512_loadu_ps(B3 + i);
      const __mmask16 take = _mm512_cmp_ps_mask(v, x0, _CMP_GT_OQ) |
                             _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // torch.maximum
      vmax = _mm512_mask_blend_ps(take, x0, v);
      vv = vmax;
    }
    const __m512 denom = add(mul(_mm512_sqrt_ps(vv), bc(s.inv_bc2_sqrt)), bc(s.eps));
    w = add(wd, _mm512_div_ps(mul(bc(s.neg_step_size), m), denom));
    fine = finite16(w) & finite16(m) & finite16(v);
    if constexpr (kAms) {
      fine &= finite16(vmax);
      _mm512_storeu_ps(B3 + i, _mm512_mask_blend_ps(fine, x0, vmax));
    }
    _mm512_storeu_ps(B1 + i, _mm512_mask_blend_ps(fine, m0, m));
    _mm512_storeu_ps(B2 + i, _mm512_mask_blend_ps(fine, v0, v));
  }
  ok &= fine;
  const __m512 lt = _mm512_mask_blend_ps(fine, l0, w);
  _mm512_storeu_ps(L + i, lt);
  return lt;
}

// The base update of n elements into xs (the general path's first pass on update steps:
// sources.h); the vector body, then the rest per element. Returns 1 if a lane kept its
// old values.
template <Pattern P>
int update_into(const StepArgs& s_arg, float* __restrict__ L, const float* __restrict__ G,
                float* __restrict__ B1, float* __restrict__ B2, float* __restrict__ B3,
                float* __restrict__ xs, int64_t n) {
  const StepArgs s = s_arg;  // a local copy: its scalars stay in registers (see step_loop)
  int kept = 0;
  __mmask16 ok = 0xFFFF;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch16<P>(L, G, B1, B2, B3, i);
    _mm512_storeu_ps(xs + i, update16<P>(s, L, G, B1, B2, B3, i, ok));
  }
  for (; i < n; ++i) xs[i] = update_element<P, false>(s, L, G, B1, B2, B3, i, kept);
  return kept | (ok != 0xFFFF);
}

// One row range of n elements (pointers at its start); returns 1 if a lane kept its
// old values. Served: the patterns of Pattern, PROX in NONE / HARD / PARQ / RELAX.
template <Pattern P, int PROX>
int step_loop(const StepArgs& s_arg, float* __restrict__ L, const float* __restrict__ G,
              float* __restrict__ B1, float* __restrict__ B2, float* __restrict__ B3,
              float* __restrict__ out, int64_t n, const Levels4& lv_arg,
              const ProjectArgs& pa_arg) {
  // Local copies of the scalars and levels: the stores of the loop cannot reach them, so
  // their broadcasts are hoisted out of the loop (through the references GCC reloaded
  // and re-broadcast a dozen of them per 16 elements).
  const StepArgs s = s_arg;
  const Levels4 lv = lv_arg;
  const ProjectArgs pa = pa_arg;
  int kept = 0;
  auto scalar = [&](int64_t i) {
    const float x = update_element<P, false>(s, L, G, B1, B2, B3, i, kept);
    out[i] = project4<PROX>(x, lv, pa);
  };
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0; ++i) scalar(i);
  __mmask16 ok = 0xFFFF;
  for (; i + 16 <= n; i += 16) {
    prefetch16<P>(L, G, B1, B2, B3, i);
    const __m512 x = update16<P>(s, L, G, B1, B2, B3, i, ok);
    _mm512_stream_ps(out + i, PROX == kNone ? x : project16<PROX>(x, lv, pa));
  }
  for (; i < n; ++i) scalar(i);
  return kept | (ok != 0xFFFF);
}

}  // namespace avx512
}  // namespace parq

#endif  // __AVX512F__

// The fused step's base update in vector registers, every level and dtype (simd.h): the
// update of one Pack<T> (kW float32 elements, or 2 kW bf16 / fp16 elements converted in
// registers), the loop of non-update steps (update, finiteness, projection onto the stored
// levels, streaming store of p: one pass per vector, nothing through memory buffers) and
// the first pass of update steps (the new latent into a float32 buffer).
//
// The same float operations in the same order as the scalar update_element (sources.h,
// base_update.h) and project_one (project_levels.h), so every level gives the same bits as the
// scalar code. No FMA: each multiply and add rounds as in the scalar code. The head of a
// row (until p is aligned for streaming stores) and its tail go through the scalar code.
#pragma once

#include <cstdint>

#include "../base_update.h"
#include "bf16_lanes.h"
#include "level.h"
#include "level_search.h"
#include "project_levels.h"
#include "simd.h"
#include "sources.h"

PARQ_CPU_BEGIN

// StepArgs' scalars broadcast once per row range (outside the loops), and its option flags.
struct StepV {
  Vec gsign, l2, neg_lr, momentum, keep_grad, decay, lerp_w, lerp_w_comp, beta2,
      one_minus_beta2, eps, neg_step_size, inv_bc2_sqrt;
  bool maximize, has_wd, nesterov, decoupled, lerp_small;  // base_update.h's branches
  explicit StepV(const StepArgs& s)
      : gsign(s.gsign), l2(s.l2), neg_lr(s.neg_lr), momentum(s.momentum),
        keep_grad(s.keep_grad), decay(s.decay), lerp_w(s.lerp_w), lerp_w_comp(s.lerp_w_comp),
        beta2(s.beta2), one_minus_beta2(s.one_minus_beta2), eps(s.eps),
        neg_step_size(s.neg_step_size), inv_bc2_sqrt(s.inv_bc2_sqrt), maximize(s.maximize),
        has_wd(s.has_wd), nesterov(s.nesterov), decoupled(s.decoupled),
        lerp_small(s.lerp_small) {}
};

// Prefetch of the streams the update reads, kPrefetch elements ahead of element i.
template <Pattern P, typename T>
inline __attribute__((always_inline)) void prefetch_update(const T* L, const T* G,
                                                           const T* B1, const T* B2,
                                                           const T* B3, int64_t i) {
  prefetch(L + i + kPrefetch);
  prefetch(G + i + kPrefetch);
  if constexpr (P != Pattern::kSgd) prefetch(B1 + i + kPrefetch);
  if constexpr (P == Pattern::kAdam || P == Pattern::kAdamAmsgrad) prefetch(B2 + i + kPrefetch);
  if constexpr (P == Pattern::kAdamAmsgrad) prefetch(B3 + i + kPrefetch);
}

// The base update of one vector (base_update.h, in its order and with its branches; kInit: torch's first
// momentum step, buf = g): returns the new latent; n1, n2, n3 get the new state (o1, o2,
// o3 the old; those the pattern does not have are not read).
template <Pattern P, bool kInit>
inline __attribute__((always_inline)) Vec update_vec(const StepV& s, Vec l0, Vec gr, Vec o1,
                                                     Vec o2, Vec o3, Vec& n1, Vec& n2,
                                                     Vec& n3) {
  constexpr bool kAdamLike = P == Pattern::kAdam || P == Pattern::kAdamAmsgrad;
  Vec g = s.maximize ? gr * s.gsign : gr;
  if constexpr (!kAdamLike) {
    if (s.has_wd) g = g + s.l2 * l0;
    if constexpr (P == Pattern::kSgdMomentum) {
      const Vec buf = kInit ? g : o1 * s.momentum + s.keep_grad * g;
      n1 = buf;
      g = s.nesterov ? g + s.momentum * buf : buf;
    }
    return l0 + s.neg_lr * g;
  } else {
    Vec wd = l0;
    if (s.has_wd) {
      if (s.decoupled) {
        wd = l0 * s.decay;
      } else {
        g = g + s.l2 * l0;
      }
    }
    const Vec m0 = o1, d = g - m0;
    const Vec m = s.lerp_small ? m0 + s.lerp_w * d : g - d * s.lerp_w_comp;
    const Vec v = o2 * s.beta2 + s.one_minus_beta2 * g * g;
    Vec vv = v;
    if constexpr (P == Pattern::kAdamAmsgrad) {  // torch.maximum: NaN propagates
      n3 = select(mask_or(gt(v, o3), unordered(v)), o3, v);
      vv = n3;
    }
    const Vec denom = vv.sqrt() * s.inv_bc2_sqrt + s.eps;
    n1 = m;
    n2 = v;
    return wd + (s.neg_step_size * m) / denom;
  }
}

// The base update of one Pack at i (update_vec per vector). A lane is accepted when its
// new latent and state are finite as stored in T (stored_finite); a rejected lane keeps
// its old values and clears `ok`. Returns the latent as stored. The common case, every
// lane accepted, stores the new values converted once; only a vector with a rejected
// lane blends.
template <Pattern P, bool kInit, typename T>
inline __attribute__((always_inline)) Pack<T> update_pack(const StepV& s, T* L, const T* G,
                                                          T* B1, T* B2, T* B3, int64_t i,
                                                          bool& ok) {
  using PK = Pack<T>;
  constexpr int N = PK::N;
  constexpr bool kAdamLike = P == Pattern::kAdam || P == Pattern::kAdamAmsgrad;
  constexpr bool kAms = P == Pattern::kAdamAmsgrad;
  const PK l0 = PK::load(L + i), gr = PK::load(G + i);
  PK w, n1, n2, n3, o1, o2, o3;
  if constexpr (P != Pattern::kSgd) o1 = PK::load(B1 + i);
  if constexpr (kAdamLike) o2 = PK::load(B2 + i);
  if constexpr (kAms) o3 = PK::load(B3 + i);
  for (int j = 0; j < N; ++j) {
    w.v[j] = update_vec<P, kInit>(s, l0.v[j], gr.v[j], o1.v[j], o2.v[j], o3.v[j], n1.v[j],
                                  n2.v[j], n3.v[j]);
  }
  const auto w_stored = w.packed();
  PK x = PK::unpack(w_stored);  // the new latent as stored
  auto fine = [&](int j) {  // the lanes whose new latent and state are finite as stored
    Mask f = stored_finite<T>(x.v[j]);
    if constexpr (P != Pattern::kSgd) f = mask_and(f, stored_finite<T>(n1.v[j]));
    if constexpr (kAdamLike) f = mask_and(f, stored_finite<T>(n2.v[j]));
    if constexpr (kAms) f = mask_and(f, stored_finite<T>(n3.v[j]));
    return f;
  };
  bool all = true;
  for (int j = 0; j < N; ++j) {
    if constexpr (std::is_same_v<T, float>) {
      // the same test in fewer ops: v - v is +0 for a finite v and NaN for inf / NaN, and
      // the sum carries a NaN (a float32 value is stored as it is)
      Vec z = x.v[j] - x.v[j];
      if constexpr (P != Pattern::kSgd) z = z + (n1.v[j] - n1.v[j]);
      if constexpr (kAdamLike) z = z + (n2.v[j] - n2.v[j]);
      if constexpr (kAms) z = z + (n3.v[j] - n3.v[j]);
      all = all && all_set(eq(z, Vec(0.0f)));
    } else {
      all = all && all_set(fine(j));
    }
  }
  if (__builtin_expect(all, 1)) {
    w_stored.store(L + i);
    if constexpr (P != Pattern::kSgd) n1.store(B1 + i);
    if constexpr (kAdamLike) n2.store(B2 + i);
    if constexpr (kAms) n3.store(B3 + i);
    return x;
  }
  ok = false;
  for (int j = 0; j < N; ++j) {  // stored as T, a kept old value is itself again
    const Mask f = fine(j);
    x.v[j] = select(f, l0.v[j], x.v[j]);
    if constexpr (P != Pattern::kSgd) n1.v[j] = select(f, o1.v[j], n1.v[j]);
    if constexpr (kAdamLike) n2.v[j] = select(f, o2.v[j], n2.v[j]);
    if constexpr (kAms) n3.v[j] = select(f, o3.v[j], n3.v[j]);
  }
  x.store(L + i);
  if constexpr (P != Pattern::kSgd) n1.store(B1 + i);
  if constexpr (kAdamLike) n2.store(B2 + i);
  if constexpr (kAms) n3.store(B3 + i);
  return x;
}

// bf16 on AVX2 / AVX-512 (step_bf16.h).
template <Pattern P, bool kInit>
int update_into_bf16(const StepArgs& s, c10::BFloat16* L, const c10::BFloat16* G,
                     c10::BFloat16* B1, c10::BFloat16* B2, c10::BFloat16* B3, float* xs,
                     int64_t n);

// The base update of n elements into xs (the first pass of update steps: sources.h); the
// vector body, then the rest per element. Returns 1 if a lane kept its old values.
template <Pattern P, bool kInit, typename T>
int update_into(const StepArgs& s_arg, T* __restrict__ L, const T* __restrict__ G,
                T* __restrict__ B1, T* __restrict__ B2, T* __restrict__ B3,
                float* __restrict__ xs, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && kBf16Lanes) {
    return update_into_bf16<P, kInit>(s_arg, L, G, B1, B2, B3, xs, n);
  }
  const StepArgs s = s_arg;  // a local copy: its scalars stay in registers
  const StepV sv(s);
  constexpr int64_t E = Pack<T>::kElems;
  int kept = 0;
  bool ok = true;
  int64_t i = 0;
  for (; i + E <= n; i += E) {
    prefetch_update<P>(L, G, B1, B2, B3, i);
    const Pack<T> lt = update_pack<P, kInit>(sv, L, G, B1, B2, B3, i, ok);
    for (int j = 0; j < Pack<T>::N; ++j) lt.v[j].store(xs + i + j * kW);
  }
  for (; i < n; ++i) {
    xs[i] = static_cast<float>(update_element<P, kInit>(s, L, G, B1, B2, B3, i, kept));
  }
  return kept | (ok ? 0 : 1);
}

// The non-update step over one row range of n elements (pointers at its start): update,
// project onto the stored levels, store p. Returns 1 if a lane kept its old values.
template <Pattern P, int PROX, int NL, typename T, bool kSearch = false>
int step_loop(const StepArgs& s_arg, T* __restrict__ L, const T* __restrict__ G,
              T* __restrict__ B1, T* __restrict__ B2, T* __restrict__ B3, T* __restrict__ out,
              int64_t n, const LevelsN<NL>& lv_arg, const ProjectArgs& pa_arg) {
  // Local copies of the scalars and levels, broadcast once: the loop's stores cannot
  // reach them (through the references GCC reloaded and re-broadcast them per vector).
  const StepArgs s = s_arg;
  const LevelsN<NL> lv = lv_arg;
  const ProjectArgs pa = pa_arg;
  const StepV sv(s);
  const auto lvv = levels_vec<PROX, NL, kSearch>(lv, pa);
  constexpr int64_t E = Pack<T>::kElems;
  int kept = 0;
  auto scalar = [&](int64_t i) {
    const float x = static_cast<float>(update_element<P, false>(s, L, G, B1, B2, B3, i, kept));
    out[i] = static_cast<T>(project_one<PROX, NL>(x, lv, pa));
  };
  int64_t i = 0;
  for (; i < n && !stream_aligned(out + i); ++i) scalar(i);
  bool ok = true;
  for (; i + E <= n; i += E) {
    prefetch_update<P>(L, G, B1, B2, B3, i);
    Pack<T> x = update_pack<P, false>(sv, L, G, B1, B2, B3, i, ok);
    if constexpr (PROX != kNone) {
      if (__builtin_expect(ok, 1)) {  // no lane rejected yet: x is finite, no select of x
        for (int j = 0; j < Pack<T>::N; ++j) x.v[j] = project_vec<PROX, NL, true>(x.v[j], lvv);
      } else {  // a kept old latent may not be finite: projected as the scalar code does
        for (int j = 0; j < Pack<T>::N; ++j) x.v[j] = project_vec<PROX, NL>(x.v[j], lvv);
      }
    }
    x.stream(out + i);
  }
  for (; i < n; ++i) scalar(i);
  return kept | (ok ? 0 : 1);
}

PARQ_CPU_END

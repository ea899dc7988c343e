// Where the CPU kernels' values come from: the two chunk sources.
//
// A row's passes (statistics, write) see its elements through a source that
// fills a float32 buffer xs = value / gamma for an element range [o, o + n):
//
// * ParamSource (quant_prox_): the first pass over a chunk copies the weights
//   p into the latent and checks finiteness; the values are the latent.
// * StepSource (fused_step_): the first pass over a chunk applies the base
//   optimizer's update to the latent and its state (base_update.h) and hands
//   on the updated latent as stored (in the parameter dtype).
//
// Later passes read the latent. A NaN/Inf never enters the latent or the state:
// such an element keeps its old values (and is flagged), see ops.py.
//
// * BufSource (update steps of the pipelined path, step_update.h): a row's values as
//   already updated into an L1 buffer; it only serves the statistics passes.
//
// Both write the projected weights to p. Everything a source does to one
// element happens in one place, so the first pass stays a single sweep over
// memory whichever source it is.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../base_update.h"
#include "level.h"
#include "row_stats.h"
#include "simd.h"

PARQ_CPU_BEGIN

// 1 for finite v, 0 for NaN or +-Inf (v - v is NaN exactly then); branch-free, so
// that the loops below stay straight-line and vectorize.
inline int finite(float v) { return static_cast<int>(v - v == 0.0f); }

// The end of a first pass: x = value / gamma; returns whether a non-finite value was
// seen. Where no element kept an old value, every value is a finite new one, and
// only a shrink by gamma < 1 could overflow: the x are checked only then.
inline bool finish(bool kept, float* xs, int64_t n, float gamma) {
  if (gamma != 1.0f) {
    for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] / gamma;
  }
  return kept || (gamma < 1.0f && !all_finite(xs, n));
}

// Stores n projected weights: whole packs converted in registers and, where p is aligned
// for them, streaming stores (p is written, never read: a streaming store saves the read
// a cached store of a whole line costs); the rest per element. Threads fence their
// streaming stores once per task (stream_fence, simd.h), not per row.
template <typename T>
inline void store_block(T* __restrict__ out, const float* __restrict__ ys, int64_t n) {
  constexpr int64_t E = Pack<T>::kElems;
  int64_t i = 0;
  for (; i < n && !stream_aligned(out + i); ++i) out[i] = static_cast<T>(ys[i]);
  for (; i + E <= n; i += E) {
    Pack<T> y;
    for (int j = 0; j < Pack<T>::N; ++j) y.v[j] = Vec::loadu(ys + i + j * kW);
    y.stream(out + i);
  }
  for (; i < n; ++i) out[i] = static_cast<T>(ys[i]);
}

// BinaryConnect's clipped latent, lat[0, n) in place: clamp in float32, stored as T (the
// reference's float32 clamp); a NaN stays NaN (torch.clamp propagates it).
template <typename T>
inline void clamp_range(T* __restrict__ lat, int64_t n, float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    const T l = lat[i];
    const float v = static_cast<float>(l);
    lat[i] = v != v ? l : static_cast<T>(clampf(v, lo, hi));
  }
}

template <typename T>
struct ParamSource {
  static constexpr bool kStep = false;
  static constexpr bool kView = false;
  static constexpr bool kAlwaysWrites = false;  // prox NONE with gamma 1 leaves p as it is
  T* p;
  T* lat;
  float gamma;

  ParamSource at(int64_t off) const { return {p + off, lat + off, gamma}; }

  // First pass: latent = p where p is finite (a NaN/Inf element keeps its old latent);
  // x = the latent / gamma. Later passes read the latent. Returns "non-finite seen".
  bool load(int64_t o, int64_t n, float* xs, bool first) const {
    if (!first) {
      load_chunk(lat + o, n, gamma, xs);
      return false;
    }
    int kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T pv = p[o + i], lv = lat[o + i];  // both loaded: no branch in the loop
      const int ok = finite(static_cast<float>(pv));
      kept += 1 - ok;
      const T v = ok ? pv : lv;
      lat[o + i] = v;
      xs[i] = static_cast<float>(v);
    }
    return finish(kept > 0, xs, n, gamma);
  }

  void store(int64_t o, int64_t n, const float* ys) const {
    for (int64_t i = 0; i < n; ++i) p[o + i] = static_cast<T>(ys[i]);
  }

  void clamp_latent(int64_t o, int64_t n, float lo, float hi) const {
    clamp_range(lat + o, n, lo, hi);
  }
};

struct BufSource {
  static constexpr bool kStep = false;
  static constexpr bool kAlwaysWrites = true;
  static constexpr bool kView = true;  // statistics read the buffer where it is
  const float* xs;  // the row's updated latent (as stored), already checked

  BufSource at(int64_t off) const { return {xs + off}; }
  const float* view(int64_t o) const { return xs + o; }

  bool load(int64_t o, int64_t n, float* out, bool) const {
    std::memcpy(out, xs + o, static_cast<size_t>(n) * sizeof(float));
    return false;  // the update that filled the buffer reports the non-finite values
  }
};

// The base update's memory pattern (which state buffers exist).
enum class Pattern { kSgd, kSgdMomentum, kAdam, kAdamAmsgrad };


// The base update of [0, n) in vector registers, into xs (defined in step_vec.h).
template <Pattern P, bool kInit, typename T>
int update_into(const StepArgs& s, T* L, const T* G, T* B1, T* B2, T* B3, float* xs, int64_t n);

// The base update of element i, in place: reads the latent, the gradient and the state,
// writes the new latent and state (each in T) and returns the new latent as stored. An
// element whose new latent or state is not finite keeps its old values (kept |= 1).
// Every operand is loaded unconditionally and selected branch-free.
template <Pattern P, bool kInit, typename T>
inline __attribute__((always_inline)) T update_element(const StepArgs& a, T* L, const T* G,
                                                       T* B1, T* B2, T* B3, int64_t i,
                                                       int& kept) {
  const T l0 = L[i];
  const float w0 = static_cast<float>(l0), g = static_cast<float>(G[i]);
  T w;
  int ok;
  if constexpr (P == Pattern::kSgd) {
    float unused = 0.0f;
    w = static_cast<T>(sgd_update<false, false>(a, w0, g, unused));
    ok = finite(static_cast<float>(w));
  } else if constexpr (P == Pattern::kSgdMomentum) {
    const T b0 = B1[i];
    float buf = static_cast<float>(b0);
    w = static_cast<T>(sgd_update<true, kInit>(a, w0, g, buf));
    const T nb = static_cast<T>(buf);
    ok = finite(static_cast<float>(w)) & finite(static_cast<float>(nb));
    B1[i] = ok ? nb : b0;
  } else {
    constexpr bool kAms = P == Pattern::kAdamAmsgrad;
    const T m0 = B1[i], v0 = B2[i];
    T x0{};
    float m = static_cast<float>(m0), v = static_cast<float>(v0), vmax = 0.0f;
    if constexpr (kAms) {
      x0 = B3[i];
      vmax = static_cast<float>(x0);
    }
    w = static_cast<T>(adam_update<kAms>(a, w0, g, m, v, vmax));
    const T nm = static_cast<T>(m), nv = static_cast<T>(v);
    ok = finite(static_cast<float>(w)) & finite(static_cast<float>(nm)) &
         finite(static_cast<float>(nv));
    if constexpr (kAms) {
      const T nx = static_cast<T>(vmax);
      ok &= finite(static_cast<float>(nx));
      B3[i] = ok ? nx : x0;
    }
    B1[i] = ok ? nm : m0;
    B2[i] = ok ? nv : v0;
  }
  kept |= ok ^ 1;  // an int OR: stays in 32-bit vector lanes
  const T lt = ok ? w : l0;
  L[i] = lt;
  return lt;
}

template <typename T>
struct StepSource {
  static constexpr bool kStep = true;
  static constexpr bool kView = false;
  static constexpr bool kAlwaysWrites = true;  // p is written, never read
  T* p;
  T* lat;
  const T* grad;
  T* b1;  // SGD momentum buffer (with momentum) / Adam exp_avg
  T* b2;  // Adam exp_avg_sq
  T* b3;  // Adam max_exp_avg_sq (amsgrad)
  const StepArgs* s;
  float gamma;

  static T* shift(T* t, int64_t off) { return t != nullptr ? t + off : nullptr; }

  StepSource at(int64_t off) const {
    return {p + off, lat + off, grad + off, shift(b1, off), shift(b2, off), shift(b3, off), s,
            gamma};
  }

  bool load(int64_t o, int64_t n, float* xs, bool first) const {
    if (!first) {
      load_chunk(lat + o, n, gamma, xs);
      return false;
    }
    return finish(update(o, n, xs), xs, n, gamma);
  }

  void store(int64_t o, int64_t n, const float* ys) const { store_block(p + o, ys, n); }

  void clamp_latent(int64_t o, int64_t n, float lo, float hi) const {
    clamp_range(lat + o, n, lo, hi);
  }

  // The base update of [o, o + n): writes the latent and the state; xs = the new latent
  // as stored (rounded to T), which is what the unfused path quantizes. An element whose
  // new latent or state is not finite (as stored) keeps its old values. Returns whether
  // any element did.
  bool update(int64_t o, int64_t n, float* xs) const {
    const StepArgs& a = *s;
    int kept;
    if (a.kind == kSgd && !a.has_momentum) {
      kept = update_range<Pattern::kSgd, false>(o, n, xs);
    } else if (a.kind == kSgd) {
      kept = a.init_buf ? update_range<Pattern::kSgdMomentum, true>(o, n, xs)
                        : update_range<Pattern::kSgdMomentum, false>(o, n, xs);
    } else if (!a.amsgrad) {
      kept = update_range<Pattern::kAdam, false>(o, n, xs);
    } else {
      kept = update_range<Pattern::kAdamAmsgrad, false>(o, n, xs);
    }
    return kept > 0;
  }

  template <Pattern P, bool kInit>
  int update_range(int64_t o, int64_t n, float* xs) const {  // vector registers: step_vec.h
    return update_into<P, kInit>(*s, lat + o, grad + o, b1 ? b1 + o : nullptr,
                                 b2 ? b2 + o : nullptr, b3 ? b3 + o : nullptr, xs, n);
  }
};

PARQ_CPU_END

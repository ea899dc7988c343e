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
// Both write the projected weights to p. Everything a source does to one
// element happens in one place, so the first pass stays a single sweep over
// memory whichever source it is.
#pragma once

#include <cstdint>
#include <cstring>

#include "../base_update.h"
#include "row_stats.h"

namespace parq {

// True for finite v (NaN and +-Inf give NaN when subtracted from themselves).
inline bool finite(float v) { return v - v == 0.0f; }

template <typename T>
struct ParamSource {
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
    bool kept = false;
    for (int64_t i = 0; i < n; ++i) {
      const bool ok = finite(static_cast<float>(p[o + i]));
      kept |= !ok;
      const T v = ok ? p[o + i] : lat[o + i];
      lat[o + i] = v;
      xs[i] = static_cast<float>(v);
    }
    if (gamma != 1.0f) {
      for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] / gamma;
    }
    return kept || !all_finite(xs, n);
  }

  void store(int64_t o, int64_t n, const float* ys) const {
    for (int64_t i = 0; i < n; ++i) p[o + i] = static_cast<T>(ys[i]);
  }
};

template <typename T>
struct StepSource {
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
    const bool kept = update(o, n, xs);
    if (gamma != 1.0f) {
      for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] / gamma;
    }
    return kept || !all_finite(xs, n);
  }

  void store(int64_t o, int64_t n, const float* ys) const {
    for (int64_t i = 0; i < n; ++i) p[o + i] = static_cast<T>(ys[i]);
  }

  // The base update of [o, o + n): writes the latent and the state; xs = the new latent
  // as stored (rounded to T), which is what the unfused path quantizes. An element whose
  // new latent or state is not finite (as stored) keeps its old values. Returns whether
  // any element did.
  bool update(int64_t o, int64_t n, float* xs) const {
    const StepArgs a = *s;
    T* L = lat + o;
    const T* G = grad + o;
    bool kept = false;
    if (a.kind == kSgd && !a.has_momentum) {
      for (int64_t i = 0; i < n; ++i) {
        float unused = 0.0f;
        const T w = static_cast<T>(sgd_update(a, static_cast<float>(L[i]),
                                              static_cast<float>(G[i]), unused));
        const bool ok = finite(static_cast<float>(w));
        kept |= !ok;
        const T v = ok ? w : L[i];
        L[i] = v;
        xs[i] = static_cast<float>(v);
      }
    } else if (a.kind == kSgd) {
      T* B = b1 + o;
      for (int64_t i = 0; i < n; ++i) {
        float buf = static_cast<float>(B[i]);  // ignored by sgd_update when init_buf
        const T w = static_cast<T>(sgd_update(a, static_cast<float>(L[i]),
                                              static_cast<float>(G[i]), buf));
        const T nb = static_cast<T>(buf);
        const bool ok = finite(static_cast<float>(w)) && finite(static_cast<float>(nb));
        kept |= !ok;
        B[i] = ok ? nb : B[i];
        const T v = ok ? w : L[i];
        L[i] = v;
        xs[i] = static_cast<float>(v);
      }
    } else {
      T* M = b1 + o;
      T* V = b2 + o;
      T* X = a.amsgrad ? b3 + o : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        float m = static_cast<float>(M[i]), v = static_cast<float>(V[i]);
        float vmax = X != nullptr ? static_cast<float>(X[i]) : 0.0f;
        const T w = static_cast<T>(adam_update(a, static_cast<float>(L[i]),
                                               static_cast<float>(G[i]), m, v, vmax));
        const T nm = static_cast<T>(m), nv = static_cast<T>(v), nx = static_cast<T>(vmax);
        const bool ok = finite(static_cast<float>(w)) && finite(static_cast<float>(nm)) &&
                        finite(static_cast<float>(nv)) && finite(static_cast<float>(nx));
        kept |= !ok;
        M[i] = ok ? nm : M[i];
        V[i] = ok ? nv : V[i];
        if (X != nullptr) X[i] = ok ? nx : X[i];
        const T lv = ok ? w : L[i];
        L[i] = lv;
        xs[i] = static_cast<float>(lv);
      }
    }
    return kept;
  }
};

}  // namespace parq

// Where the CPU kernels' values come from: the two chunk sources.
//
// A row's passes (statistics, write) see its elements through a source that
// fills a float32 buffer xs = value / gamma for an element range [o, o + n):
//
// * ParamSource (quant_prox_): the values are the weights p. The first pass
//   over a chunk also copies p into the latent and checks finiteness.
// * StepSource (fused_step_): the values are the latent weights. The first
//   pass over a chunk applies the base optimizer's update to the latent and
//   its state (base_update.h) and hands on the updated latent as stored (in
//   the parameter dtype); later passes read the latent.
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

template <typename T>
struct ParamSource {
  static constexpr bool kAlwaysWrites = false;  // prox NONE with gamma 1 leaves p as it is
  T* p;
  T* lat;
  float gamma;

  ParamSource at(int64_t off) const { return {p + off, lat + off, gamma}; }

  bool load(int64_t o, int64_t n, float* xs, bool first) const {
    load_chunk(p + o, n, gamma, xs);
    if (!first) return false;
    std::memcpy(lat + o, p + o, static_cast<size_t>(n) * sizeof(T));
    return !all_finite(xs, n);
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
    update(o, n, xs);
    if (gamma != 1.0f) {
      for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] / gamma;
    }
    return !all_finite(xs, n);
  }

  void store(int64_t o, int64_t n, const float* ys) const {
    for (int64_t i = 0; i < n; ++i) p[o + i] = static_cast<T>(ys[i]);
  }

  // The base update of [o, o + n): writes the latent and the state; xs = the new latent
  // as stored (rounded to T), which is what the unfused path quantizes.
  void update(int64_t o, int64_t n, float* xs) const {
    const StepArgs a = *s;
    T* L = lat + o;
    const T* G = grad + o;
    if (a.kind == kSgd && !a.has_momentum) {
      for (int64_t i = 0; i < n; ++i) {
        float unused = 0.0f;
        const T w = static_cast<T>(sgd_update(a, static_cast<float>(L[i]),
                                              static_cast<float>(G[i]), unused));
        L[i] = w;
        xs[i] = static_cast<float>(w);
      }
    } else if (a.kind == kSgd) {
      T* B = b1 + o;
      for (int64_t i = 0; i < n; ++i) {
        float buf = a.init_buf ? 0.0f : static_cast<float>(B[i]);
        const T w = static_cast<T>(sgd_update(a, static_cast<float>(L[i]),
                                              static_cast<float>(G[i]), buf));
        B[i] = static_cast<T>(buf);
        L[i] = w;
        xs[i] = static_cast<float>(w);
      }
    } else if (!a.amsgrad) {
      T* M = b1 + o;
      T* V = b2 + o;
      for (int64_t i = 0; i < n; ++i) {
        float m = static_cast<float>(M[i]), v = static_cast<float>(V[i]), unused = 0.0f;
        const T w = static_cast<T>(adam_update(a, static_cast<float>(L[i]),
                                               static_cast<float>(G[i]), m, v, unused));
        M[i] = static_cast<T>(m);
        V[i] = static_cast<T>(v);
        L[i] = w;
        xs[i] = static_cast<float>(w);
      }
    } else {
      T* M = b1 + o;
      T* V = b2 + o;
      T* X = b3 + o;
      for (int64_t i = 0; i < n; ++i) {
        float m = static_cast<float>(M[i]), v = static_cast<float>(V[i]);
        float vmax = static_cast<float>(X[i]);
        const T w = static_cast<T>(adam_update(a, static_cast<float>(L[i]),
                                               static_cast<float>(G[i]), m, v, vmax));
        M[i] = static_cast<T>(m);
        V[i] = static_cast<T>(v);
        X[i] = static_cast<T>(vmax);
        L[i] = w;
        xs[i] = static_cast<float>(w);
      }
    }
  }
};

}  // namespace parq

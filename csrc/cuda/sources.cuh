// What a CUDA row launch knows about its parameters (descriptors) and where the
// row kernel's values come from (the two element sources; the device
// counterpart of csrc/cpu/sources.h).
//
// A launch serves up to kMaxParams parameters, each a (rows, cols) contiguous
// tensor; their descriptors travel in a Batch, as a kernel argument (nothing
// is copied to the device, nothing syncs). The step pointers (grad, b1..b3)
// are null for quant_prox_ and for the buffers an update does not use.
//
// The row kernel (row_kernel.cuh) sees the elements of its row only through a
// source. Per element i of the row (0 <= i < cols, one thread per element and
// pass, the same thread on every pass):
//
// * first(i, kept): the first pass's work on element i; returns x = value / gamma
//   and sets kept when the element's new value was NaN/Inf and it kept its old
//   latent (and state) instead (parq_kernels/ops.py).
// * again(i): x on a later pass of the same launch (same thread, same i).
// * store(i, y): writes the projected weight y to p (in the param dtype).
// * clamp_latent(i, lo, hi): BinaryConnect's clipped latent, element i in place (the
//   write pass, after first() / again() of the same element by the same thread).
//
// ParamSource (quant_prox_): first() copies the weights p into the latent (where
//   finite); the values are the latent. p is overwritten.
// StepSource (fused_step_): the values are the latent weights. first() applies
//   the base optimizer's update (base_update.h) to the latent and its state,
//   stores the new latent in the param dtype and hands on that stored value
//   float(T(w)), which is what the unfused path quantizes; again() reads the
//   latent back. p is written, never read.
//
// Everything a source does to one element happens in first(), so the first
// pass stays a single sweep over memory whichever source it is.
#pragma once

#include <cstdint>

#include "../base_update.h"
#include "../quant_prox.h"

namespace parq {
namespace {  // internal linkage: each entry point's translation unit has its own copy

constexpr int kMaxParams = 40;

struct ParamDesc {
  void* p;      // (rows, cols) weights: read (quant_prox_) / written
  void* lat;    // (rows, cols) latent: written (quant_prox_) / read and written (fused_step_)
  float* Q;     // (rows, K) float32 levels
  void* grad;   // fused_step_: (rows, cols) gradient, read
  void* b1;     // fused_step_: state buffers, read and written (null when unused)
  void* b2;
  void* b3;
  int64_t rows;
  int64_t cols;
  int64_t row_start;  // first global row of this parameter in the launch
  int flag;           // index into nonfinite
};

struct Batch {
  ParamDesc d[kMaxParams];
  int count;
};

// Everything a launch passes by value must fit the portable 4 KB of kernel
// parameter space (the larger limit needs CUDA 12.1 and sm_70+).
static_assert(sizeof(Batch) + sizeof(OpArgs) + sizeof(StepArgs) + sizeof(int*) <= 4096,
              "kernel arguments exceed 4 KB: lower kMaxParams");

template <typename T>
__device__ __forceinline__ float div_gamma(T v, float gamma) {
  const float x = static_cast<float>(v);
  return gamma != 1.0f ? x / gamma : x;
}

// BinaryConnect's clipped latent: clamp in float32, stored as T (the reference's float32
// clamp); a NaN stays NaN (torch.clamp propagates it). As csrc/cpu/sources.h clamp_range.
template <typename T>
__device__ __forceinline__ void clamp_latent_at(T* lat, int64_t i, float lo, float hi) {
  const T l = lat[i];
  const float v = static_cast<float>(l);
  lat[i] = v != v ? l : static_cast<T>(clampf(v, lo, hi));
}

struct NoArgs {};  // quant_prox_ has no per-launch arguments besides OpArgs

template <typename T>
struct ParamSource {
  using Args = NoArgs;
  static constexpr bool kAlwaysWrites = false;  // prox NONE with gamma 1 leaves p as it is
  T* p;
  T* lat;
  float gamma;

  // The source of the row starting at element `off` of parameter d.
  __device__ static ParamSource at(const ParamDesc& d, int64_t off, const Args&, float gamma) {
    return {static_cast<T*>(d.p) + off, static_cast<T*>(d.lat) + off, gamma};
  }

  // latent = p where p is finite; a NaN/Inf element keeps its old latent (kept = true).
  __device__ __forceinline__ float first(int64_t i, bool& kept) const {
    const T v = p[i];
    kept = !isfinite(static_cast<float>(v));
    const T lv = kept ? lat[i] : v;
    lat[i] = lv;
    return div_gamma(lv, gamma);
  }
  __device__ __forceinline__ float again(int64_t i) const { return div_gamma(lat[i], gamma); }
  __device__ __forceinline__ void store(int64_t i, float y) const { p[i] = static_cast<T>(y); }
  __device__ __forceinline__ void clamp_latent(int64_t i, float lo, float hi) const {
    clamp_latent_at(lat, i, lo, hi);
  }
};

template <typename T>
struct StepSource {
  using Args = StepArgs;
  static constexpr bool kAlwaysWrites = true;  // p is written, never read
  T* p;
  T* lat;
  const T* grad;
  T* b1;  // SGD momentum buffer (with momentum) / Adam exp_avg
  T* b2;  // Adam exp_avg_sq
  T* b3;  // Adam max_exp_avg_sq (amsgrad)
  StepArgs s;  // a copy: the kernel argument's address never escapes
  float gamma;

  __device__ static T* shift(void* t, int64_t off) {
    return t != nullptr ? static_cast<T*>(t) + off : nullptr;
  }

  __device__ static StepSource at(const ParamDesc& d, int64_t off, const Args& s, float gamma) {
    return {static_cast<T*>(d.p) + off, static_cast<T*>(d.lat) + off,
            static_cast<const T*>(d.grad) + off, shift(d.b1, off), shift(d.b2, off),
            shift(d.b3, off), s, gamma};
  }

  // The base update of element i: reads latent, grad and state, writes the new
  // latent and state (each in T); returns the stored new latent / gamma. An element
  // whose new latent or state is not finite (as stored) keeps its old ones (kept =
  // true). Buffers the update does not use are neither read nor written (with
  // init_buf the momentum buffer's old value is only kept, not used).
  __device__ __forceinline__ float first(int64_t i, bool& kept) const {
    const T l0 = lat[i];
    const float g = static_cast<float>(grad[i]);
    T wt;
    bool ok;
    if (s.kind == kSgd) {
      const T b0 = s.has_momentum ? b1[i] : T(0.0f);
      float buf = static_cast<float>(b0);
      const float w0 = static_cast<float>(l0);
      wt = static_cast<T>(!s.has_momentum ? sgd_update<false, false>(s, w0, g, buf)
                          : s.init_buf    ? sgd_update<true, true>(s, w0, g, buf)
                                          : sgd_update<true, false>(s, w0, g, buf));
      const T nb = static_cast<T>(buf);
      ok = isfinite(static_cast<float>(wt)) && isfinite(static_cast<float>(nb));
      if (s.has_momentum) b1[i] = ok ? nb : b0;
    } else {
      const T m0 = b1[i], v0 = b2[i];
      const T x0 = s.amsgrad ? b3[i] : T(0.0f);
      float m = static_cast<float>(m0), v = static_cast<float>(v0);
      float vmax = static_cast<float>(x0);
      const float w0 = static_cast<float>(l0);
      wt = static_cast<T>(s.amsgrad ? adam_update<true>(s, w0, g, m, v, vmax)
                                    : adam_update<false>(s, w0, g, m, v, vmax));
      const T nm = static_cast<T>(m), nv = static_cast<T>(v), nx = static_cast<T>(vmax);
      ok = isfinite(static_cast<float>(wt)) && isfinite(static_cast<float>(nm)) &&
           isfinite(static_cast<float>(nv)) && isfinite(static_cast<float>(nx));
      b1[i] = ok ? nm : m0;
      b2[i] = ok ? nv : v0;
      if (s.amsgrad) b3[i] = ok ? nx : x0;
    }
    kept = !ok;
    const T lv = ok ? wt : l0;
    lat[i] = lv;
    return div_gamma(lv, gamma);
  }
  __device__ __forceinline__ float again(int64_t i) const { return div_gamma(lat[i], gamma); }
  __device__ __forceinline__ void store(int64_t i, float y) const { p[i] = static_cast<T>(y); }
  __device__ __forceinline__ void clamp_latent(int64_t i, float lo, float hi) const {
    clamp_latent_at(lat, i, lo, hi);
  }
};

}  // namespace
}  // namespace parq

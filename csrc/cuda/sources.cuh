// What a CUDA row launch knows about its parameters (descriptors) and where the
// row kernel's values come from (the element sources; the device
// counterpart of csrc/cpu/sources.h).
//
// A launch serves up to kMaxParams parameters, each a (rows, cols) contiguous
// tensor; their descriptors travel in a Batch, as a kernel argument (nothing
// is copied to the device, nothing syncs).
//
// The row kernel (row_kernel.cuh) sees the elements of its row only through a
// source. Per element i of the row (0 <= i < cols, one thread per element and
// pass, the same thread on every pass):
//
// * first(i): the first pass's work on element i; returns x = value / gamma.
// * again(i): x on a later pass of the same launch (same thread, same i).
// * store(i, y): writes the projected weight y to p (in the param dtype).
//
// ParamSource (quant_prox_): the values are the weights p (read, later
//   overwritten). first() copies p into the latent.
#pragma once

#include <cstdint>

#include "../quant_prox.h"

namespace parq {
namespace {  // internal linkage: each entry point's translation unit has its own copy

constexpr int kMaxParams = 40;

struct ParamDesc {
  void* p;      // (rows, cols) weights: read, then overwritten
  void* lat;    // (rows, cols) latent: written with the input p
  float* Q;     // (rows, K) float32 levels
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
static_assert(sizeof(Batch) + sizeof(OpArgs) + sizeof(int*) <= 4096,
              "kernel arguments exceed 4 KB: lower kMaxParams");

template <typename T>
__device__ __forceinline__ float div_gamma(T v, float gamma) {
  const float x = static_cast<float>(v);
  return gamma != 1.0f ? x / gamma : x;
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

  __device__ __forceinline__ float first(int64_t i) const {
    const T v = p[i];
    lat[i] = v;
    return div_gamma(v, gamma);
  }
  __device__ __forceinline__ float again(int64_t i) const { return div_gamma(p[i], gamma); }
  __device__ __forceinline__ void store(int64_t i, float y) const { p[i] = static_cast<T>(y); }
};

}  // namespace
}  // namespace parq

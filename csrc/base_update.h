// Per-element base-optimizer updates of the fused step (SPEC.md §8), shared by
// the CPU and CUDA kernels.
//
// torch's own single-tensor SGD / Adam / AdamW math, applied to the latent
// weight w, in float32, with the operations in torch's order (and the scalars
// that torch computes in double on the host, computed the same way by
// make_step_args), so that a fused step agrees with the unfused path to
// float32 rounding. The ground truth is parq_kernels/reference_step.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "levels.h"

namespace parq {

// Mirrors parq_kernels.kinds.OptimKind.
enum OptimKind : int64_t { kSgd = 0, kAdam = 1, kAdamW = 2 };

// The scalars of one update, in kernel form (host doubles rounded once to float,
// as torch's kernels receive them).
struct StepArgs {
  int64_t kind;
  bool maximize;
  bool has_wd;          // weight_decay != 0 (torch skips the decay term otherwise)
  float weight_decay;   // SGD, Adam: g += weight_decay * w
  float neg_lr;         // SGD: w += (-lr) * g
  bool has_momentum;    // SGD: momentum != 0
  float momentum;       // SGD
  float keep_grad;      // SGD: 1 - dampening
  bool nesterov;        // SGD
  bool init_buf;        // SGD: the buffer starts as g (torch's first step)
  float decay;          // AdamW: w *= 1 - lr * weight_decay
  float lerp_w;         // Adam: 1 - beta1 (exp_avg.lerp_(g, lerp_w))
  float lerp_w_comp;    // Adam: 1 - lerp_w, in float (torch's lerp for weights >= 0.5)
  bool lerp_small;      // Adam: |lerp_w| < 0.5
  float beta2;          // Adam
  float one_minus_beta2;
  float eps;
  float neg_step_size;  // Adam: -lr / (1 - beta1^step)
  float bc2_sqrt;       // Adam: sqrt(1 - beta2^step)
  bool amsgrad;
};

// SGD: returns the new w; buf is read (unless init_buf) and written (with momentum).
PARQ_HD float sgd_update(const StepArgs& s, float w, float g, float& buf) {
  if (s.maximize) g = -g;
  if (s.has_wd) g = g + s.weight_decay * w;
  if (s.has_momentum) {
    buf = s.init_buf ? g : buf * s.momentum + s.keep_grad * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  return w + s.neg_lr * g;
}

// Adam / AdamW: returns the new w; m, v (and vmax with amsgrad) are read and written.
PARQ_HD float adam_update(const StepArgs& s, float w, float g, float& m, float& v, float& vmax) {
  if (s.maximize) g = -g;
  if (s.has_wd) {
    if (s.kind == kAdamW) {
      w = w * s.decay;
    } else {
      g = g + s.weight_decay * w;
    }
  }
  m = s.lerp_small ? m + s.lerp_w * (g - m) : g - (g - m) * s.lerp_w_comp;
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  float vv = v;
  if (s.amsgrad) {
    vmax = (v > vmax || v != v) ? v : vmax;  // torch.maximum: NaN propagates
    vv = vmax;
  }
  const float denom = sqrtf(vv) / s.bc2_sqrt + s.eps;  // addcdiv: w + (value * m) / denom
  return w + s.neg_step_size * m / denom;
}

}  // namespace parq

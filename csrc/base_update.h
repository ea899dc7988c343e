// Per-element base-optimizer updates of the fused step (SPEC.md §8), shared by
// the CPU and CUDA kernels.
//
// torch's own single-tensor SGD / Adam / AdamW math, applied to the latent
// weight w, in float32, with the operations in torch's order (and the scalars
// that torch computes in double on the host, computed the same way by
// make_step_args), so that a fused step agrees with the unfused path to
// float32 rounding; one departure: Adam multiplies by 1 / sqrt(bias_correction2)
// where torch divides (an ulp at most; a division less per element). The ground
// truth is parq_kernels/reference_step.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "levels.h"

namespace parq {

// Mirrors parq_kernels.kinds.OptimKind.
enum OptimKind : int64_t { kSgd = 0, kAdam = 1, kAdamW = 2 };

// The scalars of one update, in kernel form (host doubles rounded once to float,
// as torch's kernels receive them). The options are branches on flags that are the same
// for every element (maximize, weight decay, nesterov, the lerp's form), taken as torch
// takes them, so a term torch skips is skipped here too: a loop over elements keeps one
// well-predicted branch per option (or none, where the compiler unswitches the loop).
struct StepArgs {
  int64_t kind;
  bool maximize;
  bool has_wd;          // weight_decay != 0 (torch skips the decay term otherwise)
  float weight_decay;
  float gsign;          // -1 with maximize, else 1 (g *= gsign with maximize)
  float l2;             // SGD, Adam: g += l2 * w when has_wd (weight_decay; 0 for AdamW)
  float neg_lr;         // SGD: w += (-lr) * g
  bool has_momentum;    // SGD: momentum != 0
  float momentum;       // SGD
  float keep_grad;      // SGD: 1 - dampening
  bool nesterov;        // SGD: g += momentum * buf, else g = buf
  bool init_buf;        // SGD: the buffer starts as g (torch's first step)
  bool decoupled;       // AdamW: w *= decay when has_wd; Adam: g += l2 * w
  float decay;          // AdamW: 1 - lr * weight_decay (1 when off / Adam)
  float lerp_w;         // Adam: 1 - beta1 (exp_avg.lerp_(g, lerp_w))
  float lerp_w_comp;    // Adam: 1 - lerp_w, in float (torch's lerp for weights >= 0.5)
  bool lerp_small;      // Adam: |lerp_w| < 0.5 (torch's lerp: m + w (g - m), else g - (g - m) (1 - w))
  float beta2;          // Adam
  float one_minus_beta2;
  float eps;
  float neg_step_size;  // Adam: -lr / (1 - beta1^step)
  float inv_bc2_sqrt;   // Adam: 1 / sqrt(1 - beta2^step)
  bool amsgrad;
};

// SGD: returns the new w. kMomentum: buf is read (unless kInit: torch's first step,
// buf = g) and written; without momentum buf is not used.
template <bool kMomentum, bool kInit>
PARQ_HD float sgd_update(const StepArgs& s, float w, float g, float& buf) {
  if (s.maximize) g = g * s.gsign;
  if (s.has_wd) g = g + s.l2 * w;
  if (kMomentum) {
    buf = kInit ? g : buf * s.momentum + s.keep_grad * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  return w + s.neg_lr * g;
}

// Adam / AdamW: returns the new w; m, v (and vmax with kAmsgrad) are read and written.
template <bool kAmsgrad>
PARQ_HD float adam_update(const StepArgs& s, float w, float g, float& m, float& v, float& vmax) {
  if (s.maximize) g = g * s.gsign;
  if (s.has_wd) {
    if (s.decoupled) {
      w = w * s.decay;  // AdamW's decoupled decay
    } else {
      g = g + s.l2 * w;  // Adam's L2 decay through the gradient
    }
  }
  // torch's lerp, two forms by the weight
  m = s.lerp_small ? m + s.lerp_w * (g - m) : g - (g - m) * s.lerp_w_comp;
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  float vv = v;
  if (kAmsgrad) {
    vmax = (v > vmax || v != v) ? v : vmax;  // torch.maximum: NaN propagates
    vv = vmax;
  }
  const float denom = sqrtf(vv) * s.inv_bc2_sqrt + s.eps;  // addcdiv: w + (value * m) / denom
  return w + s.neg_step_size * m / denom;
}

}  // namespace parq

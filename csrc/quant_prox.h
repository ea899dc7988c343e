// The fused ops parq_kernels_C::quant_prox_ and parq_kernels_C::fused_step_
// (contract: parq_kernels/ops.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

#include "base_update.h"

namespace parq {

// The validated scalar arguments of one call.
struct OpArgs {
  int64_t quant_kind;
  int64_t bits;
  bool scale_max;      // UNIFORM: q_max = max|x| (else min(b * mean|x|, max|x|))
  float int_shift;     // UNIFORM
  float zero_point;    // UNIFORM
  float ternary_mult;  // LSBQ_TERNARY
  float delta_factor;  // TERNARY_THRESHOLD: D = delta_factor * (max|x| or mean|x|)
  bool delta_max;      // TERNARY_THRESHOLD: D from max|x| (else mean|x|)
  bool center;
  bool update;
  int64_t prox_kind;
  float prox_arg;    // T (SOFT), rho (PARQ), theta (RELAX), lam (PROXQUANT_L1 / L2)
  float l2_denom;    // PROXQUANT_L2: 1 + lam (computed in double, then rounded)
  float relax_keep;  // RELAX: 1 - theta (computed in double, then rounded)
  float soft_denom;  // sigmoid(T/2) - 1/2, computed in double then rounded (SOFT)
  float gamma;
  int64_t K;  // levels per row
};

// Checks every argument (TORCH_CHECK with messages naming the parameter) and
// returns the scalars in kernel form. Shared by the CPU and CUDA entry points.
OpArgs validate_args(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma);

// Checks the base-optimizer arguments of fused_step_ (grads and state buffers
// against params, hparams against optim_kind) and returns its scalars.
StepArgs validate_step_args(at::TensorList params, at::TensorList grads, at::TensorList bufs1,
                            at::TensorList bufs2, at::TensorList bufs3, int64_t optim_kind,
                            c10::ArrayRef<double> hparams);

void quant_prox_cpu(at::TensorList params, at::TensorList latents, at::TensorList quants,
                    const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma);

void fused_step_cpu(at::TensorList params, at::TensorList latents, at::TensorList grads,
                    at::TensorList bufs1, at::TensorList bufs2, at::TensorList bufs3,
                    at::TensorList quants, const at::Tensor& nonfinite, int64_t optim_kind,
                    c10::ArrayRef<double> hparams, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma);

#ifdef PARQ_WITH_CUDA
void fused_step_cuda(at::TensorList params, at::TensorList latents, at::TensorList grads,
                     at::TensorList bufs1, at::TensorList bufs2, at::TensorList bufs3,
                     at::TensorList quants, const at::Tensor& nonfinite, int64_t optim_kind,
                     c10::ArrayRef<double> hparams, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma);

void quant_prox_cuda(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma);
#endif

}  // namespace parq

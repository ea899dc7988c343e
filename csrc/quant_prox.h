// The fused op parq_kernels_C::quant_prox_ (contract: parq_kernels/ops.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace parq {

// The validated scalar arguments of one call.
struct OpArgs {
  int64_t quant_kind;
  int64_t bits;
  bool scale_max;      // UNIFORM: q_max = max|x| (else min(b * mean|x|, max|x|))
  float int_shift;     // UNIFORM
  float zero_point;    // UNIFORM
  float ternary_mult;  // LSBQ_TERNARY
  bool center;
  bool update;
  int64_t prox_kind;
  float prox_arg;    // T (SOFT), rho (PARQ), theta (RELAX)
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

void quant_prox_cpu(at::TensorList params, at::TensorList latents, at::TensorList quants,
                    const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma);

#ifdef PARQ_WITH_CUDA
void quant_prox_cuda(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma);
#endif

}  // namespace parq

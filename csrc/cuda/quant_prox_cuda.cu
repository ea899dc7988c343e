// CUDA entry point of parq_kernels_C::quant_prox_ (contract: parq_kernels/ops.py).
//
// The row kernel (row_kernel.cuh) with the weights as its source
// (sources.cuh, ParamSource): the first pass over a row copies p into the
// latent and checks finiteness; the write pass overwrites p with the projected
// weights (skipped on update steps with prox NONE and gamma 1, which leave p
// as it is).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "../quant_prox.h"
#include "row_kernel.cuh"
#include "sources.cuh"

namespace parq {

void quant_prox_cuda(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma) {
  const OpArgs a = validate_args(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 center, update, prox_kind, prox_arg, gamma);
  if (params.empty()) return;
  check_rows_supported("quant_prox_", a, params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<ParamDesc> descs;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].size(0) == 0) continue;
    descs.push_back(make_desc(params[i], latents[i], quants[i], i));
  }
  if (descs.empty()) return;
  int* flags = nonfinite.data_ptr<int>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const NoArgs none{};
  switch (params[0].scalar_type()) {
    case at::kFloat:
      launch_rows<ParamSource<float>>(descs, a, none, flags, stream, "quant_prox_");
      break;
    case at::kBFloat16:
      launch_rows<ParamSource<c10::BFloat16>>(descs, a, none, flags, stream, "quant_prox_");
      break;
    default:
      launch_rows<ParamSource<c10::Half>>(descs, a, none, flags, stream, "quant_prox_");
  }
}

}  // namespace parq

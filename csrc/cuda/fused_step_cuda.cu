// CUDA entry point of parq_kernels_C::fused_step_ (contract: parq_kernels/ops.py,
// SPEC.md §8): the base optimizer's update and quantize + prox in one launch.
//
// The row kernel (row_kernel.cuh) with the stepped latent as its source
// (sources.cuh, StepSource): the first pass over a row applies torch's SGD /
// Adam / AdamW update (base_update.h) to the latent and the optimizer state,
// writes them back in the param dtype and hands on the stored latent; later
// passes re-read the latent; the write pass writes p = prox(latent / gamma).
// On non-update steps that is one pass over memory: it reads latent, grad and
// state and writes latent, state and p.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <vector>

#include "../base_update.h"
#include "../quant_prox.h"
#include "row_kernel.cuh"
#include "sources.cuh"

namespace parq {
namespace {

void* ptr_or_null(at::TensorList ts, size_t i) {
  return i < ts.size() ? ts[i].data_ptr() : nullptr;
}

}  // namespace

void fused_step_cuda(at::TensorList params, at::TensorList latents, at::TensorList grads,
                     at::TensorList bufs1, at::TensorList bufs2, at::TensorList bufs3,
                     at::TensorList quants, const at::Tensor& nonfinite, int64_t optim_kind,
                     c10::ArrayRef<double> hparams, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma) {
  const OpArgs a = validate_args(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 center, update, prox_kind, prox_arg, gamma);
  const StepArgs s = validate_step_args(params, grads, bufs1, bufs2, bufs3, optim_kind, hparams);
  if (params.empty()) return;
  check_rows_supported("fused_step_", a, params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  // validate_step_args gave each buffer list either one tensor per param or none
  std::vector<ParamDesc> descs;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].size(0) == 0) continue;
    ParamDesc d = make_desc(params[i], latents[i], quants[i], i);
    d.grad = grads[i].data_ptr();
    d.b1 = ptr_or_null(bufs1, i);
    d.b2 = ptr_or_null(bufs2, i);
    d.b3 = ptr_or_null(bufs3, i);
    descs.push_back(d);
  }
  if (descs.empty()) return;
  int* flags = nonfinite.data_ptr<int>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (params[0].scalar_type()) {
    case at::kFloat:
      launch_rows<StepSource<float>>(descs, a, s, flags, stream, "fused_step_");
      break;
    case at::kBFloat16:
      launch_rows<StepSource<c10::BFloat16>>(descs, a, s, flags, stream, "fused_step_");
      break;
    default:
      launch_rows<StepSource<c10::Half>>(descs, a, s, flags, stream, "fused_step_");
  }
}

}  // namespace parq

// count_steps_ and fused_step_call: the kept calls' host-side helpers (host_steps.h).
#include "host_steps.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>

namespace parq {

void count_steps_(const std::vector<at::Tensor>& steps) {
  for (const at::Tensor& t : steps) {
    const bool plain = t.defined() && t.device().is_cpu() && t.dim() == 0 &&
                       t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
                       !t.requires_grad() && !t.is_conj() && !t.is_neg() && !t.is_inference() &&
                       !t.key_set().has(c10::DispatchKey::Python);  // (a tensor subclass)
    if (plain) {
      float* v = t.mutable_data_ptr<float>();
      *v = *v + 1.0f;
      t.unsafeGetTensorImpl()->bump_version();
    } else {
      const_cast<at::Tensor&>(t).add_(1);
    }
  }
}

using FusedStepFn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                         int64_t, c10::ArrayRef<double>, int64_t, int64_t, c10::ArrayRef<double>,
                         bool, bool, int64_t, double, double);

void fused_step_call(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& latents,
                     const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& bufs1,
                     const std::vector<at::Tensor>& bufs2, const std::vector<at::Tensor>& bufs3,
                     const std::vector<at::Tensor>& quants, const at::Tensor& nonfinite,
                     int64_t optim_kind, const std::vector<double>& hparams, int64_t quant_kind,
                     int64_t bits, const std::vector<double>& qargs, bool center, bool update,
                     int64_t prox_kind, double prox_arg, double gamma) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("parq_kernels_C::fused_step_", "")
                             .typed<FusedStepFn>();
  pybind11::gil_scoped_release no_gil;
  op.call(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite, optim_kind, hparams,
          quant_kind, bits, qargs, center, update, prox_kind, prox_arg, gamma);
}

}  // namespace parq

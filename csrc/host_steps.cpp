// count_steps_, fused_step_call and kept_grads: the kept calls' host-side helpers (host_steps.h).
#include "host_steps.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include "quant_prox.h"

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

void fused_step_call(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& latents,
                     const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& bufs1,
                     const std::vector<at::Tensor>& bufs2, const std::vector<at::Tensor>& bufs3,
                     const std::vector<at::Tensor>& quants, const at::Tensor& nonfinite,
                     int64_t optim_kind, const std::vector<double>& hparams, int64_t quant_kind,
                     int64_t bits, const std::vector<double>& qargs, bool center, bool update,
                     int64_t prox_kind, double prox_arg, double gamma) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("parq_kernels_C::fused_step_", "")
                             .typed<decltype(fused_step_cpu)>();  // the op's signature
  pybind11::gil_scoped_release no_gil;
  op.call(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite, optim_kind, hparams,
          quant_kind, bits, qargs, center, update, prox_kind, prox_arg, gamma);
}

pybind11::object kept_grads(const pybind11::list& params, const std::vector<int64_t>& ptrs,
                            const pybind11::object& dtype) {
  TORCH_CHECK(THPDtype_Check(dtype.ptr()), "kept_grads: dtype must be a torch.dtype");
  const at::ScalarType want = reinterpret_cast<THPDtype*>(dtype.ptr())->scalar_type;
  const size_t n = params.size();
  if (ptrs.size() != n) return pybind11::none();
  pybind11::list grads(n);
  for (size_t i = 0; i < n; ++i) {
    PyObject* obj = params[i].ptr();
    if (!THPVariable_Check(obj)) return pybind11::none();
    const at::Tensor& p = THPVariable_Unpack(obj);
    if (reinterpret_cast<int64_t>(p.data_ptr()) != ptrs[i] || p.scalar_type() != want) {
      return pybind11::none();
    }
    const at::Tensor& g = p.grad();
    if (!g.defined() || g.layout() != at::kStrided || !g.is_contiguous()) return pybind11::none();
    grads[i] = pybind11::reinterpret_steal<pybind11::object>(THPVariable_Wrap(g));
  }
  return grads;
}

}  // namespace parq

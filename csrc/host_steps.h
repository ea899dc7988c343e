// Host-side helpers of the fused step's kept call (parq/optim/fused_call.py) and the unquantized
// groups' direct call (parq/optim/base_call.py).
//
// count_steps_: the Adam step counters' increment, for the fused step's kept call (parq/optim/fused_call.py)
// and the unquantized groups' direct call (parq/optim/base_call.py): torch's own fused Adam
// runs torch._foreach_add_(steps, 1) first, which on CPU adds to each 0-dim tensor through
// the dispatcher (~2.3 us a tensor on the AMD EPYC of issue 20, more than the rest of a
// small tensor's step). Here a CPU float32 scalar gets step + 1.0f written in place (the same
// float addition, one rounding) and its version counter bumped, as an in-place add does;
// any other tensor (another device or dtype, a subclass, an inference tensor) takes
// Tensor::add_(1).
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <vector>

namespace parq {

void count_steps_(const std::vector<at::Tensor>& steps);

// fused_step_call: parq_kernels_C::fused_step_ called through the C++ dispatcher, with the
// GIL released (as torch.ops does). torch.ops' Python path matches the arguments against
// the schema and converts each to an IValue: ~1.3 us a tensor, ~20 us for the 40 tensors of
// 8 small parameters with momentum (AMD EPYC of issue 20), against ~9 us here. The
// dispatcher still runs (device kernels, profiler ranges, dispatch modes); the kept call
// passes arguments a checked op call has already taken.
void fused_step_call(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& latents,
                     const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& bufs1,
                     const std::vector<at::Tensor>& bufs2, const std::vector<at::Tensor>& bufs3,
                     const std::vector<at::Tensor>& quants, const at::Tensor& nonfinite,
                     int64_t optim_kind, const std::vector<double>& hparams, int64_t quant_kind,
                     int64_t bits, const std::vector<double>& qargs, bool center, bool update,
                     int64_t prox_kind, double prox_arg, double gamma);

// kept_grads: the gradients of a kept call's parameters (a Python list) if each can go to
// the kernel as it is: a dense contiguous tensor, its parameter still on the storage the call
// was built for (ptrs: data_ptr() then) and of its dtype; None otherwise, and the general
// code takes the step (parq/optim/fused_call.py: ready). One pass here replaces six map()
// passes over the group in Python (~0.8 us a parameter on the AMD EPYC of issue 20).
pybind11::object kept_grads(const pybind11::list& params, const std::vector<int64_t>& ptrs,
                            const pybind11::object& dtype);

}  // namespace parq

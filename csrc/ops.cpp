// Schemas and registrations of parq_kernels_C::quant_prox_ and fused_step_, of the packed-export
// ops pack_, unpack_ and dequantize_ and the DiffQ ops diffq_noise_, diffq_noise_backward_ and
// diffq_quantize_ (CPU only), and the Python module parq_kernels._C (HAS_CUDA and the CPU
// level functions, the kept calls' count_steps_, fused_step_call and kept_grads; the ops live
// in torch.ops).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor from Python (count_steps_)
#include <torch/library.h>

#include "cpu_levels.h"
#include "diffq.h"
#include "host_steps.h"
#include "pack.h"
#include "quant_prox.h"

TORCH_LIBRARY(parq_kernels_C, m) {
  m.def(
      "quant_prox_(Tensor(a!)[] params, Tensor(b!)[] latents, Tensor(c!)[] quants, "
      "Tensor(d!) nonfinite, int quant_kind, int bits, float[] qargs, bool center, bool update, "
      "int prox_kind, float prox_arg, float gamma) -> ()");
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor(b!)[] latents, Tensor[] grads, "
      "Tensor(c!)[] bufs1, Tensor(d!)[] bufs2, Tensor(e!)[] bufs3, Tensor(f!)[] quants, "
      "Tensor(g!) nonfinite, int optim_kind, float[] hparams, int quant_kind, int bits, "
      "float[] qargs, bool center, bool update, int prox_kind, float prox_arg, float gamma) -> ()");
  m.def("pack_(Tensor[] indices, Tensor(a!)[] packed, int width) -> ()");
  m.def("unpack_(Tensor[] packed, Tensor(a!)[] indices, int width) -> ()");
  m.def(
      "dequantize_(Tensor[] packed, Tensor[] levels, Tensor(a!)[] out, Tensor(b!) bad, "
      "int width) -> ()");
  m.def(
      "diffq_noise_(Tensor[] weights, Tensor[] logits, Tensor[] noise, Tensor(a!)[] out, "
      "Tensor(b!) ranges, int[] group_sizes, float min_bits, float max_bits, int param) -> ()");
  m.def(
      "diffq_noise_backward_(Tensor[] grad_out, Tensor[] logits, Tensor[] noise, Tensor ranges, "
      "Tensor(a!)[] grad_logits, int[] group_sizes, float min_bits, float max_bits, "
      "int param) -> ()");
  m.def(
      "diffq_quantize_(Tensor[] weights, Tensor[] logits, Tensor(a!)[] out, "
      "Tensor(b!)[] levels, Tensor(c!) minmax, int[] group_sizes, float min_bits, "
      "float max_bits, int param, float extra_bits) -> ()");
}

TORCH_LIBRARY_IMPL(parq_kernels_C, CPU, m) {
  m.impl("quant_prox_", &parq::quant_prox_cpu);
  m.impl("fused_step_", &parq::fused_step_cpu);
  m.impl("pack_", &parq::pack_cpu);
  m.impl("unpack_", &parq::unpack_cpu);
  m.impl("dequantize_", &parq::dequantize_cpu);
  m.impl("diffq_noise_", &parq::diffq_noise_cpu);
  m.impl("diffq_noise_backward_", &parq::diffq_noise_backward_cpu);
  m.impl("diffq_quantize_", &parq::diffq_quantize_cpu);
}

// quant_prox_ and fused_step_ are in-place updates that return nothing and have no
// derivative: autograd has nothing to record, so its key falls through to the device kernel.
// (torch's boxed not-implemented fallback did nothing observable for them, at a cost per
// tensor argument: ~3.5 us for the 40 tensors of a small fused step.)
TORCH_LIBRARY_IMPL(parq_kernels_C, Autograd, m) {
  m.impl("quant_prox_", torch::CppFunction::makeFallthrough());
  m.impl("fused_step_", torch::CppFunction::makeFallthrough());
}

#ifdef PARQ_WITH_CUDA
TORCH_LIBRARY_IMPL(parq_kernels_C, CUDA, m) {
  m.impl("quant_prox_", &parq::quant_prox_cuda);
  m.impl("fused_step_", &parq::fused_step_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "parq fused kernels (ops: torch.ops.parq_kernels_C.quant_prox_, fused_step_)";
  // SPEC.md §14: the CPU kernels' instruction-set level (csrc/cpu_dispatch.cpp)
  m.def("cpu_level", &parq::cpu_level, "the level serving the CPU ops now");
  m.def("cpu_levels", &parq::cpu_levels, "the levels built that this CPU runs, lowest first");
  m.def("_force_cpu_level", &parq::force_cpu_level,
        "serve the CPU ops at this level (one of cpu_levels()); for tests and benchmarks");
  m.def("count_steps_", &parq::count_steps_,
        "Adam's step counters + 1, as torch._foreach_add_(steps, 1) (csrc/host_steps.h)");
  m.def("fused_step_call", &parq::fused_step_call,
        "torch.ops.parq_kernels_C.fused_step_ without its Python argument parsing "
        "(csrc/host_steps.h)");
  m.def("kept_grads", &parq::kept_grads,
        "the gradients of a kept call's parameters if the kernel takes them as they are, "
        "else None (csrc/host_steps.h)");
#ifdef PARQ_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
}

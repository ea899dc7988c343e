// The CPU kernels of one instruction-set level, as a table of entry points (SPEC.md §14).
//
// csrc/cpu/ is compiled once per level (setup.py), each copy in its own namespace
// parq::<LEVEL> (csrc/cpu/level.h), and each copy defines one table, kKernels
// (csrc/cpu/level_table.cpp). cpu_dispatch.cpp, compiled once with baseline flags, holds
// the tables of the levels built, picks one at run time (the CPU torch detects, which
// honours ATEN_CPU_CAPABILITY; never above what this CPU runs) and forwards every CPU op
// to it. The signatures are the ops' own (quant_prox.h, pack.h, diffq.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>
#include <vector>

namespace parq {

struct CpuKernels {
  const char* level;  // "default", "avx2", "avx512"
  void (*quant_prox)(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma);
  void (*fused_step)(at::TensorList params, at::TensorList latents, at::TensorList grads,
                     at::TensorList bufs1, at::TensorList bufs2, at::TensorList bufs3,
                     at::TensorList quants, const at::Tensor& nonfinite, int64_t optim_kind,
                     c10::ArrayRef<double> hparams, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma);
  void (*pack)(at::TensorList indices, at::TensorList packed, int64_t width);
  void (*unpack)(at::TensorList packed, at::TensorList indices, int64_t width);
  void (*dequantize)(at::TensorList packed, at::TensorList levels, at::TensorList out,
                     const at::Tensor& bad, int64_t width);
  void (*diffq_noise)(at::TensorList weights, at::TensorList logits, at::TensorList noise,
                      at::TensorList out, const at::Tensor& ranges,
                      at::IntArrayRef group_sizes, double min_bits, double max_bits,
                      int64_t param);
  void (*diffq_noise_backward)(at::TensorList grad_out, at::TensorList logits,
                               at::TensorList noise, const at::Tensor& ranges,
                               at::TensorList grad_logits, at::IntArrayRef group_sizes,
                               double min_bits, double max_bits, int64_t param);
  void (*diffq_quantize)(at::TensorList weights, at::TensorList logits, at::TensorList out,
                         at::TensorList levels, const at::Tensor& minmax,
                         at::IntArrayRef group_sizes, double min_bits, double max_bits,
                         int64_t param, double extra_bits);
};

// The level serving now, the levels this build has that this CPU runs (lowest first),
// and a switch among those for tests and benchmarks (cpu_dispatch.cpp).
const char* cpu_level();
std::vector<std::string> cpu_levels();
void force_cpu_level(const std::string& level);

}  // namespace parq

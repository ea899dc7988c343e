// The DiffQ ops parq_kernels_C::diffq_noise_, diffq_noise_backward_ and diffq_quantize_
// (SPEC.md §11; contract: parq_kernels/diffq_ops.py). CPU kernels only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace parq {

void diffq_noise_cpu(at::TensorList weights, at::TensorList logits, at::TensorList noise,
                     at::TensorList out, const at::Tensor& ranges, at::IntArrayRef group_sizes,
                     double min_bits, double max_bits, int64_t param);

void diffq_noise_backward_cpu(at::TensorList grad_out, at::TensorList logits,
                              at::TensorList noise, const at::Tensor& ranges,
                              at::TensorList grad_logits, at::IntArrayRef group_sizes,
                              double min_bits, double max_bits, int64_t param);

void diffq_quantize_cpu(at::TensorList weights, at::TensorList logits, at::TensorList out,
                        at::TensorList levels, const at::Tensor& minmax,
                        at::IntArrayRef group_sizes, double min_bits, double max_bits,
                        int64_t param, double extra_bits);

}  // namespace parq

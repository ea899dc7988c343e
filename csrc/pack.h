// The packed-export ops parq_kernels_C::pack_, unpack_ and dequantize_ (SPEC.md §10;
// contract: parq_kernels/pack_ops.py). CPU kernels only: on CUDA the Triton ones serve.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace parq {

void pack_cpu(at::TensorList indices, at::TensorList packed, int64_t width);

void unpack_cpu(at::TensorList packed, at::TensorList indices, int64_t width);

void dequantize_cpu(at::TensorList packed, at::TensorList levels, at::TensorList out,
                    const at::Tensor& bad, int64_t width);

}  // namespace parq

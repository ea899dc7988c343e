// The table of this level's CPU kernels (csrc/cpu_levels.h), one per compiled level.
#include "../cpu_levels.h"
#include "level.h"

PARQ_CPU_BEGIN

// Defined in quant_prox_cpu.cpp, pack_cpu.cpp and diffq_cpu.cpp (this level's copies).
void quant_prox_level(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                      int64_t, int64_t, c10::ArrayRef<double>, bool, bool, int64_t, double,
                      double);
void fused_step_level(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                      int64_t, c10::ArrayRef<double>, int64_t, int64_t, c10::ArrayRef<double>,
                      bool, bool, int64_t, double, double);
void pack_level(at::TensorList, at::TensorList, int64_t);
void unpack_level(at::TensorList, at::TensorList, int64_t);
void dequantize_level(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                      int64_t);
void diffq_noise_level(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                       const at::Tensor&, at::IntArrayRef, double, double, int64_t);
void diffq_noise_backward_level(at::TensorList, at::TensorList, at::TensorList,
                                const at::Tensor&, at::TensorList, at::IntArrayRef, double,
                                double, int64_t);
void diffq_quantize_level(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                          const at::Tensor&, at::IntArrayRef, double, double, int64_t, double);

#if defined(CPU_CAPABILITY_AVX512)
#define PARQ_LEVEL_NAME "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define PARQ_LEVEL_NAME "avx2"
#else
#define PARQ_LEVEL_NAME "default"
#endif

extern const CpuKernels kKernels;
const CpuKernels kKernels{PARQ_LEVEL_NAME,     &quant_prox_level,          &fused_step_level,
                          &pack_level,         &unpack_level,              &dequantize_level,
                          &diffq_noise_level,  &diffq_noise_backward_level, &diffq_quantize_level};

PARQ_CPU_END

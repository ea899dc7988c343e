// The CPU ops' run-time choice of instruction-set level (SPEC.md §14). Compiled once, with
// baseline flags: nothing here may use an instruction that an older CPU lacks.
//
// setup.py builds csrc/cpu/ once per level and tells this file which levels exist
// (PARQ_LEVEL_AVX2, PARQ_LEVEL_AVX512 on x86-64; the default level always exists). The
// level chosen at load is torch's (at::get_cpu_capability(): the CPU it detects, lowered
// by ATEN_CPU_CAPABILITY), capped by what this CPU runs and what was built, so that
// torch's own fused optimizers and these kernels run at the same level.
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <string>
#include <vector>

#include "cpu_levels.h"
#include "diffq.h"
#include "pack.h"
#include "quant_prox.h"

namespace parq {

namespace DEFAULT {
extern const CpuKernels kKernels;
}
#ifdef PARQ_LEVEL_AVX2
namespace AVX2 {
extern const CpuKernels kKernels;
}
#endif
#ifdef PARQ_LEVEL_AVX512
namespace AVX512 {
extern const CpuKernels kKernels;
}
#endif

namespace {

// The levels built, lowest first.
const std::vector<const CpuKernels*>& built() {
  static const std::vector<const CpuKernels*> levels{
      &DEFAULT::kKernels,
#ifdef PARQ_LEVEL_AVX2
      &AVX2::kKernels,
#endif
#ifdef PARQ_LEVEL_AVX512
      &AVX512::kKernels,
#endif
  };
  return levels;
}

// Does this CPU (and its OS: the compiler's check includes the saved register state) run
// the instructions of `level`'s flags (setup.py)?
bool cpu_runs(const std::string& level) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (level == "avx2") return avx2;
  if (level == "avx512") {
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("bmi2");
  }
#endif
  return level == "default";
}

// torch's level, as one of ours ("NO AVX", "DEFAULT", "AVX2", "AVX512", or another
// architecture's name: all but the two AVX levels map to "default").
std::string torch_level() {
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return "avx512";
  if (cap == "AVX2") return "avx2";
  return "default";
}

const CpuKernels* find(const std::string& level) {
  for (const CpuKernels* k : built()) {
    if (level == k->level && cpu_runs(level)) return k;
  }
  return nullptr;
}

const CpuKernels* initial() {
  const std::string want = torch_level();
  const CpuKernels* best = built().front();
  for (const CpuKernels* k : built()) {  // the highest level built that this CPU runs,
    if (cpu_runs(k->level)) best = k;   // up to torch's
    if (want == k->level) break;
  }
  return best;
}

std::atomic<const CpuKernels*>& active_slot() {
  static std::atomic<const CpuKernels*> slot{initial()};
  return slot;
}

const CpuKernels& active() { return *active_slot().load(std::memory_order_relaxed); }

}  // namespace

const char* cpu_level() { return active().level; }

std::vector<std::string> cpu_levels() {
  std::vector<std::string> out;
  for (const CpuKernels* k : built()) {
    if (cpu_runs(k->level)) out.emplace_back(k->level);
  }
  return out;
}

void force_cpu_level(const std::string& level) {
  const CpuKernels* k = find(level);
  TORCH_CHECK(k != nullptr, "parq: CPU level '", level,
              "' is not one this build has and this CPU runs (", c10::Join(", ", cpu_levels()),
              ")");
  active_slot().store(k, std::memory_order_relaxed);
}

// The ops' CPU entry points (registered in ops.cpp): the active level's kernels.
void quant_prox_cpu(at::TensorList params, at::TensorList latents, at::TensorList quants,
                    const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma) {
  active().quant_prox(params, latents, quants, nonfinite, quant_kind, bits, qargs, center,
                      update, prox_kind, prox_arg, gamma);
}

void fused_step_cpu(at::TensorList params, at::TensorList latents, at::TensorList grads,
                    at::TensorList bufs1, at::TensorList bufs2, at::TensorList bufs3,
                    at::TensorList quants, const at::Tensor& nonfinite, int64_t optim_kind,
                    c10::ArrayRef<double> hparams, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma) {
  active().fused_step(params, latents, grads, bufs1, bufs2, bufs3, quants, nonfinite,
                      optim_kind, hparams, quant_kind, bits, qargs, center, update, prox_kind,
                      prox_arg, gamma);
}

void pack_cpu(at::TensorList indices, at::TensorList packed, int64_t width) {
  active().pack(indices, packed, width);
}

void unpack_cpu(at::TensorList packed, at::TensorList indices, int64_t width) {
  active().unpack(packed, indices, width);
}

void dequantize_cpu(at::TensorList packed, at::TensorList levels, at::TensorList out,
                    const at::Tensor& bad, int64_t width) {
  active().dequantize(packed, levels, out, bad, width);
}

void diffq_noise_cpu(at::TensorList weights, at::TensorList logits, at::TensorList noise,
                     at::TensorList out, const at::Tensor& ranges, at::IntArrayRef group_sizes,
                     double min_bits, double max_bits, int64_t param) {
  active().diffq_noise(weights, logits, noise, out, ranges, group_sizes, min_bits, max_bits,
                       param);
}

void diffq_noise_backward_cpu(at::TensorList grad_out, at::TensorList logits,
                              at::TensorList noise, const at::Tensor& ranges,
                              at::TensorList grad_logits, at::IntArrayRef group_sizes,
                              double min_bits, double max_bits, int64_t param) {
  active().diffq_noise_backward(grad_out, logits, noise, ranges, grad_logits, group_sizes,
                                min_bits, max_bits, param);
}

void diffq_quantize_cpu(at::TensorList weights, at::TensorList logits, at::TensorList out,
                        at::TensorList levels, const at::Tensor& minmax,
                        at::IntArrayRef group_sizes, double min_bits, double max_bits,
                        int64_t param, double extra_bits) {
  active().diffq_quantize(weights, logits, out, levels, minmax, group_sizes, min_bits,
                          max_bits, param, extra_bits);
}

}  // namespace parq

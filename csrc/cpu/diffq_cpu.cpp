// CPU kernels of parq_kernels_C::diffq_noise_, diffq_noise_backward_ and diffq_quantize_
// (SPEC.md §11; contract and ground truth: parq_kernels/diffq_ops.py and
// parq_kernels/reference_diffq.py).
//
// Per tensor: the per-group values (noise scale D, its derivative, or 2^b - 1) from the
// logits with vectorized ATen ops, the same as the reference's; one parallel pass for min /
// max (the range R, or mn / mx); one parallel pass over groups writing the elements.
// Everything is float32, in the reference's order of operations (no FMA contraction:
// -ffp-contract=off), so the true quantization matches the reference bitwise. The Python
// front end (parq_kernels/diffq_ops.py) checks the arguments; here only the list lengths.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "level.h"

PARQ_CPU_BEGIN
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task, at least

// Per-group functions of the logits, as whole-tensor ATen ops (vectorized, and the same
// ops in the same order as the reference, so the per-group values agree with it bitwise).
struct BitsMap {
  double min_bits, max_bits, ln_min, ln_max;
  int64_t param;  // 0: bits, 1: noise
  BitsMap(double lo, double hi, int64_t p)
      : min_bits(lo),
        max_bits(hi),
        ln_min(-std::log(std::exp2(hi) - 1)),
        ln_max(-std::log(std::exp2(lo) - 1)),
        param(p) {}

  // D = 1 / (2^bits - 1) per group
  at::Tensor scale(const at::Tensor& l) const {
    const at::Tensor s = at::sigmoid(l);
    if (param == 0) return at::reciprocal(at::exp2(s * (max_bits - min_bits) + min_bits) - 1);
    return at::exp(s * ln_min + (1 - s) * ln_max);
  }

  at::Tensor bits(const at::Tensor& l) const {
    if (param == 0) return at::sigmoid(l) * (max_bits - min_bits) + min_bits;
    return at::log2(at::reciprocal(scale(l)) + 1);
  }

  // dD / dl per group
  at::Tensor dscale(const at::Tensor& l) const {
    const at::Tensor s = at::sigmoid(l);
    const at::Tensor ds = s * (1 - s);
    if (param == 0) {
      const at::Tensor p = at::exp2(s * (max_bits - min_bits) + min_bits);
      return p * (-std::log(2.0) * (max_bits - min_bits)) / ((p - 1) * (p - 1)) * ds;
    }
    return scale(l) * (ln_min - ln_max) * ds;
  }
};

// (min, max) of a tensor as float32 (0, 0 when empty): ATen's vectorized reduction.
std::pair<float, float> min_max(const at::Tensor& w) {
  if (w.numel() == 0) return {0.0f, 0.0f};
  const auto [mn, mx] = at::aminmax(w);
  return {mn.item<float>(), mx.item<float>()};
}

// parallel_for over the groups of a tensor of n elements, groups of G.
template <typename F>
void for_groups(int64_t n, int64_t G, F&& body) {
  const int64_t ng = (n + G - 1) / G;
  const int64_t grain = std::max<int64_t>(1, kGrain / G);
  at::parallel_for(0, ng, grain, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) body(g, g * G, std::min(n, (g + 1) * G));
  });
}

}  // namespace

void diffq_noise_level(at::TensorList weights, at::TensorList logits, at::TensorList noise,
                     at::TensorList out, const at::Tensor& ranges, at::IntArrayRef group_sizes,
                     double min_bits, double max_bits, int64_t param) {
  TORCH_CHECK(logits.size() == weights.size() && noise.size() == weights.size() &&
                  out.size() == weights.size() && group_sizes.size() == weights.size(),
              "diffq_noise_: weights, logits, noise, out and group_sizes differ in length");
  const BitsMap map(min_bits, max_bits, param);
  float* R = ranges.data_ptr<float>();
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].numel(), G = group_sizes[i];
    const at::Tensor D = map.scale(logits[i]).contiguous();
    const float* d = D.data_ptr<float>();
    const float* e = noise[i].data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                    "diffq_noise_", [&] {
      const scalar_t* w = weights[i].data_ptr<scalar_t>();
      scalar_t* o = out[i].data_ptr<scalar_t>();
      const auto [mn, mx] = min_max(weights[i]);
      const float r = mx - mn;
      R[i] = r;
      if (G == 1) {  // one logit per element: a flat, vectorizable loop
        at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t end) {
          for (int64_t j = b; j < end; ++j)
            o[j] = static_cast<scalar_t>(static_cast<float>(w[j]) + r * d[j] * e[j]);
        });
        return;
      }
      for_groups(n, G, [&](int64_t g, int64_t b, int64_t end) {
        const float rd = r * d[g];
        for (int64_t j = b; j < end; ++j)
          o[j] = static_cast<scalar_t>(static_cast<float>(w[j]) + rd * e[j]);
      });
    });
  }
}

void diffq_noise_backward_level(at::TensorList grad_out, at::TensorList logits,
                              at::TensorList noise, const at::Tensor& ranges,
                              at::TensorList grad_logits, at::IntArrayRef group_sizes,
                              double min_bits, double max_bits, int64_t param) {
  TORCH_CHECK(logits.size() == grad_out.size() && noise.size() == grad_out.size() &&
                  grad_logits.size() == grad_out.size() && group_sizes.size() == grad_out.size(),
              "diffq_noise_backward_: the tensor lists and group_sizes differ in length");
  const BitsMap map(min_bits, max_bits, param);
  const float* R = ranges.data_ptr<float>();
  for (size_t i = 0; i < grad_out.size(); ++i) {
    const int64_t n = grad_out[i].numel(), G = group_sizes[i];
    const at::Tensor dD = map.dscale(logits[i]).contiguous();
    const float* dd = dD.data_ptr<float>();
    const float* e = noise[i].data_ptr<float>();
    float* gl = grad_logits[i].data_ptr<float>();
    const float r = R[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out[i].scalar_type(),
                                    "diffq_noise_backward_", [&] {
      const scalar_t* go = grad_out[i].data_ptr<scalar_t>();
      for_groups(n, G, [&](int64_t g, int64_t b, int64_t end) {
        float acc = 0.0f;
        for (int64_t j = b; j < end; ++j) acc += static_cast<float>(go[j]) * r * e[j];
        gl[g] = dd[g] * acc;
      });
    });
  }
}

void diffq_quantize_level(at::TensorList weights, at::TensorList logits, at::TensorList out,
                        at::TensorList levels, const at::Tensor& minmax,
                        at::IntArrayRef group_sizes, double min_bits, double max_bits,
                        int64_t param, double extra_bits) {
  TORCH_CHECK(logits.size() == weights.size() && out.size() == weights.size() &&
                  group_sizes.size() == weights.size() &&
                  (levels.empty() || levels.size() == weights.size()),
              "diffq_quantize_: the tensor lists and group_sizes differ in length");
  const BitsMap map(min_bits, max_bits, param);
  float* mm = minmax.data_ptr<float>();
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].numel(), G = group_sizes[i];
    // b = clamp(round(extra_bits + bits), 1, 15) and 2^b - 1, per group
    const at::Tensor B = at::clamp(at::round(map.bits(logits[i]) + extra_bits), 1, 15);
    const at::Tensor S = (at::exp2(B) - 1).contiguous();
    const float* sc = S.data_ptr<float>();
    int16_t* lv = levels.empty() ? nullptr : levels[i].data_ptr<int16_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                    "diffq_quantize_", [&] {
      const scalar_t* w = weights[i].data_ptr<scalar_t>();
      scalar_t* o = out[i].data_ptr<scalar_t>();
      const auto [mn, mx] = min_max(weights[i]);
      mm[2 * i] = mn;
      mm[2 * i + 1] = mx;
      const float span = mx - mn;
      for_groups(n, G, [&](int64_t g, int64_t b, int64_t end) {
        const float scale = sc[g];
        for (int64_t j = b; j < end; ++j) {
          if (mx == mn) {
            o[j] = w[j];
            if (lv) lv[j] = 0;
            continue;
          }
          const float level = std::nearbyint((static_cast<float>(w[j]) - mn) / span * scale);
          o[j] = static_cast<scalar_t>(level / scale * span + mn);
          if (lv) lv[j] = static_cast<int16_t>(level);
        }
      });
    });
  }
}

PARQ_CPU_END

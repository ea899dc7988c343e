// CPU kernels of parq_kernels_C::diffq_noise_, diffq_noise_backward_ and diffq_quantize_
// (SPEC.md §11; contract and ground truth: parq_kernels/diffq_ops.py and
// parq_kernels/reference_diffq.py).
//
// Per tensor: one parallel pass for min / max (the range R, or mn / mx), then one
// parallel pass over groups: the group's noise scale D (or bits) is computed once from
// its logit, then its elements are written. Everything is computed in float32, in the
// reference's order of operations (no FMA contraction: -ffp-contract=off), so the true
// quantization matches the reference bitwise up to the last ulp of sigmoid / exp.
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

#include "../diffq.h"

namespace parq {
namespace {

constexpr int64_t kGrain = 16384;  // elements per parallel task, at least

struct BitsMap {
  float min_bits, max_bits, ln_min, ln_max;
  int64_t param;  // 0: bits, 1: noise
  BitsMap(double lo, double hi, int64_t p)
      : min_bits(static_cast<float>(lo)),
        max_bits(static_cast<float>(hi)),
        ln_min(static_cast<float>(-std::log(std::exp2(hi) - 1))),
        ln_max(static_cast<float>(-std::log(std::exp2(lo) - 1))),
        param(p) {}

  static float sigmoid(float l) { return 1.0f / (1.0f + std::exp(-l)); }

  float bits(float l) const {
    const float s = sigmoid(l);
    if (param == 0) return min_bits + s * (max_bits - min_bits);
    return std::log2(1.0f + 1.0f / scale(l));
  }

  // D = 1 / (2^bits - 1)
  float scale(float l) const {
    const float s = sigmoid(l);
    if (param == 0) return 1.0f / (std::exp2(min_bits + s * (max_bits - min_bits)) - 1.0f);
    return std::exp(s * ln_min + (1.0f - s) * ln_max);
  }

  // dD / dl
  float dscale(float l) const {
    const float s = sigmoid(l);
    const float ds = s * (1.0f - s);
    if (param == 0) {
      const float p = std::exp2(min_bits + s * (max_bits - min_bits));
      const float d = p - 1.0f;
      return -0.69314718f * p / (d * d) * (max_bits - min_bits) * ds;
    }
    return scale(l) * (ln_min - ln_max) * ds;
  }
};

template <typename T>
std::pair<float, float> min_max(const T* w, int64_t n) {
  if (n == 0) return {0.0f, 0.0f};
  using P = std::pair<float, float>;
  const P init{std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  return at::parallel_reduce(
      0, n, kGrain, init,
      [&](int64_t b, int64_t e, P acc) {
        float lo = acc.first, hi = acc.second;
        for (int64_t j = b; j < e; ++j) {
          const float v = static_cast<float>(w[j]);
          lo = std::min(lo, v);
          hi = std::max(hi, v);
        }
        return P{lo, hi};
      },
      [](P a, P b) { return P{std::min(a.first, b.first), std::max(a.second, b.second)}; });
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

void diffq_noise_cpu(at::TensorList weights, at::TensorList logits, at::TensorList noise,
                     at::TensorList out, const at::Tensor& ranges, at::IntArrayRef group_sizes,
                     double min_bits, double max_bits, int64_t param) {
  const BitsMap map(min_bits, max_bits, param);
  float* R = ranges.data_ptr<float>();
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].numel(), G = group_sizes[i];
    const float* lg = logits[i].data_ptr<float>();
    const float* e = noise[i].data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                    "diffq_noise_", [&] {
      const scalar_t* w = weights[i].data_ptr<scalar_t>();
      scalar_t* o = out[i].data_ptr<scalar_t>();
      const auto [mn, mx] = min_max(w, n);
      const float r = mx - mn;
      R[i] = r;
      for_groups(n, G, [&](int64_t g, int64_t b, int64_t end) {
        const float rd = r * map.scale(lg[g]);
        for (int64_t j = b; j < end; ++j)
          o[j] = static_cast<scalar_t>(static_cast<float>(w[j]) + rd * e[j]);
      });
    });
  }
}

void diffq_noise_backward_cpu(at::TensorList grad_out, at::TensorList logits,
                              at::TensorList noise, const at::Tensor& ranges,
                              at::TensorList grad_logits, at::IntArrayRef group_sizes,
                              double min_bits, double max_bits, int64_t param) {
  const BitsMap map(min_bits, max_bits, param);
  const float* R = ranges.data_ptr<float>();
  for (size_t i = 0; i < grad_out.size(); ++i) {
    const int64_t n = grad_out[i].numel(), G = group_sizes[i];
    const float* lg = logits[i].data_ptr<float>();
    const float* e = noise[i].data_ptr<float>();
    float* gl = grad_logits[i].data_ptr<float>();
    const float r = R[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out[i].scalar_type(),
                                    "diffq_noise_backward_", [&] {
      const scalar_t* go = grad_out[i].data_ptr<scalar_t>();
      for_groups(n, G, [&](int64_t g, int64_t b, int64_t end) {
        float acc = 0.0f;
        for (int64_t j = b; j < end; ++j) acc += static_cast<float>(go[j]) * r * e[j];
        gl[g] = map.dscale(lg[g]) * acc;
      });
    });
  }
}

void diffq_quantize_cpu(at::TensorList weights, at::TensorList logits, at::TensorList out,
                        at::TensorList levels, const at::Tensor& minmax,
                        at::IntArrayRef group_sizes, double min_bits, double max_bits,
                        int64_t param, double extra_bits) {
  const BitsMap map(min_bits, max_bits, param);
  const float extra = static_cast<float>(extra_bits);
  float* mm = minmax.data_ptr<float>();
  for (size_t i = 0; i < weights.size(); ++i) {
    const int64_t n = weights[i].numel(), G = group_sizes[i];
    const float* lg = logits[i].data_ptr<float>();
    int16_t* lv = levels.empty() ? nullptr : levels[i].data_ptr<int16_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[i].scalar_type(),
                                    "diffq_quantize_", [&] {
      const scalar_t* w = weights[i].data_ptr<scalar_t>();
      scalar_t* o = out[i].data_ptr<scalar_t>();
      const auto [mn, mx] = min_max(w, n);
      mm[2 * i] = mn;
      mm[2 * i + 1] = mx;
      const float span = mx - mn;
      for_groups(n, G, [&](int64_t g, int64_t b, int64_t end) {
        const float bits = std::clamp(std::nearbyint(extra + map.bits(lg[g])), 1.0f, 15.0f);
        const float scale = std::exp2(bits) - 1.0f;
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

}  // namespace parq

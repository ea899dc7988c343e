// Argument checks of parq_kernels_C::quant_prox_, shared by the CPU and CUDA entry points.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "levels.h"
#include "quant_prox.h"

namespace parq {
namespace {

int64_t levels_per_row(const OpArgs& a) {
  switch (a.quant_kind) {
    case kUniform:
      return static_cast<int64_t>(std::floor(std::ldexp(1.0, a.bits) - 2.0 * a.int_shift)) + 1;
    case kTernaryUnif:
    case kLsbqTernary:
    case kTernaryThreshold:
      return 3;
    case kLsbqOptimal:
      return a.bits == 0 ? 3 : (int64_t{1} << a.bits);
    default:
      return int64_t{1} << a.bits;
  }
}

void check_quantizer(OpArgs& a, c10::ArrayRef<double> qargs) {
  const int64_t kind = a.quant_kind, b = a.bits;
  TORCH_CHECK(kind >= kUniform && kind <= kTernaryThreshold,
              "quant_prox_: quant_kind must be a QuantKind in 0..6, got ", kind);
  const char* names[] = {"UNIFORM",      "TERNARY_UNIF", "ASYM",           "LSBQ_GREEDY",
                         "LSBQ_TERNARY", "LSBQ_OPTIMAL", "TERNARY_THRESHOLD"};
  const size_t want_qargs[] = {3, 0, 0, 0, 1, 0, 2};
  TORCH_CHECK(qargs.size() == want_qargs[kind], "quant_prox_: qargs of ", names[kind], " has ",
              want_qargs[kind], " entries, got ", qargs.size());
  switch (kind) {
    case kUniform:
      TORCH_CHECK(b >= 1 && b <= 16, "quant_prox_: bits of UNIFORM must be in 1..16, got ", b);
      a.scale_max = qargs[0] != 0.0;
      a.int_shift = static_cast<float>(qargs[1]);
      a.zero_point = static_cast<float>(qargs[2]);
      TORCH_CHECK(std::ldexp(1.0, static_cast<int>(b - 1)) - qargs[1] > 0.0,
                  "quant_prox_: UNIFORM needs 2**(bits-1) > int_shift (got bits=", b,
                  ", int_shift=", qargs[1], ")");
      break;
    case kTernaryUnif:
    case kLsbqTernary:
      TORCH_CHECK(b == 0, "quant_prox_: bits of ", names[kind], " must be 0, got ", b);
      if (kind == kLsbqTernary) a.ternary_mult = static_cast<float>(qargs[0]);
      break;
    case kTernaryThreshold:
      TORCH_CHECK(b == 0, "quant_prox_: bits of TERNARY_THRESHOLD must be 0, got ", b);
      TORCH_CHECK(std::isfinite(qargs[0]) && qargs[0] > 0.0,
                  "quant_prox_: qargs[0] (delta_factor) of TERNARY_THRESHOLD must be finite and "
                  "> 0, got ", qargs[0]);
      TORCH_CHECK(qargs[1] == 0.0 || qargs[1] == 1.0,
                  "quant_prox_: qargs[1] (delta method) of TERNARY_THRESHOLD must be 0 (mean) or "
                  "1 (max), got ", qargs[1]);
      a.delta_factor = static_cast<float>(qargs[0]);
      a.delta_max = qargs[1] != 0.0;
      break;
    case kAsym:
      TORCH_CHECK(b >= 1 && b <= 16, "quant_prox_: bits of ASYM must be in 1..16, got ", b);
      break;
    case kLsbqGreedy:
      TORCH_CHECK(b >= 1 && b <= 8, "quant_prox_: bits of LSBQ_GREEDY must be in 1..8, got ", b);
      break;
    default:
      TORCH_CHECK(b >= 0 && b <= 2, "quant_prox_: bits of LSBQ_OPTIMAL must be 0, 1 or 2, got ",
                  b);
  }
}

void check_prox(OpArgs& a, double prox_arg) {
  const int64_t kind = a.prox_kind;
  TORCH_CHECK(kind >= kNone && kind <= kBinaryConnect,
              "quant_prox_: prox_kind must be a ProxKind in 0..7, got ", kind);
  TORCH_CHECK(std::isfinite(prox_arg), "quant_prox_: prox_arg must be finite, got ", prox_arg);
  if (kind == kSoft) {
    TORCH_CHECK(prox_arg > 0.0, "quant_prox_: prox_arg (temperature T) of SOFT must be > 0, got ",
                prox_arg);
    a.soft_denom = static_cast<float>(1.0 / (1.0 + std::exp(-prox_arg / 2)) - 0.5);
  }
  if (kind == kParq) {
    TORCH_CHECK(prox_arg > 0.0, "quant_prox_: prox_arg (inverse slope rho) of PARQ must be > 0, got ",
                prox_arg);
  }
  if (kind == kProxQuantL1 || kind == kProxQuantL2) {
    TORCH_CHECK(prox_arg >= 0.0, "quant_prox_: prox_arg (lambda) of PROXQUANT must be >= 0, got ",
                prox_arg);
  }
  a.l2_denom = static_cast<float>(1.0 + prox_arg);
  a.prox_arg = static_cast<float>(prox_arg);
  a.relax_keep = static_cast<float>(1.0 - prox_arg);
}

}  // namespace

OpArgs validate_args(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma) {
  OpArgs a{};
  a.quant_kind = quant_kind;
  a.bits = bits;
  a.center = center;
  a.update = update;
  a.prox_kind = prox_kind;
  check_quantizer(a, qargs);
  check_prox(a, prox_arg);
  TORCH_CHECK(std::isfinite(gamma) && gamma > 0.0,
              "quant_prox_: gamma (shrink divisor) must be finite and > 0, got ", gamma);
  a.gamma = static_cast<float>(gamma);
  a.K = levels_per_row(a);

  const size_t n = params.size();
  TORCH_CHECK(latents.size() == n && quants.size() == n,
              "quant_prox_: params, latents and quants must have the same length, got ", n, ", ",
              latents.size(), ", ", quants.size());
  TORCH_CHECK(nonfinite.scalar_type() == at::kInt && nonfinite.dim() == 1 &&
                  nonfinite.numel() == static_cast<int64_t>(n) && nonfinite.is_contiguous(),
              "quant_prox_: nonfinite must be a contiguous int32 tensor of shape (", n,
              ",), got ", nonfinite.scalar_type(), " ", nonfinite.sizes());
  if (n == 0) return a;
  const at::Device device = params[0].device();
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "quant_prox_: params must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(nonfinite.device() == device, "quant_prox_: nonfinite is on ", nonfinite.device(),
              " but params are on ", device);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& lat = latents[i];
    const at::Tensor& Q = quants[i];
    TORCH_CHECK(p.dim() == 2, "quant_prox_: params[", i, "] must be 2-D (rows, cols), got shape ",
                p.sizes());
    TORCH_CHECK(p.is_contiguous(), "quant_prox_: params[", i, "] must be contiguous");
    TORCH_CHECK(p.device() == device && p.scalar_type() == dtype, "quant_prox_: params[", i,
                "] is ", p.scalar_type(), " on ", p.device(), " but params[0] is ", dtype, " on ",
                device, " (one call serves one device and dtype)");
    TORCH_CHECK(lat.sizes() == p.sizes() && lat.scalar_type() == dtype && lat.device() == device &&
                    lat.is_contiguous(),
                "quant_prox_: latents[", i, "] must be a contiguous ", dtype, " tensor of shape ",
                p.sizes(), " on ", device, ", got ", lat.scalar_type(), " ", lat.sizes(), " on ",
                lat.device());
    TORCH_CHECK(p.numel() == 0 || lat.data_ptr() != p.data_ptr(), "quant_prox_: latents[", i,
                "] must not alias params[", i, "]");
    TORCH_CHECK(Q.scalar_type() == at::kFloat && Q.dim() == 2 && Q.size(0) == p.size(0) &&
                    Q.size(1) == a.K && Q.device() == device && Q.is_contiguous(),
                "quant_prox_: quants[", i, "] must be a contiguous float32 tensor of shape (",
                p.size(0), ", ", a.K, ") on ", device, ", got ", Q.scalar_type(), " ", Q.sizes(),
                " on ", Q.device());
  }
  return a;
}

}  // namespace parq

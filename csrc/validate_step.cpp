// Argument checks of the base-optimizer part of parq_kernels_C::fused_step_,
// shared by the CPU and CUDA entry points. The quantize/prox arguments are
// checked by validate_args (validate.cpp).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "base_update.h"
#include "quant_prox.h"

namespace parq {
namespace {

// any_shape: a tensor read as a flat run of numel elements (the gradients) may have any
// shape of its parameter's numel: the fused step's kept call passes the parameters' own
// gradients (parq/optim/fused_call.py) instead of making a 2-D view of each at every step.
void check_like(at::TensorList ts, at::TensorList params, const char* name,
                bool any_shape = false) {
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor& t = ts[i];
    const at::Tensor& p = params[i];
    const bool shape_ok = any_shape ? t.numel() == p.numel() : t.sizes() == p.sizes();
    TORCH_CHECK(shape_ok && t.scalar_type() == p.scalar_type() && t.device() == p.device() &&
                    t.is_contiguous(),
                "fused_step_: ", name, "[", i, "] must be a contiguous ", p.scalar_type(),
                " tensor of ",
                any_shape ? c10::str(p.numel(), " elements (shape ", p.sizes(), ", or any)")
                          : c10::str("shape ", p.sizes()),
                " on ", p.device(), " like params[", i, "], got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
    TORCH_CHECK(p.numel() == 0 || t.data_ptr() != p.data_ptr(), "fused_step_: ", name, "[", i,
                "] must not alias params[", i, "]");
  }
}

void check_count(at::TensorList ts, size_t want, const char* name, const char* when) {
  TORCH_CHECK(ts.size() == want, "fused_step_: ", name, " must hold ", want, " tensors ", when,
              ", got ", ts.size());
}

bool flag(double v, const char* name) {
  TORCH_CHECK(v == 0.0 || v == 1.0, "fused_step_: hparams ", name, " must be 0 or 1, got ", v);
  return v != 0.0;
}

void check_finite(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v), "fused_step_: hparams ", name, " must be finite, got ", v);
}

}  // namespace

StepArgs validate_step_args(at::TensorList params, at::TensorList grads, at::TensorList bufs1,
                            at::TensorList bufs2, at::TensorList bufs3, int64_t optim_kind,
                            c10::ArrayRef<double> hparams) {
  TORCH_CHECK(optim_kind >= kSgd && optim_kind <= kAdamW,
              "fused_step_: optim_kind must be an OptimKind in 0..2, got ", optim_kind);
  const size_t n = params.size();
  const size_t want = optim_kind == kSgd ? 7 : 8;
  TORCH_CHECK(hparams.size() == want, "fused_step_: hparams of optim_kind ", optim_kind, " has ",
              want, " entries, got ", hparams.size());
  for (size_t k = 0; k < want; ++k) check_finite(hparams[k], "entries");
  check_count(grads, n, "grads", "(one per param)");
  check_like(grads, params, "grads", /*any_shape=*/true);
  StepArgs s{};
  s.kind = optim_kind;
  if (optim_kind == kSgd) {
    const double lr = hparams[0], momentum = hparams[1], dampening = hparams[2],
                 weight_decay = hparams[3];
    s.nesterov = flag(hparams[4], "nesterov");
    s.maximize = flag(hparams[5], "maximize");
    s.init_buf = flag(hparams[6], "init_buf");
    s.neg_lr = static_cast<float>(-lr);
    s.has_momentum = momentum != 0.0;
    s.momentum = static_cast<float>(momentum);
    s.keep_grad = static_cast<float>(1.0 - dampening);
    s.has_wd = weight_decay != 0.0;
    s.weight_decay = static_cast<float>(weight_decay);
    s.gsign = s.maximize ? -1.0f : 1.0f;
    s.l2 = s.has_wd ? s.weight_decay : 0.0f;
    s.decay = 1.0f;
    check_count(bufs1, s.has_momentum ? n : 0, "bufs1 (momentum buffers)",
                s.has_momentum ? "with momentum" : "without momentum");
    check_count(bufs2, 0, "bufs2", "for SGD");
    check_count(bufs3, 0, "bufs3", "for SGD");
    check_like(bufs1, params, "bufs1");
    return s;
  }
  const double lr = hparams[0], beta1 = hparams[1], beta2 = hparams[2], eps = hparams[3],
               weight_decay = hparams[4], step = hparams[7];
  s.maximize = flag(hparams[5], "maximize");
  s.amsgrad = flag(hparams[6], "amsgrad");
  TORCH_CHECK(step >= 1.0, "fused_step_: hparams step (after the increment) must be >= 1, got ",
              step);
  s.has_wd = weight_decay != 0.0;
  s.weight_decay = static_cast<float>(weight_decay);
  s.gsign = s.maximize ? -1.0f : 1.0f;
  s.decoupled = optim_kind == kAdamW;
  s.decay = s.has_wd && s.decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  s.l2 = s.has_wd && !s.decoupled ? s.weight_decay : 0.0f;
  const double w = 1.0 - beta1;  // torch: exp_avg.lerp_(g, 1 - beta1)
  s.lerp_w = static_cast<float>(w);
  s.lerp_w_comp = 1.0f - s.lerp_w;
  s.lerp_small = std::fabs(s.lerp_w) < 0.5f;
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  // torch (capturable=False): bias corrections in double on the host
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  TORCH_CHECK(bc1 != 0.0 && bc2 > 0.0, "fused_step_: bias corrections of beta1=", beta1,
              ", beta2=", beta2, " at step ", step, " are zero");
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  // torch divides by bias_correction2**0.5; a multiply by its inverse (rounded once from
  // double) differs by at most an ulp and spares the kernels one of Adam's two divisions
  s.inv_bc2_sqrt = static_cast<float>(1.0 / std::pow(bc2, 0.5));
  s.kind = optim_kind;
  check_count(bufs1, n, "bufs1 (exp_avg)", "(one per param)");
  check_count(bufs2, n, "bufs2 (exp_avg_sq)", "(one per param)");
  check_count(bufs3, s.amsgrad ? n : 0, "bufs3 (max_exp_avg_sq)",
              s.amsgrad ? "with amsgrad" : "without amsgrad");
  check_like(bufs1, params, "bufs1");
  check_like(bufs2, params, "bufs2");
  check_like(bufs3, params, "bufs3");
  return s;
}

}  // namespace parq

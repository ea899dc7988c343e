// count_steps_: the Adam step counters + 1 (host_steps.h).
#include "host_steps.h"

#include <ATen/ATen.h>

namespace parq {

void count_steps_(const std::vector<at::Tensor>& steps) {
  for (const at::Tensor& t : steps) {
    const bool plain = t.defined() && t.device().is_cpu() && t.dim() == 0 &&
                       t.scalar_type() == at::kFloat && t.layout() == at::kStrided &&
                       !t.requires_grad() && !t.is_conj() && !t.is_neg() && !t.is_inference() &&
                       !t.key_set().has(c10::DispatchKey::Python);  // (a tensor subclass)
    if (plain) {
      float* v = t.mutable_data_ptr<float>();
      *v = *v + 1.0f;
      t.unsafeGetTensorImpl()->bump_version();
    } else {
      const_cast<at::Tensor&>(t).add_(1);
    }
  }
}

}  // namespace parq

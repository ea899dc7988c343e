// The Adam step counters' increment, for the fused step's kept call (parq/optim/fused_call.py)
// and the unquantized groups' direct call (parq/optim/base_call.py): torch's own fused Adam
// runs torch._foreach_add_(steps, 1) first, which on CPU adds to each 0-dim tensor through
// the dispatcher (~2.3 us a tensor on the AMD EPYC of issue 20, more than the rest of a
// small tensor's step). Here a CPU float32 scalar gets step + 1.0f written in place (the same
// float addition, one rounding) and its version counter bumped, as an in-place add does;
// any other tensor (another device or dtype, a subclass, an inference tensor) takes
// Tensor::add_(1).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace parq {

void count_steps_(const std::vector<at::Tensor>& steps);

}  // namespace parq

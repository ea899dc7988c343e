"""parq_kernels: the fused QuantOptimizer op, its reference and its backends.

* :mod:`parq_kernels.ops` — the op contract (``torch.ops.parq_kernels.quant_prox_``)
* :mod:`parq_kernels.reference` — pure-PyTorch ground truth (SPEC.md)
* :mod:`parq_kernels.backends` — which implementation serves which device
"""

from parq_kernels.ops import ProxKind, QuantKind, num_levels, quant_prox_

__all__ = ["ProxKind", "QuantKind", "num_levels", "quant_prox_"]

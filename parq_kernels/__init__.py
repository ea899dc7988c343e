"""parq_kernels: the fused QuantOptimizer ops, their references and their backends.

* :mod:`parq_kernels.kinds` — the shared enums (the leaf module)
* :mod:`parq_kernels.ops` — the op contracts (``torch.ops.parq_kernels.quant_prox_`` and
  ``torch.ops.parq_kernels.fused_step_``)
* :mod:`parq_kernels.pack_ops` — the packed-export ops (``pack_``, ``unpack_``,
  ``dequantize_``, SPEC.md §10)
* :mod:`parq_kernels.reference`, :mod:`parq_kernels.reference_step`,
  :mod:`parq_kernels.reference_pack` — pure-PyTorch ground truth (SPEC.md)
* :mod:`parq_kernels.backends` — which implementation serves which device
"""

from parq_kernels.kinds import OptimKind, ProxKind, QuantKind, num_levels
from parq_kernels.ops import fused_step_, quant_prox_
from parq_kernels.pack_ops import dequantize_, pack_, unpack_

__all__ = ["OptimKind", "ProxKind", "QuantKind", "dequantize_", "fused_step_", "num_levels",
           "pack_", "quant_prox_", "unpack_"]  # fmt: skip

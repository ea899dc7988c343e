"""parq.diffq: DiffQ-compatible quantizers with learned bit widths (SPEC.md §11).

Drop-in for the public ``diffq`` package's main names (change the import only)::

    from parq.diffq import DiffQuantizer, UniformQuantizer, LSQ, restore_quantized_state

    quantizer = DiffQuantizer(model, group_size=8)
    quantizer.setup_optimizer(optimizer)
    loss = criterion(model(x), y) + penalty * quantizer.model_size()

The noise injection and the true quantization of all parameters run as fused
multi-tensor ops (:mod:`parq_kernels.diffq_ops`). States written by the public ``diffq``
0.2.x restore too (``load_diffq_state`` loads their files without diffq).
"""

from parq.diffq.base import BaseQuantizer
from parq.diffq.diffq import DiffQuantizer
from parq.diffq.diffq_files import load_diffq_state
from parq.diffq.lsq import LSQ
from parq.diffq.restore import restore_quantized_state
from parq.diffq.uniform import UniformQuantizer

__all__ = ["BaseQuantizer", "DiffQuantizer", "LSQ", "UniformQuantizer", "load_diffq_state",
           "restore_quantized_state"]  # fmt: skip

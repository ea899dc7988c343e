"""parq: PARQ quantization-aware training with fused optimizer-step kernels.

A drop-in replacement for the public PARQ release (same import paths, classes
and arguments); see README.md and SPEC.md.
"""

from parq.optim import (
    NMSGDOptimizer,
    NonFiniteParameterError,
    ProxBinaryRelax,
    ProxHardQuant,
    ProxMap,
    ProxPARQ,
    ProxSoftQuant,
    QuantOptimizer,
    build_quant_optimizer,
)
from parq.quant import (
    AsymUnifQuantizer,
    LSBQuantizer,
    MaxUnifQuantizer,
    Quantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)

__version__ = "0.1.0"

__all__ = [
    "QuantOptimizer",
    "NMSGDOptimizer",
    "build_quant_optimizer",
    "NonFiniteParameterError",
    "ProxMap",
    "ProxHardQuant",
    "ProxSoftQuant",
    "ProxPARQ",
    "ProxBinaryRelax",
    "Quantizer",
    "UnifQuantizer",
    "MaxUnifQuantizer",
    "TernaryUnifQuantizer",
    "AsymUnifQuantizer",
    "LSBQuantizer",
]

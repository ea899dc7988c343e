"""parq: PARQ quantization-aware training with fused optimizer-step kernels.

A drop-in replacement for the public PARQ release (same import paths, classes
and arguments); see README.md and SPEC.md. The names of ``torchao.prototype.parq``
that need ``torchao`` (``UnifTorchaoQuantizer``, ``StretchedUnifTorchaoQuantizer``,
``Int4UnifTorchaoQuantizer``, ``StretchedIntxWeightConfig``) are imported on first use.
"""

from typing import Any

from parq._torchao import lazy_torchao_attribute
from parq.optim import (
    NMSGDOptimizer,
    NonFiniteParameterError,
    ProxBinaryConnect,
    ProxBinaryRelax,
    ProxHardQuant,
    ProxMap,
    ProxPARQ,
    ProxQuant,
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
    "ProxQuant",
    "ProxBinaryConnect",
    "Quantizer",
    "UnifQuantizer",
    "MaxUnifQuantizer",
    "TernaryUnifQuantizer",
    "AsymUnifQuantizer",
    "LSBQuantizer",
]

_TORCHAO_NAMES = {
    "UnifTorchaoQuantizer": "parq.quant.uniform_torchao",
    "StretchedUnifTorchaoQuantizer": "parq.quant.uniform_torchao",
    "Int4UnifTorchaoQuantizer": "parq.quant.uniform_torchao",
    "StretchedIntxWeightConfig": "parq.quant.config_torchao",
}


def __getattr__(name: str) -> Any:
    return lazy_torchao_attribute(__name__, name, _TORCHAO_NAMES)

"""Quantizers: map a tensor to its quantized values and level set.

The torchao quantizers (``UnifTorchaoQuantizer``, ``StretchedUnifTorchaoQuantizer``,
``Int4UnifTorchaoQuantizer``) and ``StretchedIntxWeightConfig`` are imported on first
use and need ``torchao`` (``pip install "torchao==0.18.0"``).
"""

from typing import Any

from parq._torchao import lazy_torchao_attribute
from parq.quant.lsbq import LSBQuantizer
from parq.quant.quantizer import Quantizer
from parq.quant.ternary import TernaryThresholdQuantizer
from parq.quant.uniform import (
    AsymUnifQuantizer,
    MaxUnifQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)

BUILTIN_QUANTIZERS = (
    UnifQuantizer,
    MaxUnifQuantizer,
    TernaryUnifQuantizer,
    AsymUnifQuantizer,
    LSBQuantizer,
)

__all__ = [
    "Quantizer",
    "UnifQuantizer",
    "MaxUnifQuantizer",
    "TernaryUnifQuantizer",
    "AsymUnifQuantizer",
    "LSBQuantizer",
    "TernaryThresholdQuantizer",
    "BUILTIN_QUANTIZERS",
]

_TORCHAO_NAMES = {
    "UnifTorchaoQuantizer": "parq.quant.uniform_torchao",
    "StretchedUnifTorchaoQuantizer": "parq.quant.uniform_torchao",
    "Int4UnifTorchaoQuantizer": "parq.quant.uniform_torchao",
    "StretchedIntxWeightConfig": "parq.quant.config_torchao",
}


def __getattr__(name: str) -> Any:
    return lazy_torchao_attribute(__name__, name, _TORCHAO_NAMES)

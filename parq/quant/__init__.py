"""Quantizers: map a tensor to its quantized values and level set."""

from parq.quant.lsbq import LSBQuantizer
from parq.quant.quantizer import Quantizer
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
    "BUILTIN_QUANTIZERS",
]

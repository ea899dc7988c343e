"""QAT optimizers and proximal maps."""

from parq.optim.binarelax import ProxBinaryRelax
from parq.optim.binaryconnect import ProxBinaryConnect
from parq.optim.factory import build_quant_optimizer
from parq.optim.nm_sgd import NMSGDOptimizer
from parq.optim.parq import ProxPARQ
from parq.optim.proxmap import ProxHardQuant, ProxMap
from parq.optim.proxquant import ProxQuant
from parq.optim.proxsoft import ProxSoftQuant
from parq.optim.quantopt import NonFiniteParameterError, QuantOptimizer

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
]

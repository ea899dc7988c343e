"""``build_quant_optimizer``: QuantOptimizer, or NMSGDOptimizer when ``nm_gamma > 0``."""

from __future__ import annotations

from torch.optim import Optimizer

from parq.optim.nm_sgd import NMSGDOptimizer
from parq.optim.proxmap import ProxMap
from parq.optim.quantopt import QuantOptimizer
from parq.quant.quantizer import Quantizer


def build_quant_optimizer(
    base_optimizer: Optimizer,
    quantizer: Quantizer,
    prox_map: ProxMap,
    warmup_steps: int = 0,
    quant_period: int = 10,
    quant_per_channel: bool = False,
    quant_shrink: bool = False,
    anneal_wd_frac: float = 0.0,
    nm_gamma: float = 0.0,
    **kwargs,
) -> QuantOptimizer:
    """Build the QAT optimizer; extra keyword arguments go to its constructor."""
    args = (base_optimizer, quantizer, prox_map, warmup_steps, quant_period,
            quant_per_channel, quant_shrink, anneal_wd_frac)  # fmt: skip
    if nm_gamma > 0:
        return NMSGDOptimizer(*args, nm_gamma=nm_gamma, **kwargs)
    return QuantOptimizer(*args, **kwargs)

"""Threshold ternary quantization (SPEC.md §9): a threshold ``D`` and one level per side."""

from __future__ import annotations

import math
import numbers

from parq.quant.quantizer import KernelQuantizer, as_bits
from parq_kernels.ops import QuantKind

DELTA_METHODS = ("mean", "max")


class TernaryThresholdQuantizer(KernelQuantizer):
    """Ternary weights with a threshold (``b == 0`` only; SPEC.md §9).

    ``D = delta_factor * mean|x|`` (``delta_method="max"``: ``delta_factor * max|x|``,
    with a factor such as 0.05); ``Q = [-a_neg, 0, a_pos]``, ``a_pos`` the mean of the
    ``x >= D``, ``a_neg`` the mean of ``-x`` over the ``x <= -D`` (an empty side takes the
    other's value, both empty ``max(D, tiny)``); ``q = a_pos`` where ``x >= D``, ``-a_neg``
    where ``x <= -D``, else 0. The fused kernels compute it (``QuantKind.TERNARY_THRESHOLD``:
    one pass for ``D``, a second for the sums and counts of each side); the math is
    :func:`parq_kernels.reference.quantize_ternary_threshold`.
    """

    def __init__(self, delta_factor: float = 0.7, delta_method: str = "mean") -> None:
        ok = isinstance(delta_factor, numbers.Real) and not isinstance(delta_factor, bool)
        if not (ok and math.isfinite(delta_factor) and delta_factor > 0):
            raise ValueError(
                f"TernaryThresholdQuantizer(delta_factor=...) must be a finite number > 0, "
                f"got {delta_factor!r}"
            )
        if delta_method not in DELTA_METHODS:
            raise ValueError(
                f"TernaryThresholdQuantizer(delta_method=...) must be one of {DELTA_METHODS}, "
                f"got {delta_method!r}"
            )
        super().__init__(center=False)
        self.delta_factor = float(delta_factor)
        self.delta_method = delta_method

    def check_bits(self, b: int) -> None:
        b = as_bits(b)
        if b != 0:
            raise ValueError(f"TernaryThresholdQuantizer needs quant_bits == 0 (ternary), got {b}")

    def kernel_spec(self, b: int) -> tuple[QuantKind, tuple[float, ...]]:
        method = 1.0 if self.delta_method == "max" else 0.0
        return QuantKind.TERNARY_THRESHOLD, (self.delta_factor, method)

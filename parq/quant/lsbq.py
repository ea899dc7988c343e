"""Linear-combination-of-binary-bases quantization (LSBQ), SPEC.md §3."""

from __future__ import annotations

import math
import numbers

from parq.quant.quantizer import KernelQuantizer, as_bits
from parq_kernels.ops import QuantKind


class LSBQuantizer(KernelQuantizer):
    """Levels ``{sum_i c_i v_i : c in {-1, +1}^b}`` (``K = 2**b``; ternary: 3).

    * ``optimal=False``: greedy residual fitting for ``b >= 1``; for ``b = 0``
      the simple ternary rule ``v = ternary_multiplier * mean|x|``.
    * ``optimal=True``: the exact least-squares levels for ``b`` in {0, 1, 2}
      (one sort and prefix sums per group; ``b = 1`` equals greedy).
    """

    def __init__(
        self, center: bool = False, optimal: bool = False, ternary_multiplier: float = 1.1
    ) -> None:
        real = isinstance(ternary_multiplier, numbers.Real)
        if isinstance(ternary_multiplier, bool) or not (
            real and math.isfinite(ternary_multiplier) and ternary_multiplier > 0
        ):
            # v = ternary_multiplier * mean|x|: a negative v unsorts [-v, 0, v], NaN poisons it
            raise ValueError(
                "LSBQuantizer(ternary_multiplier=...) must be a finite number > 0, "
                f"got {ternary_multiplier!r}"
            )
        super().__init__(center)
        self.optimal = optimal
        self.ternary_multiplier = ternary_multiplier

    def check_bits(self, b: int) -> None:
        super().check_bits(b)
        b = as_bits(b)
        if self.optimal and b > 2:
            raise NotImplementedError(
                f"LSBQuantizer(optimal=True) supports quant_bits in {{0, 1, 2}}, got {b}"
            )

    def kernel_spec(self, b: int) -> tuple[QuantKind, tuple[float, ...]]:
        if self.optimal:
            return QuantKind.LSBQ_OPTIMAL, ()
        if b == 0:
            return QuantKind.LSBQ_TERNARY, (float(self.ternary_multiplier),)
        return QuantKind.LSBQ_GREEDY, ()

"""Linear-combination-of-binary-bases quantization (LSBQ), SPEC.md §3."""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from parq.quant.lsbq_refine import quantize_lsbq_refined
from parq.quant.quantizer import KernelQuantizer, as_bits
from parq_kernels.ops import QuantKind


class LSBQuantizer(KernelQuantizer):
    """Levels ``{sum_i c_i v_i : c in {-1, +1}^b}`` (``K = 2**b``; ternary: 3).

    * ``optimal=False``: greedy residual fitting for ``b >= 1``; for ``b = 0``
      the simple ternary rule ``v = ternary_multiplier * mean|x|``.
    * ``optimal=True``: the exact least-squares levels for ``b`` in {0, 1, 2}
      (one sort and prefix sums per group; ``b = 1`` equals greedy).
    * ``refine_rounds=r > 0`` (greedy, ``b >= 1``): ``r`` rounds of least-squares refits
      of the coefficients and nearest-level reassignment after the greedy pass
      (:mod:`parq.quant.lsbq_refine`, SPEC.md §9); the squared error never increases.
      The fused path computes these levels with batched torch ops on update steps and
      hands them to the fused op as stored levels (``q`` is the nearest level).
    """

    def __init__(
        self,
        center: bool = False,
        optimal: bool = False,
        ternary_multiplier: float = 1.1,
        *,
        refine_rounds: int = 0,
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
        if isinstance(refine_rounds, bool) or not (
            isinstance(refine_rounds, numbers.Integral) and refine_rounds >= 0
        ):
            raise ValueError(
                f"LSBQuantizer(refine_rounds=...) must be an int >= 0, got {refine_rounds!r}"
            )
        if optimal and refine_rounds:
            raise ValueError(
                "LSBQuantizer(refine_rounds=...) refines the greedy levels; it cannot be "
                "combined with optimal=True"
            )
        super().__init__(center)
        self.optimal = optimal
        self.ternary_multiplier = ternary_multiplier
        self.refine_rounds = int(refine_rounds)

    def host_levels(self, b: int) -> bool:
        """Are the levels computed by :meth:`quantize_rows` (batched torch ops) and handed
        to the fused op as stored levels? (Refined LSBQ: its ``q`` is the nearest level.)"""
        return bool(self.refine_rounds) and b >= 1

    def quantize_rows(self, x: Tensor, b: int) -> tuple[Tensor, Tensor]:
        if not self.refine_rounds or b == 0:
            return super().quantize_rows(x, b)
        if self.center:
            m = x.mean(dim=1, keepdim=True) if x.size(1) else x.new_zeros(x.size(0), 1)
            q, Q = quantize_lsbq_refined(x - m, b, self.refine_rounds)
            return q + m, Q + m
        return quantize_lsbq_refined(x, b, self.refine_rounds)

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

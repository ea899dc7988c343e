"""Uniform quantizers (SPEC.md §3): evenly spaced levels."""

from __future__ import annotations

import math
import numbers

from parq.quant.quantizer import MAX_BITS, KernelQuantizer, as_bits
from parq_kernels.ops import QuantKind

_SCALE_METHODS = ("mean", "max")


def _finite_number(value: object, name: str, owner: str) -> float:
    """``value`` as a float, or ``ValueError`` naming ``owner(name=...)``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{owner}({name}=...) must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}({name}=...) must be a finite number, got {value!r}")
    return float(value)


def min_bits_for_int_shift(int_shift: float) -> int | None:
    """The fewest bits ``b >= 1`` that leave at least two uniform levels,
    ``2**b - 2*int_shift >= 1`` (so ``2**(b-1) > int_shift``); None above 8 bits."""
    for b in range(1, MAX_BITS + 1):
        if 2**b - 2 * int_shift >= 1:
            return b
    return None


class UnifQuantizer(KernelQuantizer):
    """Symmetric uniform levels ``[-r, ..., r] * s`` with ``r = 2**(b-1) - int_shift``.

    ``scale_method="mean"`` sets ``q_max = min(b * mean|x|, max|x|)``, ``"max"``
    sets ``q_max = max|x|``; ``s = q_max / r``. Needs ``b >= 1`` (use
    :class:`TernaryUnifQuantizer` for ``b = 0``).
    """

    def __init__(
        self,
        center: bool = False,
        scale_method: str = "mean",
        int_shift: float = 0.5,
        zero_point: float = 0.5,
    ) -> None:
        if scale_method not in _SCALE_METHODS:
            raise ValueError(f"scale_method must be one of {_SCALE_METHODS}, got {scale_method!r}")
        owner = type(self).__name__
        _finite_number(int_shift, "int_shift", owner)
        _finite_number(zero_point, "zero_point", owner)
        super().__init__(center)
        self.scale_method = scale_method
        self.int_shift = int_shift
        self.zero_point = zero_point

    def check_bits(self, b: int) -> None:
        super().check_bits(b)
        b = as_bits(b)
        name = type(self).__name__
        if b == 0:
            raise ValueError(
                f"{name} needs quant_bits >= 1; for ternary (quant_bits=0) "
                "use TernaryUnifQuantizer or LSBQuantizer"
            )
        if 2**b - 2 * self.int_shift < 1:
            # r = 2**(b-1) - int_shift is the largest level in steps: below 1/2 it
            # leaves a single level (or none) and s = q_max / r is meaningless
            need = min_bits_for_int_shift(self.int_shift)
            fix = (
                f"use quant_bits >= {need} or a smaller int_shift"
                if need is not None
                else f"no quant_bits up to {MAX_BITS} is enough: use a smaller int_shift"
            )
            raise ValueError(
                f"{name}(int_shift={self.int_shift}) needs 2**(quant_bits-1) - int_shift "
                f">= 0.5 (at least two levels), but at quant_bits={b} it is "
                f"{2 ** (b - 1) - self.int_shift}; {fix}"
            )

    def kernel_spec(self, b: int) -> tuple[QuantKind, tuple[float, ...]]:
        scale_max = 1.0 if self.scale_method == "max" else 0.0
        return QuantKind.UNIFORM, (scale_max, float(self.int_shift), float(self.zero_point))


class MaxUnifQuantizer(UnifQuantizer):
    """``2**b - 1`` levels including 0, scaled by ``max|x|`` (needs ``b >= 2``)."""

    def __init__(
        self,
        center: bool = False,
        scale_method: str = "max",
        int_shift: float = 1.0,
        zero_point: float = 0.0,
    ) -> None:
        super().__init__(center, scale_method, int_shift, zero_point)


class TernaryUnifQuantizer(KernelQuantizer):
    """Levels ``[-s, 0, s]`` with ``s = max|x| / 1.5``; only ``quant_bits = 0``."""

    def check_bits(self, b: int) -> None:
        if as_bits(b) != 0:
            raise ValueError(f"TernaryUnifQuantizer needs quant_bits=0 (ternary), got {b}")

    def kernel_spec(self, b: int) -> tuple[QuantKind, tuple[float, ...]]:
        return QuantKind.TERNARY_UNIF, ()


class AsymUnifQuantizer(KernelQuantizer):
    """Asymmetric levels ``[z, ..., z + 2**b - 1] * s`` over ``[min(x), max(x)]``.

    (fix) The public release cancels its zero point; here ``q`` is always in ``Q``.
    """

    def check_bits(self, b: int) -> None:
        super().check_bits(b)
        if as_bits(b) == 0:
            raise ValueError("AsymUnifQuantizer needs quant_bits >= 1")

    def kernel_spec(self, b: int) -> tuple[QuantKind, tuple[float, ...]]:
        return QuantKind.ASYM, ()

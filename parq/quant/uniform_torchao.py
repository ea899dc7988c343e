"""Uniform quantizers on torchao's affine quantization primitives (needs ``torchao``).

Drop-in for ``torchao.prototype.parq.quant.uniform_torchao``: the levels and the
quantized values are computed by the same torchao functions that
``torchao.quantization.quantize_`` uses when it converts a model, so a model
trained with these quantizers converts to torchao's low-bit tensors without
changing a single weight (see ``QuantOptimizer.torchao_convert``).

They are user-style quantizers (they override ``quantize``): the optimizer runs
them through its generic per-parameter path. The parameter they receive has
already been cut into groups (SPEC.md §2): ``dim=-1`` means one group per row of a
2-D view, ``dim=None`` one group for the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from parq._torchao import torchao_missing
from parq.quant.quantizer import MAX_BITS, Quantizer, as_bits

try:
    from torchao.prototype.parq.quant.quant_api import (
        choose_qparams_stretched_affine,
        quantize_stretched_affine,
    )
    from torchao.quantization.quant_primitives import (
        _DTYPE_TO_QVALUE_BOUNDS,
        MappingType,
        ZeroPointDomain,
        _choose_qparams_affine_dont_preserve_zero,
        _choose_qparams_affine_tinygemm,
        _dequantize_affine_no_zero_point,
        _dequantize_affine_tinygemm,
        _quantize_affine_no_zero_point,
        _quantize_affine_tinygemm,
        choose_qparams_affine,
        dequantize_affine,
        quantize_affine,
    )
except ImportError as exc:
    raise torchao_missing("parq.quant.uniform_torchao", exc) from exc

# torchao's integer dtype for each bit width (torch.int1 .. torch.int7, torch.int8)
_BIT_WIDTH_TO_DTYPE: dict[int, torch.dtype] = {
    **{b: getattr(torch, f"int{b}") for b in range(1, 8)},
    8: torch.int8,
}

_AffineOps = tuple[Callable, Callable, Callable]  # (choose_qparams, quantize, dequantize)


def _affine_ops(
    mapping_type: MappingType, preserve_zero: bool, zero_point_domain: ZeroPointDomain
) -> _AffineOps:
    """The torchao functions that a torchao config with these settings uses."""
    if zero_point_domain == ZeroPointDomain.NONE and not preserve_zero:
        quantize, dequantize = _quantize_affine_no_zero_point, _dequantize_affine_no_zero_point
        return choose_qparams_affine, quantize, dequantize
    if mapping_type == MappingType.ASYMMETRIC and not preserve_zero:
        if zero_point_domain == ZeroPointDomain.FLOAT:  # int4 "tinygemm" layout
            return (
                _choose_qparams_affine_tinygemm,
                _quantize_affine_tinygemm,
                _dequantize_affine_tinygemm,
            )
        if zero_point_domain == ZeroPointDomain.INT:
            return _choose_qparams_affine_dont_preserve_zero, quantize_affine, dequantize_affine
    return choose_qparams_affine, quantize_affine, dequantize_affine


class UnifTorchaoQuantizer(Quantizer):
    """Uniform (affine) levels computed by torchao's quantization primitives.

    Args:
        mapping_type: torchao ``MappingType`` (symmetric by default).
        target_dtype: integer dtype of the codes (``torch.int8``).
        quant_min, quant_max: code range; when either is None, the range of the
            signed ``quant_bits``-bit integer (e.g. -2..1 for 2 bits) is used, per call.
        eps: smallest scale; default: the smallest normal number of the weights' dtype.
        preserve_zero, zero_point_domain: as in torchao; they select the primitives.

    ``quantize(p, b, dim)`` returns ``q`` (``p``'s dtype) and the levels ``Q``: all
    ``quant_max - quant_min + 1`` codes dequantized with each group's scale and zero point.
    """

    def __init__(
        self,
        mapping_type: MappingType = MappingType.SYMMETRIC,
        target_dtype: torch.dtype = torch.int8,
        quant_min: int | float | None = None,
        quant_max: int | float | None = None,
        eps: float | None = None,
        preserve_zero: bool = True,
        zero_point_domain: ZeroPointDomain = ZeroPointDomain.INT,
    ) -> None:
        super().__init__(center=False)
        if eps is not None and not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"{type(self).__name__}(eps=...) must be finite and > 0, got {eps}")
        if quant_min is not None and quant_max is not None and not quant_min < quant_max:
            raise ValueError(
                f"{type(self).__name__} needs quant_min < quant_max, "
                f"got quant_min={quant_min}, quant_max={quant_max}"
            )
        self.mapping_type = mapping_type
        self.target_dtype = target_dtype
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.eps = eps
        self.preserve_zero = preserve_zero
        self.zero_point_domain = zero_point_domain

    def _ops(self) -> _AffineOps:
        return _affine_ops(self.mapping_type, self.preserve_zero, self.zero_point_domain)

    def _bounds(self, b: int) -> tuple[int | float, int | float]:
        if self.quant_min is not None and self.quant_max is not None:
            return self.quant_min, self.quant_max
        return _DTYPE_TO_QVALUE_BOUNDS[_BIT_WIDTH_TO_DTYPE[b]]

    def check_bits(self, b: int) -> None:
        super().check_bits(b)
        b = as_bits(b)
        if (self.quant_min is None or self.quant_max is None) and b not in _BIT_WIDTH_TO_DTYPE:
            raise ValueError(
                f"{type(self).__name__} without quant_min/quant_max needs quant_bits in "
                f"1..{MAX_BITS} (a torchao integer width), got {b}"
            )

    def get_quant_size(self, b: int) -> int:
        b = as_bits(b)
        self.check_bits(b)
        quant_min, quant_max = self._bounds(b)
        return int(quant_max - quant_min + 1)

    def quantize(self, p: Tensor, b: int, dim: int | None = None) -> tuple[Tensor, Tensor]:
        b = as_bits(b)
        self.check_bits(b)
        quant_min, quant_max = self._bounds(b)
        choose_qparams, quantize, dequantize = self._ops()
        eps = self.eps if self.eps is not None else torch.finfo(p.dtype).smallest_normal
        block_size = (1, p.size(-1)) if dim is not None else tuple(p.size())
        scale, zero_point = choose_qparams(
            p,
            self.mapping_type,
            block_size,
            self.target_dtype,
            eps=eps,
            quant_min=quant_min,
            quant_max=quant_max,
        )
        bounds = {"quant_min": quant_min, "quant_max": quant_max}
        codes = quantize(p, block_size, scale, zero_point, self.target_dtype, **bounds)
        q = dequantize(
            codes, block_size, scale, zero_point, self.target_dtype, output_dtype=p.dtype, **bounds
        )
        # every code of the range, dequantized with each group's scale / zero point
        levels = torch.arange(quant_min, quant_max + 1e-5, device=p.device)
        if isinstance(quant_min, float):
            levels = levels.floor()
        levels = levels.to(self.target_dtype)
        if dim is not None:
            levels = levels.view(1, -1).expand(q.size(0), -1)
        Q = dequantize(
            levels,
            (1, levels.size(-1)) if dim is not None else tuple(levels.shape),
            scale,
            zero_point,
            self.target_dtype,
            output_dtype=p.dtype,
            **bounds,
        )
        return q, Q.contiguous()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mapping_type={self.mapping_type}, "
            f"target_dtype={self.target_dtype}, quant_min={self.quant_min}, "
            f"quant_max={self.quant_max}, eps={self.eps})"
        )


class StretchedUnifTorchaoQuantizer(UnifTorchaoQuantizer):
    """``UnifQuantizer``'s levels (SPEC.md §3, zero point 1/2) for ``b`` bits, through
    torchao's "stretched" affine primitives, so that it converts with
    :class:`~parq.quant.StretchedIntxWeightConfig`.

    Codes run over ``±(2**(b-1) - int_shift)`` (half-integers for ``int_shift=0.5``):
    ``K = floor(2**b - 2*int_shift) + 1`` levels. Built for one bit width ``b``.
    """

    def __init__(self, b: int, int_shift: float = 0.5, **kwargs) -> None:
        b = as_bits(b, "b")
        if not 1 <= b <= MAX_BITS:
            raise ValueError(f"StretchedUnifTorchaoQuantizer(b=...) must be in 1..8, got {b}")
        if not math.isfinite(int_shift) or 2**b - 2 * int_shift < 1:
            raise ValueError(
                f"StretchedUnifTorchaoQuantizer(b={b}, int_shift={int_shift}) needs a finite "
                f"int_shift with 2**(b-1) - int_shift >= 0.5 (at least two levels)"
            )
        quant_absmax = 2 ** (b - 1) - int_shift
        super().__init__(
            mapping_type=MappingType.ASYMMETRIC,
            quant_min=-quant_absmax,
            quant_max=quant_absmax,
            **kwargs,
        )
        self.b = b
        self.int_shift = int_shift

    def _ops(self) -> _AffineOps:
        dequantize = super()._ops()[2]
        choose = partial(choose_qparams_stretched_affine, b=self.b)
        return choose, quantize_stretched_affine, dequantize

    def check_bits(self, b: int) -> None:
        super().check_bits(b)
        if as_bits(b) != self.b:
            raise ValueError(
                f"StretchedUnifTorchaoQuantizer(b={self.b}) was built for {self.b} bits, "
                f"got quant_bits={b}; build one per bit width"
            )

    def get_quant_size(self, b: int) -> int:
        b = as_bits(b)
        self.check_bits(b)
        return math.floor(2**b - 2 * self.int_shift) + 1

    def __repr__(self) -> str:
        return f"StretchedUnifTorchaoQuantizer(b={self.b}, int_shift={self.int_shift})"


class Int4UnifTorchaoQuantizer(UnifTorchaoQuantizer):
    """torchao's int4 weight-only quantization (``Int4WeightOnlyConfig``): asymmetric
    codes 0..15 with a floating-point zero point per group (16 levels, any ``b``)."""

    def __init__(self) -> None:
        super().__init__(
            mapping_type=MappingType.ASYMMETRIC,
            target_dtype=torch.int32,
            quant_min=0,
            quant_max=15,
            eps=1e-6,
            preserve_zero=False,
            zero_point_domain=ZeroPointDomain.FLOAT,
        )

    def __repr__(self) -> str:
        return "Int4UnifTorchaoQuantizer()"


__all__ = [
    "UnifTorchaoQuantizer",
    "StretchedUnifTorchaoQuantizer",
    "Int4UnifTorchaoQuantizer",
]

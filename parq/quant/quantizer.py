"""The ``Quantizer`` extension point and the shared machinery of the built-ins."""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from parq_kernels import reference
from parq_kernels.ops import QuantKind, num_levels

MAX_BITS = 8


def as_bits(b: object, name: str = "quant_bits") -> int:
    """``b`` as a Python int: ints, ``numpy`` integers and 0-d integer tensors are
    accepted (anything with ``__index__``); bools, floats and the rest raise ``TypeError``."""
    if isinstance(b, bool):
        raise TypeError(f"{name} must be an int, got {b!r}")
    try:
        return operator.index(b)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {b!r} ({type(b).__name__})") from None


def rows_view(p: Tensor, dim: int | None) -> Tensor:
    """``p`` as float32 ``(rows, n)``: one row (dim=None) or one row per slice along ``dim``."""
    x = p.detach().float()
    if dim is None:
        return x.reshape(1, -1)
    # contiguous rows: a row's reductions then run in the same order as in the fused op;
    # the row count is explicit: an empty row (a (4, 0) parameter) is valid (SPEC.md §6)
    x = x.movedim(dim, -1)
    return x.reshape(math.prod(x.shape[:-1]), x.size(-1)).contiguous()


def from_rows(q_rows: Tensor, p: Tensor, dim: int | None) -> Tensor:
    """Inverse of :func:`rows_view` for a tensor of the same element count."""
    if dim is None:
        return q_rows.reshape(p.shape)
    moved = p.movedim(dim, -1).shape
    return q_rows.reshape(moved).movedim(-1, dim)


class Quantizer(ABC):
    """Maps a tensor to ``(q, Q)``: its quantized values and the sorted levels.

    Subclass it to define a new quantizer; the optimizer then calls
    :meth:`quantize` per parameter (the generic path). ``center=True`` quantizes
    ``x - mean(x)`` and adds the mean back to ``q`` and ``Q``.
    """

    def __init__(self, center: bool = False) -> None:
        self.center = center

    @abstractmethod
    def get_quant_size(self, b: int) -> int:
        """K, the number of levels for ``b`` bits."""

    @abstractmethod
    def quantize(self, p: Tensor, b: int, dim: int | None = None) -> tuple[Tensor, Tensor]:
        """``(q, Q)``: ``q`` like ``p`` with values in ``Q``; ``Q`` is ``(K,)`` when
        ``dim is None`` (one group) else ``(groups, K)``. Must not modify ``p``."""

    def check_bits(self, b: int) -> None:
        """Raise ``ValueError`` if this quantizer cannot use ``b`` bits (``TypeError``
        if ``b`` is not an int, a ``numpy`` integer or a 0-d integer tensor)."""
        b = as_bits(b)
        if not 0 <= b <= MAX_BITS:
            raise ValueError(f"quant_bits must be in 0..{MAX_BITS}, got {b}")

    @staticmethod
    def remove_mean(p: Tensor, dim: int | None = None) -> tuple[Tensor, Tensor]:
        """``(p - mean, mean)``: the mean over all of ``p`` (``dim=None``, a 0-d
        tensor) or over ``dim`` (kept as a size-1 dimension, so it broadcasts).

        What ``center=True`` subtracts before quantizing; ``p`` is not modified.
        """
        mean = p.mean() if dim is None else p.mean(dim=dim, keepdim=True)
        return p - mean, mean

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class KernelQuantizer(Quantizer):
    """A built-in quantizer: described to the fused op by ``kernel_spec``.

    ``quantize`` runs the reference math of :mod:`parq_kernels.reference`, so
    the generic path and every fused backend compute the same thing.
    """

    @abstractmethod
    def kernel_spec(self, b: int) -> tuple[QuantKind, tuple[float, ...]]:
        """``(kind, qargs)`` of the fused op for ``b`` bits (after ``check_bits``)."""

    def get_quant_size(self, b: int) -> int:
        b = as_bits(b)
        self.check_bits(b)
        kind, qargs = self.kernel_spec(b)
        return num_levels(kind, b, qargs)

    def quantize(self, p: Tensor, b: int, dim: int | None = None) -> tuple[Tensor, Tensor]:
        b = as_bits(b)
        self.check_bits(b)
        q, Q = self.quantize_rows(rows_view(p, dim), b)
        # q keeps float32 for half-precision p, so that it is exactly one of the
        # float32 levels Q (rounding it to bf16/fp16 would leave Q; SPEC.md §3, §6)
        q = from_rows(q, p, dim).to(torch.promote_types(p.dtype, torch.float32))
        return q, (Q[0] if dim is None else Q)

    def quantize_rows(self, x: Tensor, b: int) -> tuple[Tensor, Tensor]:
        """``(q, Q)`` for the rows of ``x`` (float32 ``(rows, n)``, ``Q`` ``(rows, K)``):
        the reference math of ``kernel_spec``. A built-in whose math no kernel computes
        overrides it (and says why in ``generic_path_reason``)."""
        kind, qargs = self.kernel_spec(b)
        return reference.quantize_rows(x, kind, b, qargs, self.center)


__all__ = ["Quantizer", "KernelQuantizer", "rows_view", "from_rows", "as_bits", "MAX_BITS"]

"""Quantizer modules: an observer plus a fake-quantization rule (SPEC.md §12).

TorchQuant's contract, which the wrappers (:mod:`parq.fakequant.wrappers`) follow:

* ``pre_observe(x)``: feed ``x`` to the observer (called only in states that observe);
* ``quantize(x)``: fake-quantize ``x`` with the observer's current ranges;
* ``post_observe(x)``: called after quantizing in observing states (no-op by default);
* ``forward(x) = quantize(x)``.

``AffineQuantizer(n_bits, observer, symmetric=False, gradient_clip=False, per_channel=False)``,
with the observed range ``(m, M)``: ``lo = min(m, 0)``, ``hi = max(M, 0)``; symmetric:
``hi = max(-lo, hi)``, ``lo = -hi``; ``delta = max((hi - lo) / (2^n - 1), tiny)``,
``z = round(-lo / delta)``, ``2^n`` levels: ``(clamp(round(x / delta) + z, 0, 2^n - 1) - z)
* delta`` (composed torch ops, see :mod:`parq.fakequant.functional`).

``QfmtQuantizer(n_bits, signed, observer, gradient_clip=False)``: ``A = max(|m|, |M|)``,
``int_bits = floor(log2 A) + 1``, ``frac = n_bits - int_bits - signed``, ``delta = 2^-frac``,
codes ``[-2^(n-1), 2^(n-1) - 1]`` (signed) or ``[0, 2^n - 1]``: ``clamp(round(x / delta),
lo, hi) * delta``, computed on CUDA by torch's fused fake-quantize kernel (exact for a
power-of-two ``delta``), on the CPU by the composed ops (faster there; see
:mod:`parq.fakequant.functional`). ``A`` is clamped to ``tiny`` (an all-zero range) and
``frac`` to ``[-126, 126]``, so that ``delta`` and ``1 / delta`` are normal float32 numbers.

``gradient_clip=True`` zeroes the gradient outside the clamp range, i.e. below the
lowest level ``(0 - z) * delta`` / ``lo * delta`` and above the highest; otherwise the
gradient is the identity. Per channel (axis 0) when the observer is per channel. No
gradient reaches the ranges (they are observed, not learned).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from parq.fakequant.functional import fake_quantize
from parq.fakequant.observers import Observer

TINY = torch.finfo(torch.float32).tiny
MAX_BITS = 16


def _check_bits(n_bits: object) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral):
        raise TypeError(f"n_bits must be an int, got {type(n_bits).__name__} {n_bits!r}")
    if not 1 <= n_bits <= MAX_BITS:
        raise ValueError(f"n_bits must be in 1..{MAX_BITS}, got {n_bits}")
    return int(n_bits)


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


class Quantizer(nn.Module):
    """Base class (module doc): holds the ``observer``; subclasses define :meth:`qparams`
    or override :meth:`quantize`."""

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        if not isinstance(observer, Observer):
            raise TypeError(
                "observer must be a parq.fakequant observer (BatchMinMax, ExpAvgMinMax, ...), "
                f"got {type(observer).__name__}"
            )
        self.observer = observer

    @property
    def per_channel(self) -> bool:
        return self.observer.per_channel

    def pre_observe(self, x: Tensor) -> None:
        """Record the range of ``x`` (no gradient)."""
        self.observer.observe_batch(x)

    def post_observe(self, x: Tensor) -> None:
        """Called with the output after quantizing, in observing states; no-op here."""

    def qparams(self) -> tuple[Tensor, Tensor, int, int, bool]:
        """``(delta, zero_point, qmin, qmax, pow2)`` from the current ranges: float32
        tensors, 0-d or ``(C,)``; ``pow2``: ``delta`` holds powers of two."""
        raise NotImplementedError

    gradient_clip: bool = False

    def quantize(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (any shape; per channel: ``x.size(0)`` channels) with the
        current ranges; straight-through gradient. Returns ``x``'s shape and dtype."""
        delta, zero_point, qmin, qmax, pow2 = self.qparams()
        if self.per_channel and delta.dim() == 1 and delta.numel() != x.size(0):
            raise ValueError(
                f"{type(self).__name__}: per-channel ranges of {delta.numel()} channels, "
                f"x has {x.size(0)} along axis 0 (shape {tuple(x.shape)})"
            )
        axis = 0 if delta.dim() == 1 else -1
        return fake_quantize(x, delta, zero_point, qmin, qmax, clip=self.gradient_clip,
                             pow2=pow2, axis=axis)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x)


class AffineQuantizer(Quantizer):
    """Asymmetric (or symmetric) affine fake quantization on ``2^n_bits`` levels (module doc)."""

    def __init__(
        self,
        n_bits: int,
        observer: Observer,
        symmetric: bool = False,
        gradient_clip: bool = False,
        per_channel: bool = False,
    ) -> None:
        super().__init__(observer)
        self.n_bits = _check_bits(n_bits)
        self.symmetric = _check_flag("symmetric", symmetric)
        self.gradient_clip = _check_flag("gradient_clip", gradient_clip)
        if _check_flag("per_channel", per_channel) != observer.per_channel:
            raise ValueError(
                f"per_channel={per_channel} needs an observer with per_channel={per_channel}, "
                f"got {type(observer).__name__}(per_channel={observer.per_channel})"
            )

    def qparams(self) -> tuple[Tensor, Tensor, int, int, bool]:
        m, M = self.observer.get_ranges()
        lo, hi = torch.clamp(m, max=0.0), torch.clamp(M, min=0.0)
        if self.symmetric:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        qmax = 2**self.n_bits - 1
        delta = torch.clamp((hi - lo) / qmax, min=TINY)
        return delta, torch.round(-lo / delta), 0, qmax, False

    def extra_repr(self) -> str:
        return (f"n_bits={self.n_bits}, symmetric={self.symmetric}, "
                f"gradient_clip={self.gradient_clip}, per_channel={self.per_channel}")  # fmt: skip


class QfmtQuantizer(Quantizer):
    """Fixed-point (Q-format) fake quantization: ``delta = 2^-frac`` (module doc)."""

    def __init__(
        self, n_bits: int, signed: bool, observer: Observer, gradient_clip: bool = False
    ) -> None:
        super().__init__(observer)
        self.n_bits = _check_bits(n_bits)
        self.signed = _check_flag("signed", signed)
        self.gradient_clip = _check_flag("gradient_clip", gradient_clip)
        n = self.n_bits
        self.qmin, self.qmax = (-(2 ** (n - 1)), 2 ** (n - 1) - 1) if signed else (0, 2**n - 1)

    def qparams(self) -> tuple[Tensor, Tensor, int, int, bool]:
        m, M = self.observer.get_ranges()
        A = torch.clamp(torch.maximum(m.abs(), M.abs()), min=TINY)
        # floor(log2 A) + 1 exactly: A = mant * 2^e with mant in [0.5, 1) (a float32 log2
        # rounds up to the next integer just below powers of two from 2^2 on)
        int_bits = torch.frexp(A).exponent.float()
        frac = torch.clamp(self.n_bits - int_bits - int(self.signed), -126.0, 126.0)
        delta = torch.exp2(-frac)
        return delta, torch.zeros_like(delta), self.qmin, self.qmax, True

    def extra_repr(self) -> str:
        return f"n_bits={self.n_bits}, signed={self.signed}, gradient_clip={self.gradient_clip}"


__all__ = ["Quantizer", "AffineQuantizer", "QfmtQuantizer"]

"""Functional fake quantization with straight-through gradients (SPEC.md §12).

* ``affine_quantize(x, delta, zero_point, n_levels)``
  ``= (clamp(round(x / delta) + z, 0, n_levels - 1) - z) * delta``
* ``qfmt_quantize(x, delta, min_int, max_int) = clamp(round(x / delta), min_int, max_int) * delta``
* ``gradient_clip(x, lo, hi)``: identity forward, zero gradient where ``x < lo`` or ``x > hi``.

``round`` is round-half-to-even (``torch.round``). The gradient reaches ``x`` only and is
the identity (straight-through); :func:`fake_quantize` (what the quantizer modules call)
can mask it to the clamp range, ``[(qmin - z) * delta, (qmax - z) * delta]`` in units of
``x`` (the lowest and highest level), as ``gradient_clip`` does.

Where torch's fused kernels are used, and where not (checked against torch 2.13):

* ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` compute
  ``round(x * (1 / s))`` with a float32 reciprocal, not ``round(x / s)``: for a general
  scale the two differ by one level for about one element in 10^6 (where ``x / s`` lies
  within an ulp of a half-integer). With a power-of-two scale the reciprocal is exact
  and the kernels compute SPEC's formula bit for bit, so they serve the Q-format
  quantizer (``delta = 2^-frac``) and ``qfmt_quantize`` with a power-of-two float
  ``delta`` -- on CUDA tensors, where one fused pass beats five. On the CPU, torch 2.13's
  kernel is several times slower than the composed ops below (5x with 2 threads, ~10x
  with one, on this project's Xeon; ``python -m benchmarks --suites fakequant`` times
  both), so CPU tensors take the composed ops (``kernel=True`` forces the kernel, as the
  tests do).
* Everywhere else (the affine quantizer, whose ``delta = range / (2^n - 1)`` is not a
  power of two, any tensor ``delta``, CPU tensors): ``div, round, clamp, mul`` composed,
  in place on one temporary: ``clamp(round(x / delta), qmin - z, qmax - z) * delta``,
  equal to SPEC's form for an integer ``z`` (adding and removing an integer is exact
  below 2^24; beyond that the clamp gives the same bound).
* Their gradient is masked to the elements whose *rounded* code is inside
  ``[qmin, qmax]`` (half a step wider than the clamp range in ``x``), while SPEC's is
  the identity, or the clamp range in ``x`` with ``gradient_clip``. So the values come
  from the kernel or the composed ops inside one ``torch.autograd.Function`` whose
  backward is SPEC's (no extra pass: the identity returns the incoming gradient).

Everything here is traceable by ``torch.compile`` (custom ``autograd.Function``s and
plain tensor ops; no host synchronization). Half-precision inputs are computed in
float32 and rounded back once.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(value), device=like.device, dtype=torch.float32)


def _values(
    x: Tensor, delta: Tensor, zero_point: Tensor, qmin: int, qmax: int, kernel: bool, axis: int
) -> Tensor:
    """Fake-quantized values of float32 ``x`` (no autograd); ``axis`` 0: ``delta`` and
    ``zero_point`` have one entry per slice ``x[c]``, -1: per tensor (0-d or broadcastable)."""
    if kernel:  # power-of-two delta: torch's reciprocal is exact (module doc)
        if axis == 0:
            return torch.fake_quantize_per_channel_affine(
                x, delta.reshape(-1), zero_point.reshape(-1).to(torch.int32), 0, qmin, qmax
            )
        return torch.fake_quantize_per_tensor_affine(
            x, delta.reshape(1), zero_point.reshape(1).to(torch.int32), qmin, qmax
        )
    if axis == 0:
        shape = (-1,) + (1,) * (x.dim() - 1)
        delta, zero_point = delta.reshape(shape), zero_point.reshape(shape)
    # clamp(round(x / delta), qmin - z, qmax - z) * delta, in place on one temporary
    # (torch.clamp with tensor bounds is ~3x slower on CPU than clamp_min_ / clamp_max_)
    q = torch.div(x, delta)
    q.round_()
    q.clamp_min_(qmin - zero_point)
    q.clamp_max_(qmax - zero_point)
    return q.mul_(delta)


class _FakeQuantSTE(torch.autograd.Function):
    """Values from :func:`_values`; gradient: identity, or masked to the clamp range."""

    @staticmethod
    def forward(ctx, x, delta, zero_point, qmin, qmax, clip, kernel, axis):
        xf = x.float() if x.dtype in _HALF else x
        out = _values(xf, delta, zero_point, qmin, qmax, kernel, axis)
        ctx.clip = clip
        if clip:
            lo, hi = (qmin - zero_point) * delta, (qmax - zero_point) * delta
            if axis == 0:  # one range per slice x[c]
                shape = (-1,) + (1,) * (x.dim() - 1)
                lo, hi = lo.reshape(shape), hi.reshape(shape)
            ctx.save_for_backward(x, lo, hi)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.clip:
            x, lo, hi = ctx.saved_tensors
            grad = grad * ((x >= lo) & (x <= hi))
        return grad, None, None, None, None, None, None, None


class _GradientClip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x, lo, hi)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        x, lo, hi = ctx.saved_tensors
        return grad * ((x >= lo) & (x <= hi)), None, None


KERNEL_DEVICE_TYPES = ("cuda",)  # where torch's fake-quantize kernels beat the composed ops


def fake_quantize(
    x: Tensor,
    delta: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    *,
    clip: bool = False,
    pow2: bool = False,
    axis: int = -1,
    kernel: bool | None = None,
) -> Tensor:
    """``(clamp(round(x / delta) + z, qmin, qmax) - z) * delta`` with a straight-through
    gradient (masked to ``[(qmin - z) delta, (qmax - z) delta]`` when ``clip``).

    ``x``: any shape, floating point. ``delta``, ``zero_point``: float32 tensors, 0-d (per
    tensor) or, with ``axis=0``, of shape ``(x.size(0),)`` (one per slice ``x[c]``);
    ``zero_point`` must hold integers and ``delta`` positive values (not checked here: that
    would synchronize a GPU). ``pow2=True`` promises that ``delta`` holds powers of two,
    so torch's fused kernel is exact; ``kernel``: use it (True: requires ``pow2``), or
    not, or None: where it is faster (:data:`KERNEL_DEVICE_TYPES`, module doc). Returns a
    tensor of ``x``'s shape and dtype."""
    if kernel and not pow2:
        raise ValueError("fake_quantize: kernel=True needs pow2=True (exact only then)")
    if kernel is None:
        kernel = pow2 and x.device.type in KERNEL_DEVICE_TYPES
    kernel = kernel and x.dtype in (torch.float32, *_HALF) and qmin <= 0 <= qmax
    return _FakeQuantSTE.apply(x, delta, zero_point, int(qmin), int(qmax), clip, kernel, axis)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_delta(delta: float | Tensor) -> None:
    if isinstance(delta, Tensor):
        if not delta.is_floating_point():
            raise TypeError(f"delta must be a floating-point tensor or a float, got {delta.dtype}")
        return
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real):
        raise TypeError(f"delta must be a float or a tensor, got {type(delta).__name__}")
    if not (math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta must be finite and > 0, got {delta}")


def affine_quantize(
    x: Tensor, delta: float | Tensor, zero_point: int | Tensor, n_levels: int
) -> Tensor:
    """``(clamp(round(x / delta) + z, 0, n_levels - 1) - z) * delta``, straight-through
    gradient to ``x`` (identity).

    ``x``: any shape. ``delta`` (> 0) and ``zero_point`` (an integer): Python numbers or
    tensors broadcastable to ``x`` (e.g. ``(C, 1, 1, 1)`` for per-channel weights).
    ``n_levels >= 2``. Composed torch ops (module doc: torch's kernel multiplies by a
    rounded reciprocal). Returns ``x``'s shape and dtype."""
    n_levels = _check_int("n_levels", n_levels)
    if n_levels < 2:
        raise ValueError(f"n_levels must be >= 2, got {n_levels}")
    _check_delta(delta)
    if not isinstance(zero_point, Tensor):
        _check_int("zero_point", zero_point)
    d, z = _as_tensor(delta, x), _as_tensor(zero_point, x)
    return fake_quantize(x, d, z, 0, n_levels - 1)


def qfmt_quantize(x: Tensor, delta: float | Tensor, min_int: int, max_int: int) -> Tensor:
    """``clamp(round(x / delta), min_int, max_int) * delta``, straight-through gradient
    to ``x`` (identity).

    ``x``: any shape. ``delta`` > 0: a Python number, or a tensor broadcastable to ``x``.
    On CUDA, a float ``delta`` that is a power of two (Q-format's ``2^-frac``) goes through
    ``torch.fake_quantize_per_tensor_affine`` (exact then, module doc); other values,
    tensors (whose value is not read on the host) and CPU tensors through the composed
    ops. Returns ``x``'s shape and dtype."""
    min_int, max_int = _check_int("min_int", min_int), _check_int("max_int", max_int)
    if min_int > max_int:
        raise ValueError(f"min_int ({min_int}) must be <= max_int ({max_int})")
    _check_delta(delta)
    pow2 = not isinstance(delta, Tensor) and _is_normal_pow2(float(delta))
    d = _as_tensor(delta, x)
    return fake_quantize(x, d, torch.zeros_like(d), min_int, max_int, pow2=pow2)


def _is_normal_pow2(value: float) -> bool:
    """A power of two whose reciprocal is a normal float32 too (so both are exact)."""
    mantissa, exponent = math.frexp(value)
    return mantissa == 0.5 and -125 <= exponent - 1 <= 126


def gradient_clip(x: Tensor, lo: float | Tensor, hi: float | Tensor) -> Tensor:
    """Identity forward; backward passes the gradient where ``lo <= x <= hi`` and zero
    elsewhere. ``lo``, ``hi``: numbers or tensors broadcastable to ``x`` (``lo <= hi``).
    Returns a view of ``x``."""
    for name, v in (("lo", lo), ("hi", hi)):
        if not isinstance(v, Tensor) and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
            raise TypeError(f"{name} must be a number or a tensor, got {type(v).__name__}")
    if not isinstance(lo, Tensor) and not isinstance(hi, Tensor) and not lo <= hi:
        raise ValueError(f"gradient_clip needs lo <= hi, got lo={lo}, hi={hi}")
    return _GradientClip.apply(x, _as_tensor(lo, x), _as_tensor(hi, x))


__all__ = [
    "affine_quantize",
    "qfmt_quantize",
    "gradient_clip",
    "fake_quantize",
    "KERNEL_DEVICE_TYPES",
]

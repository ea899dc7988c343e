"""Pure-PyTorch ground truth of the DiffQ ops (SPEC.md §11; contract in
:mod:`parq_kernels.diffq_ops`).

Written per tensor, straight from the formulas, in float32:

* bits from a logit ``l`` (``sig = sigmoid(l)``): ``param=bits``:
  ``bits = min_bits + sig * (max_bits - min_bits)``, noise scale ``D = 1 / (2^bits - 1)``;
  ``param=noise``: ``D = s = exp(sig ln s_min + (1 - sig) ln s_max)`` with
  ``s_min = 1 / (2^max_bits - 1)``, ``s_max = 1 / (2^min_bits - 1)``, ``bits = log2(1 + 1/s)``;
* noise: ``out = w + R * D[j // G] * e`` with ``R = max(w) - min(w)`` (treated as a
  constant: the gradient reaches ``w`` as the identity and the logits through ``D``);
* true quantization: ``b = clamp(round(extra_bits + bits), 1, 15)`` per group,
  ``level = round((w - mn) / (mx - mn) * (2^b - 1))``, ``w_q = level / (2^b - 1) * (mx - mn)
  + mn``; ``mx == mn`` gives ``level = 0`` and ``w_q = w``.

The functions on logits are differentiable torch code (the front end uses them for the
model size). Never change this file to match a kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PARAM_BITS = 0  # param="bits"
PARAM_NOISE = 1  # param="noise"
MAX_QUANT_BITS = 15


def _log_scales(min_bits: float, max_bits: float) -> tuple[float, float]:
    """``(ln s_min, ln s_max)`` of ``param="noise"``."""
    return -math.log(2.0**max_bits - 1), -math.log(2.0**min_bits - 1)


def bits_from_logits(logits: Tensor, min_bits: float, max_bits: float, param: int) -> Tensor:
    """The (fractional) bits of each group, differentiable; same shape as ``logits``."""
    sig = torch.sigmoid(logits.float())
    if param == PARAM_BITS:
        return min_bits + sig * (max_bits - min_bits)
    return torch.log2(1 + 1 / noise_scale_from_logits(logits, min_bits, max_bits, param))


def noise_scale_from_logits(logits: Tensor, min_bits: float, max_bits: float,
                            param: int) -> Tensor:  # fmt: skip
    """``D = 1 / (2^bits - 1)`` per group (float32), differentiable."""
    sig = torch.sigmoid(logits.float())
    if param == PARAM_BITS:
        bits = min_bits + sig * (max_bits - min_bits)
        return 1 / (torch.exp2(bits) - 1)
    ln_min, ln_max = _log_scales(min_bits, max_bits)
    return torch.exp(sig * ln_min + (1 - sig) * ln_max)


def logits_from_bits(bits: Tensor, min_bits: float, max_bits: float, param: int) -> Tensor:
    """The inverse of :func:`bits_from_logits` (float32); bits are clamped to a hair
    inside ``(min_bits, max_bits)`` so that the logits stay finite."""
    bits = bits.float()
    if param == PARAM_BITS:
        sig = (bits - min_bits) / (max_bits - min_bits)
    else:
        ln_min, ln_max = _log_scales(min_bits, max_bits)
        sig = (-torch.log(torch.exp2(bits) - 1) - ln_max) / (ln_min - ln_max)
    return torch.logit(sig.clamp(1e-6, 1 - 1e-6))


def true_bits(logits: Tensor, min_bits: float, max_bits: float, param: int,
              extra_bits: float) -> Tensor:  # fmt: skip
    """``clamp(round(extra_bits + bits), 1, 15)`` per group (float32)."""
    bits = bits_from_logits(logits, min_bits, max_bits, param)
    return torch.round(extra_bits + bits).clamp(1, MAX_QUANT_BITS)


def expand_groups(per_group: Tensor, numel: int, group_size: int) -> Tensor:
    """The value of each element's group: ``per_group[j // group_size]``, ``(numel,)``."""
    return per_group.repeat_interleave(group_size)[:numel]


def tensor_range(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(mn, mx)`` of ``w`` as float32 scalars (0 for an empty tensor)."""
    if w.numel() == 0:
        zero = torch.zeros((), device=w.device)
        return zero, zero
    mn, mx = torch.aminmax(w.detach().float())
    return mn, mx


def levels_of(w: Tensor, b: Tensor, mn: Tensor, mx: Tensor) -> Tensor:
    """``round((w - mn) / (mx - mn) * (2^b - 1))`` (float32; 0 when ``mx == mn``)."""
    if bool(mx == mn):
        return torch.zeros_like(w, dtype=torch.float32)
    return torch.round((w.float() - mn) / (mx - mn) * (torch.exp2(b) - 1))


def dequantize_levels(level: Tensor, b: Tensor, mn: Tensor, mx: Tensor) -> Tensor:
    """``level / (2^b - 1) * (mx - mn) + mn`` (float32)."""
    return level.float() / (torch.exp2(b) - 1) * (mx - mn) + mn


def diffq_noise_(weights: list[Tensor], logits: list[Tensor], noise: list[Tensor],
                 out: list[Tensor], ranges: Tensor, group_sizes: list[int], min_bits: float,
                 max_bits: float, param: int) -> None:  # fmt: skip
    """Reference backend of ``parq_kernels::diffq_noise_``."""
    for i, (w, lg, e, o) in enumerate(zip(weights, logits, noise, out, strict=True)):
        mn, mx = tensor_range(w)
        ranges[i] = mx - mn
        D = noise_scale_from_logits(lg, min_bits, max_bits, param)
        D = expand_groups(D, w.numel(), group_sizes[i]).view(w.shape)
        o.copy_(w.float() + (mx - mn) * D * e.float())


def diffq_noise_backward_(grad_out: list[Tensor], logits: list[Tensor], noise: list[Tensor],
                          ranges: Tensor, grad_logits: list[Tensor], group_sizes: list[int],
                          min_bits: float, max_bits: float, param: int) -> None:  # fmt: skip
    """Reference backend of ``parq_kernels::diffq_noise_backward_``."""
    for i, (g, lg, e, gl) in enumerate(zip(grad_out, logits, noise, grad_logits, strict=True)):
        leaf = lg.detach().float().requires_grad_(True)
        with torch.enable_grad():
            D = noise_scale_from_logits(leaf, min_bits, max_bits, param)
            G = group_sizes[i]
            # d out / d D_g = sum over the group of g * R * e
            per_elem = g.float().reshape(-1) * ranges[i] * e.float().reshape(-1)
            pad = D.numel() * G - per_elem.numel()
            dD = torch.nn.functional.pad(per_elem, (0, pad)).view(D.numel(), G).sum(dim=1)
            (grad,) = torch.autograd.grad(D, leaf, dD)
        gl.copy_(grad)


def diffq_quantize_(weights: list[Tensor], logits: list[Tensor], out: list[Tensor],
                    levels: list[Tensor], minmax: Tensor, group_sizes: list[int],
                    min_bits: float, max_bits: float, param: int,
                    extra_bits: float) -> None:  # fmt: skip
    """Reference backend of ``parq_kernels::diffq_quantize_``."""
    for i, (w, lg, o) in enumerate(zip(weights, logits, out, strict=True)):
        mn, mx = tensor_range(w)
        minmax[i, 0], minmax[i, 1] = mn, mx
        b = true_bits(lg, min_bits, max_bits, param, extra_bits)
        b = expand_groups(b, w.numel(), group_sizes[i]).view(w.shape)
        level = levels_of(w, b, mn, mx)
        if levels:
            levels[i].copy_(level.view(levels[i].shape))
        if bool(mx == mn):
            o.copy_(w)
        else:
            o.copy_(dequantize_levels(level, b, mn, mx))

"""Autograd around the fused DiffQ ops (:mod:`parq_kernels.diffq_ops`): one op call per
forward and one per backward for all quantized parameters of a model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parq_kernels.diffq_ops import diffq_noise_, diffq_noise_backward_, diffq_quantize_


@dataclass(frozen=True)
class GroupConfig:
    """The scalars of a call: group size of each tensor, bit range, parametrization."""

    group_sizes: tuple[int, ...]
    min_bits: float
    max_bits: float
    param: int
    extra_bits: float = 0.0
    backend: str = ""


def draw_noise(weights: list[Tensor], kind: str,
               generator: torch.Generator | None = None) -> list[Tensor]:  # fmt: skip
    """One float32 buffer of ``N(0,1)/2`` (``"gaussian"``) or ``U(-1/2, 1/2)``
    (``"uniform"``) noise, split into views of the shapes of ``weights``."""
    if not weights:
        return []
    numels = [w.numel() for w in weights]
    device = weights[0].device
    if kind == "gaussian":
        buf = torch.randn(sum(numels), device=device, generator=generator).mul_(0.5)
    else:
        buf = torch.rand(sum(numels), device=device, generator=generator).sub_(0.5)
    return [part.view(w.shape) for part, w in zip(buf.split(numels), weights, strict=True)]


class NoiseInjection(torch.autograd.Function):
    """``(cfg, noise, n, *weights, *logits) -> noisy weights``: ``w + R * D * e``; the
    gradient of ``w`` is the identity, that of the logits the backward op's."""

    @staticmethod
    def forward(ctx, cfg: GroupConfig, noise: list[Tensor], n: int, *tensors: Tensor):
        weights, logits = list(tensors[:n]), list(tensors[n:])
        out = [torch.empty_like(w) for w in weights]
        ranges = torch.empty(n, dtype=torch.float32, device=weights[0].device)
        diffq_noise_(weights, logits, noise, out, ranges, cfg.group_sizes, cfg.min_bits,
                     cfg.max_bits, cfg.param, cfg.backend)  # fmt: skip
        ctx.cfg, ctx.n, ctx.noise = cfg, n, noise
        ctx.save_for_backward(ranges, *logits)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        cfg = ctx.cfg
        ranges, *logits = ctx.saved_tensors
        grads = [torch.zeros_like(e) if g is None else g.contiguous()
                 for g, e in zip(grads, ctx.noise, strict=True)]  # fmt: skip
        grad_logits = [torch.empty_like(lg) for lg in logits]
        diffq_noise_backward_(grads, logits, ctx.noise, ranges, grad_logits, cfg.group_sizes,
                              cfg.min_bits, cfg.max_bits, cfg.param, cfg.backend)  # fmt: skip
        return (None, None, None, *grads, *grad_logits)


def inject_noise(weights: list[Tensor], logits: list[Tensor], cfg: GroupConfig, kind: str,
                 generator: torch.Generator | None = None) -> list[Tensor]:  # fmt: skip
    """Noisy weights (one per tensor), differentiable in ``weights`` and ``logits``."""
    noise = draw_noise(weights, kind, generator)
    return list(NoiseInjection.apply(cfg, noise, len(weights), *weights, *logits))


def true_quantize(
    weights: list[Tensor], logits: list[Tensor], cfg: GroupConfig, with_levels: bool = False
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``(quantized weights, int16 levels (empty unless with_levels), minmax (n, 2))``."""
    weights = [w.detach() for w in weights]
    logits = [lg.detach() for lg in logits]
    device = weights[0].device if weights else torch.device("cpu")
    out = [torch.empty_like(w) for w in weights]
    levels = [torch.empty(w.shape, dtype=torch.int16, device=device) for w in weights] \
        if with_levels else []  # fmt: skip
    minmax = torch.empty(len(weights), 2, dtype=torch.float32, device=device)
    diffq_quantize_(weights, logits, out, levels, minmax, cfg.group_sizes, cfg.min_bits,
                    cfg.max_bits, cfg.param, cfg.extra_bits, cfg.backend)  # fmt: skip
    return out, levels, minmax


class StraightThrough(torch.autograd.Function):
    """``(quantized, *weights) -> quantized``, the gradient passed to the weights
    unchanged (``w + (q - w).detach()`` without the two extra passes)."""

    @staticmethod
    def forward(ctx, quantized: list[Tensor], *weights: Tensor):
        return tuple(quantized)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        return (None, *grads)

"""Pure-PyTorch ground truth of the fused step (SPEC.md §8).

``fused_step_`` is the base optimizer's update applied to the latent weights,
written like torch's own single-tensor SGD / Adam / AdamW (the same operations
in the same order), then the reference ``quant_prox_`` on the updated latents.
Ordinary per-parameter PyTorch; the arithmetic is float32 whatever the
parameter dtype (SPEC.md §6), and the latent and the optimizer state are stored
back in their own dtype. Never change this file to match a kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from parq_kernels import reference
from parq_kernels.kinds import NUM_HPARAMS, OptimKind


def sgd_update_(w: Tensor, grad: Tensor, buf: Tensor | None, hparams: tuple[float, ...]) -> None:
    """torch.optim.SGD's update of ``w`` (float32, in place); ``buf`` likewise."""
    lr, momentum, dampening, weight_decay, nesterov, maximize, init_buf = hparams
    g = -grad if maximize else grad
    if weight_decay != 0:
        g = g.add(w, alpha=weight_decay)
    if momentum != 0:
        if init_buf:
            buf.copy_(g)
        else:
            buf.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(buf, alpha=momentum) if nesterov else buf
    w.add_(g, alpha=-lr)


def adam_update_(
    w: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    hparams: tuple[float, ...],
    decoupled: bool,
) -> None:
    """torch.optim.Adam's (``decoupled``: AdamW's) update of ``w`` and the moments."""
    lr, beta1, beta2, eps, weight_decay, maximize, amsgrad, step = hparams
    g = -grad if maximize else grad
    if weight_decay != 0:
        if decoupled:
            w.mul_(1 - lr * weight_decay)
        else:
            g = g.add(w, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-step_size)


def base_update_(
    latent: Tensor,
    grad: Tensor,
    bufs: tuple[Tensor | None, Tensor | None, Tensor | None],
    optim_kind: int,
    hparams: tuple[float, ...],
) -> Tensor:
    """One base-optimizer update of ``latent`` and its state, computed in float32.

    An element whose new latent or new state is NaN/Inf (as stored) keeps its old
    latent and state (ops.py: non-finite values never enter the optimizer's state).
    Returns the mask of the elements that took their update.
    """
    kind = OptimKind(optim_kind)
    w = latent.float().clone()
    g = grad.float()
    state = [None if b is None else b.float().clone() for b in bufs]
    if kind == OptimKind.SGD:
        sgd_update_(w, g, state[0], hparams)
    else:
        adam_update_(w, g, state[0], state[1], state[2], hparams, kind == OptimKind.ADAMW)
    new = [w.to(latent.dtype)] + [None if s is None else s.to(b.dtype) for s, b in
                                  zip(state, bufs, strict=True)]  # fmt: skip
    ok = torch.isfinite(new[0])
    for t in new[1:]:
        if t is not None:
            ok &= torch.isfinite(t)
    latent.copy_(torch.where(ok, new[0], latent))
    for b, t in zip(bufs, new[1:], strict=True):
        if b is not None:
            b.copy_(torch.where(ok, t, b))
    return ok


def _entry(bufs: list[Tensor], i: int) -> Tensor | None:
    return bufs[i] if bufs else None


def fused_step_(
    params: list[Tensor],
    latents: list[Tensor],
    grads: list[Tensor],
    bufs1: list[Tensor],
    bufs2: list[Tensor],
    bufs3: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    optim_kind: int,
    hparams: tuple[float, ...],
    quant_kind: int,
    bits: int,
    qargs: tuple[float, ...],
    center: bool,
    update: bool,
    prox_kind: int,
    prox_arg: float,
    gamma: float,
) -> None:
    """Reference backend of ``parq_kernels::fused_step_`` (contract in ops.py)."""
    kind = OptimKind(optim_kind)
    if len(hparams) != NUM_HPARAMS[kind]:
        raise ValueError(f"hparams of {kind.name} needs {NUM_HPARAMS[kind]} entries")
    for i, (p, latent, grad) in enumerate(zip(params, latents, grads, strict=True)):
        bufs = (_entry(bufs1, i), _entry(bufs2, i), _entry(bufs3, i))
        ok = base_update_(latent, grad, bufs, kind, tuple(hparams))
        # a rejected update reaches quant_prox_ as NaN: it keeps the latent and is flagged
        p.copy_(torch.where(ok, latent, torch.full_like(p, float("nan"))))
    reference.quant_prox_(params, latents, quants, nonfinite, quant_kind, bits, qargs, center,
                          update, prox_kind, prox_arg, gamma)  # fmt: skip

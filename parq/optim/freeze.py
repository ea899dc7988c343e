"""Freezing the quantized weights at ``freeze_step`` (SPEC.md §9).

At step ``n == freeze_step`` (counted like ``num_steps``) the step runs as usual but
with fresh levels for every quantized parameter and the hard projection
``p = hard(p)`` whatever the prox map, and then ``latent = p``. At every later step
the quantized parameters are frozen: the base optimizer does not see them (their
gradients are ignored, their base state is kept as it is), no prox is applied and
``latent = p`` stays true; the other groups (biases, BatchNorm) keep training.
Nothing is stored beyond ``num_steps``: a frozen optimizer's ``state_dict()``
round-trips through ``load_state_dict`` of one built with the same ``freeze_step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral

import torch

from parq.optim.fused_step import GroupPath
from parq.optim.proxmap import ProxHardQuant

FROZEN = "frozen"


def check_freeze_step(freeze_step: int | None, warmup_steps: int) -> int | None:
    """``freeze_step`` as an int (or None); raises ValueError naming it if invalid."""
    if freeze_step is None:
        return None
    if isinstance(freeze_step, bool) or not isinstance(freeze_step, Integral):
        raise ValueError(f"freeze_step must be None or an int, got {freeze_step!r}")
    if freeze_step < warmup_steps:
        raise ValueError(
            f"freeze_step must be >= warmup_steps (the levels are first computed at step "
            f"warmup_steps), got freeze_step={freeze_step}, warmup_steps={warmup_steps}"
        )
    return int(freeze_step)


def is_frozen(opt, n: int) -> bool:
    """Are the quantized parameters frozen at step ``n`` (after the freeze step)?"""
    return opt.freeze_step is not None and n > opt.freeze_step


@contextmanager
def hard_projection(opt) -> Iterator[None]:
    """The freeze step: every path sees :class:`ProxHardQuant` as the prox map; on exit
    (a normal one) ``latent = p`` for every quantized parameter."""
    prox_map = opt.prox_map
    opt.prox_map = ProxHardQuant()
    try:
        yield
    finally:
        opt.prox_map = prox_map
    opt.save_latent_params()


@torch.no_grad()
def frozen_step(opt, closure: Callable[[], float] | None, n: int) -> float | None:
    """One step with the quantized groups frozen: ``base_optimizer.step()`` over the
    other groups only (the closure evaluated once, first, as torch does)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    quantized = {index for index, _, _ in opt._quantized_params()}
    if len(quantized) < len(opt.param_groups):
        opt._base_step_without(quantized)
    why = f"freeze_step={opt.freeze_step}"
    opt._paths = {i: GroupPath(FROZEN, why) if i in quantized else GroupPath("base step", "")
                  for i in range(len(opt.param_groups))}  # fmt: skip
    opt.num_steps = n + 1
    return loss

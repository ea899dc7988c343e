"""The base step of the groups the fused step does not serve, as torch's own fused kernel call.

In a real model most tensors are not quantized (biases, norms), and the fused step's
groups leave them to ``base_optimizer.step()`` over the other groups. For torch's
``SGD`` / ``Adam`` / ``AdamW`` with ``fused=True`` that call spends most of its time in
Python (the optimizer wrapper, ``_init_group``'s per-parameter state lookups, grouping the
tensors by device and dtype) before it calls one fused kernel per group: on ResNet-20's 43
unquantized tensors, ~0.2 ms of a step whose quantized part is another ~0.2 ms (issue 20).

Once such a group has taken torch's step (its state exists), its lists (parameters,
momentum buffers or moments, step counters) are kept here, and each later step calls the
same kernel torch's step would call (``torch._fused_sgd_``, ``torch._fused_adam_`` /
``torch._fused_adamw_``) with the group's current options: the same bits, since it is
the same call (Adam's step counters, which torch counts with ``torch._foreach_add_``,
through :func:`parq_kernels.backends.step_counter`: the same values). It is taken only
where that holds:

* the base optimizer is torch's class (:func:`parq.optim.fused_step.base_kind`) without
  step hooks of its own or global ones, and its ``step`` is not replaced on the instance
  (an LR scheduler attached to the base optimizer does that: its step counting stays);
* the group is ``fused=True``, not differentiable, its ``lr`` and ``betas`` are numbers,
  and the optimizer has no ``grad_scale`` / ``found_inf`` (set by AMP's grad scaler);
* every parameter of the group is a plain tensor (not a DTensor) with a dense gradient, all
  on one device and dtype, and the state holds its buffers (not a first step).

Each step checks, per parameter, the same parameter list, a dense gradient and the same
state dict and state tensors; anything else takes ``base_optimizer.step()`` as before. The
kept lists live in the optimizer's ``_fused_views`` (dropped by a loaded checkpoint, a
copy or a pickle). One difference from ``base_optimizer.step()`` remains by design: the
torch profiler shows no ``Optimizer.step#SGD.step`` range for these groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parq.optim import fused_call, routing, shard_plan
from parq.optim.fused_step import optim_kind
from parq_kernels import backends
from parq_kernels.kinds import OptimKind

KEY = "base"  # the kept lists' entries in the views cache: (KEY, group index) -> BaseCall


@dataclass
class BaseCall:
    """One group's lists for torch's fused kernel, and what they are valid for."""

    key: tuple  # the options the lists depend on (_lists_key)
    state: object  # the optimizer's state mapping
    params: list[Tensor]
    states: list[dict | None]  # (None: SGD without momentum keeps no state)
    watched: tuple[list, list, list]  # fused_call.watch() of the buffers in the lists
    lists: tuple[list[Tensor], ...]  # SGD: (momentum buffers,); Adam: (m, v, max v, steps)


def _names(kind: OptimKind, group: dict) -> tuple[str, ...]:
    if kind == OptimKind.SGD:
        return ("momentum_buffer",) if group["momentum"] != 0 else ()
    amsgrad = ("max_exp_avg_sq",) if group["amsgrad"] else ()
    return ("exp_avg", "exp_avg_sq", *amsgrad, "step")


def _lists_key(kind: OptimKind, group: dict) -> tuple:
    if kind == OptimKind.SGD:
        return (kind, group["momentum"] != 0)
    return (kind, bool(group["amsgrad"]))


def usable(base) -> bool:
    """Can any group of ``base`` take torch's fused kernel directly (module doc)?"""
    return (
        "step" not in vars(base)
        and getattr(base, "grad_scale", None) is None
        and getattr(base, "found_inf", None) is None
        and not routing.has_step_hooks(base)
    )


def _group_ok(group: dict) -> bool:
    if not group.get("fused") or group.get("differentiable"):
        return False
    if isinstance(group["lr"], Tensor):
        return False
    return not any(isinstance(b, Tensor) for b in group.get("betas", ()))


def _build(opt, kind: OptimKind, group: dict, params: list[Tensor]) -> BaseCall | None:
    """The group's lists, if its state is there (torch's step has run) and the tensors are
    on one device and dtype; else None (``base_optimizer.step()`` serves it)."""
    if not params:
        return None
    names = _names(kind, group)
    state = opt.state
    states = [state.get(p) for p in params]
    if names and any(st is None or not all(k in st for k in names) for st in states):
        return None  # (SGD without momentum keeps no state)
    p0 = params[0]
    if any(p.device != p0.device or p.dtype != p0.dtype for p in params):
        return None
    if shard_plan.has_dtensor(params):  # FSDP2 / DTensor: torch's step, as it is
        return None
    lists = tuple([st[k] for st in states] for k in names)
    if kind != OptimKind.SGD and not group["amsgrad"]:  # (m, v, steps) -> (m, v, [], steps)
        lists = (lists[0], lists[1], [], lists[2])
    watched = fused_call.watch(states, names)
    return BaseCall(_lists_key(kind, group), state, list(params), states, watched, lists)


def _valid(call: BaseCall, opt, kind: OptimKind, group: dict, params: list[Tensor]) -> bool:
    if call.state is not opt.state or call.key != _lists_key(kind, group):
        return False
    return fused_call.same_state(opt.state, params, call.params, call.states, call.watched)


def _grads(params: list[Tensor]) -> list[Tensor] | None:
    """The parameters' gradients if each has a dense one (torch skips a missing one)."""
    grads = [p.grad for p in params]
    strided = torch.strided
    for g in grads:
        if g is None or g.layout is not strided:
            return None
    return grads


def _call(kind: OptimKind, group: dict, params: list[Tensor], grads: list[Tensor],
          lists: tuple[list[Tensor], ...]) -> None:  # fmt: skip
    """The kernel call of torch's ``_fused_sgd`` / ``_fused_adam`` for one device and dtype,
    after its first step (no first-step buffers, no grad scaler)."""
    if kind == OptimKind.SGD:
        torch._fused_sgd_(
            params, grads, lists[0] if lists else [],
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"], is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
        return
    exp_avgs, exp_avg_sqs, max_sqs, steps = lists
    beta1, beta2 = group["betas"]
    backends.step_counter()(steps)  # torch._foreach_add_(steps, 1), faster
    kernel = torch._fused_adamw_ if kind == OptimKind.ADAMW else torch._fused_adam_
    kernel(
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, amsgrad=bool(group["amsgrad"]),
        lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
        eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None,
    )  # fmt: skip


def step_groups(opt, groups: list[tuple[int, dict]]) -> list[dict]:
    """Step what it can of ``groups`` (``(index, group)``, the base optimizer's groups left
    to its step) through torch's fused kernels directly; returns the groups it left."""
    if not groups:
        return []
    base = opt.base_optimizer
    views = opt.__dict__.setdefault("_fused_views", {})
    if opt._base_kind is None or not usable(base):
        for index, _ in groups:
            views.pop((KEY, index), None)
        return [g for _, g in groups]
    left = []
    for index, group in groups:
        kind = optim_kind(base, opt._base_kind, group)
        params = group["params"]
        grads = _grads(params) if _group_ok(group) else None
        call = views.get((KEY, index)) if grads is not None else None
        if call is not None and not _valid(call, opt, kind, group, params):
            call = None
        if call is None and grads is not None:
            call = _build(opt, kind, group, params)
        if call is None:
            views.pop((KEY, index), None)
            left.append(group)
            continue
        views[(KEY, index)] = call
        _call(kind, group, call.params, grads, call.lists)
    return left

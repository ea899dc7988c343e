"""The fused step's call of one parameter group, kept between steps (issue 20).

A model is many tensors, most of them small; the per-parameter Python of a step (routing,
state lookups, 2-D views, bucketing) cost more than the kernel on such sets. After a
group has taken the fused step once (:func:`parq.optim.fused_step.step_group`), its op
arguments are kept here: the 2-D views of the weights, latents, levels and state buffers,
the resolved kernel (for the C++ kernels, the extension's ``fused_step_call``: the op
without torch.ops' Python argument parsing, parq_kernels.backends.kept_step_impl) and the
step counter. At the next step :func:`ready` checks, per parameter, only what could have
changed (the same tensor, its storage, its state's tensors in its state dict, a dense
gradient of its dtype and shape: that part in one C++ pass where the extension is built,
parq_kernels.backends.grads_checker) and, per group, the optimizer's state mapping
(replaced by a loaded checkpoint) and the options the route and the views depend on; then
the group's route is the fused step without the per-parameter checks of
:mod:`parq.optim.routing`, and :func:`run` makes one op call with the gradients (as they
are for the C++ kernels, 2-D views for the others). Anything else (a first step, a
DTensor, a parameter without a gradient, a state buffer replaced, a setup change) takes
the general code, which builds the call again.

The cache lives in the optimizer's ``_fused_views`` (parq.optim.checkpoint.CACHES): a
loaded checkpoint, a copy or a pickle starts without it. Adam's step counters are read
once when the call is built and counted here after (the state's ``step`` tensors are still
incremented at every step, as torch does): an in-place write to a ``step`` tensor between
steps is not seen (replacing the tensor is).
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from parq_kernels import backends
from parq_kernels.kinds import OptimKind

KEY = "call"  # the calls' entries in the views cache: (KEY, group index) -> GroupCall
# backends whose fused_step_ reads a gradient of any contiguous shape of its parameter's
# numel (the C++ kernels: csrc/validate_step.cpp); the others get (rows, cols) views
RAW_GRADS = backends.COMPILED


@dataclass
class GroupCall:
    """One group's fused-step op arguments and what they are valid for."""

    route_key: tuple  # the options the route and the views follow (route_key())
    state: object  # the optimizer's state mapping
    params: list[Tensor]
    ptrs: list[int]
    states: list[dict]
    watched: tuple[list, list, list]  # watch(): "latent", "quants", buffers, "step"
    shapes: list[tuple[int, int]]
    views: list[int]  # per parameter, how its gradient becomes (rows, cols): _view_mode()
    dtype: torch.dtype
    kind: OptimKind
    outs: list[Tensor]
    lats: list[Tensor]
    bufs: list[list[Tensor]]
    quants: list[Tensor]
    items: list[tuple[int, Tensor]]  # (index in the group, parameter): the flags' order
    stepped: list[Tensor]  # Adam: the state's step tensors
    step: float  # Adam: the step number of the next call
    impl_key: tuple
    impl: object
    count: object  # Adam: adds 1 to the step tensors (backends.step_counter)
    check: object  # the gradients if the kernel takes them as they are (backends.grads_checker)
    views_needed: bool  # any(views): some gradient needs a view
    grads: list[Tensor] | None = field(default=None, repr=False)  # set by ready(), one step


def route_key(opt, group: dict, quantizer) -> tuple:
    """What a group's route and views depend on besides its parameters and their state."""
    return (opt.fused, opt.fuse_base_step, opt.backend, id(quantizer), id(opt.prox_map),
            opt._base_kind, bool(group.get("differentiable")), group["quant_bits"],
            group.get("quant_block_size"), opt.quant_per_channel,
            group.get("decoupled_weight_decay"), group.get("momentum"),
            group.get("amsgrad"))  # fmt: skip


def _view_mode(shape: torch.Size, shape2d: tuple[int, int]) -> int:
    """0: the gradient as it is ((rows, cols) already, a Linear weight per channel, or any
    shape for the C++ kernels: RAW_GRADS); 1: its ``flatten(1)`` (a conv weight per
    channel); 2: ``view(rows, cols)``. (A view costs ~1.5 us, more than the rest of a
    parameter's checks.)"""
    if tuple(shape) == shape2d:
        return 0
    if len(shape) > 2 and shape[0] == shape2d[0]:
        return 1
    return 2


def watch(states: list[dict], keys: tuple[str, ...]) -> tuple[list, list, list]:
    """The flat lists :func:`same_state` reads: each state dict once per key, the keys, and
    the tensors they hold now."""
    return ([st for st in states for _ in keys], [k for _ in states for k in keys],
            [st[k] for st in states for k in keys])  # fmt: skip


def same_state(state, params: list[Tensor], kept: list[Tensor], states: list,
               watched: tuple[list, list, list]) -> bool:  # fmt: skip
    """Are ``params`` the ``kept`` parameters, each with its kept state dict (``state.get``),
    whose watched entries (:func:`watch`) still hold the kept tensors? (``map`` over the
    parameters: no Python bytecode per parameter.)"""
    dicts, keys, tensors = watched
    return (
        len(params) == len(kept)
        and all(map(operator.is_, params, kept))
        and all(map(operator.is_, map(state.get, params), states))
        and all(map(operator.is_, map(dict.get, dicts, keys), tensors))
    )


def _impl_key(device: torch.device, backend: str | None) -> tuple:
    return (device, backend, os.environ.get(backends.ENV_VAR))


def _views(opt) -> dict:
    return opt.__dict__.setdefault("_fused_views", {})


def build(opt, index: int, group: dict, quantizer, kind: OptimKind, keys: list[str],
          items: list, tag: tuple) -> None:  # fmt: skip
    """Keep the call of a group whose step just took the fused step in one op call on plain
    tensors (``items``: :class:`parq.optim.fused_step._Item`; ``tag``: its bucket's)."""
    if kind == OptimKind.SGD and tag and tag[0]:
        return  # a momentum buffer's first step: the next one is not like it
    host = getattr(quantizer, "host_levels", None)
    if host is not None and host(group["quant_bits"]):
        return  # refined LSBQ: its level updates take another route (routing.host_levels)
    params = [it.p for it in items]
    device = params[0].device
    watched_keys = ("latent", "quants", *keys) + (("step",) if kind != OptimKind.SGD else ())
    states = [opt.state[p] for p in params]
    bufs = [[it.bufs[k] for it in items if len(it.bufs) > k] for k in range(3)]
    key = _impl_key(device, opt.backend)
    name = backends.resolve(device, opt.backend)
    raw = name in RAW_GRADS  # the gradients as they are: no view per parameter and step
    views = [0 if raw else _view_mode(p.shape, tuple(it.out.shape))
             for p, it in zip(params, items, strict=True)]  # fmt: skip
    call = GroupCall(
        route_key=route_key(opt, group, quantizer),
        state=opt.state,
        params=params,
        ptrs=[p.data_ptr() for p in params],
        states=states,
        watched=watch(states, watched_keys),
        shapes=[tuple(it.out.shape) for it in items],
        views=views,
        dtype=params[0].dtype,
        kind=kind,
        outs=[it.out for it in items],
        lats=[it.latent for it in items],
        bufs=bufs,
        quants=[it.Q for it in items],
        items=[(it.j, it.p) for it in items],
        stepped=[st["step"] for st in states] if kind != OptimKind.SGD else [],
        step=tag[0] + 1 if kind != OptimKind.SGD else 0.0,
        impl_key=key,
        impl=backends.kept_step_impl(name),
        count=backends.step_counter(),
        check=backends.grads_checker(),
        views_needed=any(views),
    )
    _views(opt)[(KEY, index)] = call


def take(opt, index: int) -> GroupCall | None:
    """The group's kept call if :func:`ready` accepted it at this step."""
    call = _views(opt).get((KEY, index))
    return call if call is not None and call.grads is not None else None


def forget(opt, index: int) -> None:
    _views(opt).pop((KEY, index), None)


def ready(opt, index: int, group: dict, params: list[Tensor], quantizer) -> bool:
    """Does the kept call serve this group's step? If so, its gradients' views are set.
    (The checks run as ``map`` over the parameters: no Python bytecode per parameter.)"""
    call = _views(opt).get((KEY, index))
    if call is None:
        return False
    call.grads = None
    if call.route_key != route_key(opt, group, quantizer):
        return False
    if call.impl_key != _impl_key(call.params[0].device, opt.backend):
        return False
    state = opt.state
    if state is not call.state:  # a loaded checkpoint replaces it
        return False
    if not same_state(state, params, call.params, call.states, call.watched):
        return False
    # dense contiguous gradients, the parameters on their storage and of their dtype (torch's
    # grad setter keeps the gradient's dtype and shape those of p)
    grads = call.check(params, call.ptrs, call.dtype)
    if grads is None:
        return False
    if call.views_needed:
        views = zip(grads, call.views, call.shapes, strict=True)
        grads = [g if m == 0 else (g.flatten(1) if m == 1 else g.view(*s)) for g, m, s in views]
    call.grads = grads
    return True


def run(opt, index: int, call: GroupCall, hparams: list[float], tail: tuple, n: int) -> None:
    """The kept call of a group that :func:`ready` accepted (:func:`take`; ``tail``: the op's
    quantizer and prox arguments, ``backend`` excluded)."""
    grads, call.grads = call.grads, None
    flags = torch.zeros(len(call.params), dtype=torch.int32, device=call.params[0].device)
    call.impl(call.outs, call.lats, grads, *call.bufs, call.quants, flags, int(call.kind),
              tuple(hparams), *tail)  # fmt: skip
    if call.stepped:
        call.count(call.stepped)  # torch._foreach_add_(call.stepped, 1), faster
        call.step += 1
    opt._note_nonfinite(index, call.items, flags, n)

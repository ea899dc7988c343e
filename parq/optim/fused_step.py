"""The fused QAT step (SPEC.md §8): base-optimizer update, quantize and prox in one op.

For a quantized group whose base optimizer is ``torch.optim.SGD``, ``Adam`` or
``AdamW`` (not a subclass that overrides ``step``), ``QuantOptimizer.step()``
does not hand the group to ``base_optimizer.step()``: one
``parq_kernels::fused_step_`` call per (device, dtype) reads the latent, the
gradient and the optimizer state, and writes the new latent, the new state and
the projected weights. The math is torch's own update applied to the latent,
so the result equals the unfused path (``base.step()`` on ``p = latent``, then
the quantize/prox op); the state keeps torch's keys, dtypes and shapes, so a
checkpoint moves freely between the two paths and a plain torch optimizer.

:func:`route` decides, per group and step, whether a group takes this path and
if not, why; :func:`step_group` runs it. Parameters without a gradient are not
updated (as in torch) but still projected: they go through ``quant_prox_`` from
their latent.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import SGD, Adam, AdamW, Optimizer

from parq.optim import fused_call, shard_plan, sharding
from parq.optim.prox_paths import latent_of, reusable_levels
from parq_kernels.kinds import OptimKind
from parq_kernels.ops import fused_step_, quant_prox_

try:
    from torch.optim.optimizer import _get_scalar_dtype
except ImportError:  # older torch: the step counter is float32

    def _get_scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
        return torch.float32


@dataclass(frozen=True)
class GroupPath:
    """Which path a parameter group took in the last ``step()``, and why.

    ``path`` is one of ``"fused step"`` (the base update fused with quantize +
    prox), ``"base step + fused prox"`` (``base_optimizer.step()``, then the
    fused quantize/prox op), ``"base step + generic prox"`` (the per-parameter
    path of the public release), ``"base step + sharded prox"`` (DTensor
    parameters, SPEC.md §7), ``"base step"`` (not quantized, or warmup).
    ``reason`` says why a quantized group did not take the fused step.
    """

    path: str
    reason: str = ""

    def __str__(self) -> str:
        return f"{self.path} ({self.reason})" if self.reason else self.path


def _unwrapped(fn):
    """``fn`` without its wrappers (torch's profiling hooks; torch.compile wraps the
    optimizers' ``step`` and ``_init_group`` per class, once it has been used)."""
    return inspect.unwrap(fn)


def _same(cls, root, name: str) -> bool:
    return _unwrapped(getattr(cls, name)) is _unwrapped(getattr(root, name))


def base_kind(base: Optimizer) -> tuple[OptimKind | None, str]:
    """``(kind, "")`` if the fused kernels serve ``base``'s update, else ``(None, why)``."""
    cls = type(base)
    if isinstance(base, SGD):
        if _same(cls, SGD, "step") and _same(cls, SGD, "_init_group"):
            return OptimKind.SGD, ""
        return None, f"{cls.__name__} overrides torch.optim.SGD's step"
    if isinstance(base, (Adam, AdamW)):
        root = Adam if isinstance(base, Adam) else AdamW  # AdamW subclasses Adam in torch >= 2.6
        if _same(cls, root, "step") and _same(cls, root, "_init_group"):
            return OptimKind.ADAM, ""  # ADAM or ADAMW: decided per group (decoupled_weight_decay)
        return None, f"{cls.__name__} overrides torch.optim.{root.__name__}'s step"
    return None, f"{cls.__name__} is not torch.optim.SGD, Adam or AdamW"


def group_reason(group: dict, params: list[Tensor]) -> str:
    """Why ``group`` cannot take the fused step this time ("" if it can); the dtypes
    were checked already (:func:`parq.optim.routing.use_fused`)."""
    if group.get("differentiable"):
        return "differentiable=True"
    for p in params:
        if p.grad is not None and (p.grad.is_sparse or p.grad.layout != torch.strided):
            return "sparse gradients"
    return ""


def optim_kind(base: Optimizer, kind: OptimKind, group: dict) -> OptimKind:
    if kind == OptimKind.SGD:
        return kind
    decoupled = group.get("decoupled_weight_decay", isinstance(base, AdamW))
    return OptimKind.ADAMW if decoupled else OptimKind.ADAM


def _rows(t: Tensor, shape2d: tuple[int, int]) -> Tensor:
    """``t`` as a contiguous ``(rows, cols)`` tensor: a view when possible, else a copy."""
    return t.view(shape2d) if t.is_contiguous() else t.contiguous().view(shape2d)


def _init_adam_state(group: dict, p: Tensor, state: dict) -> None:
    """torch.optim.Adam's lazy state initialization (its ``_init_group``)."""
    if group.get("capturable") or group.get("fused"):
        dtype = _get_scalar_dtype(is_fused=group.get("fused"))
        state["step"] = torch.zeros((), dtype=dtype, device=p.device)
    else:
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group["amsgrad"]:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


@dataclass
class _Item:
    """One parameter of a fused-step call: its 2-D views and what to write back."""

    j: int
    p: Tensor
    out: Tensor  # (rows, cols) written with the projected weights
    latent: Tensor
    grad: Tensor | None
    bufs: list[Tensor]  # 2-D views of the state buffers the op updates
    Q: Tensor
    writeback: list[tuple[Tensor, Tensor]]  # (original, contiguous copy) pairs


def _levels_and_latent(opt, group: dict, index: int, j: int, p: Tensor, K: int, fresh: bool):
    """``(local weights, (rows, cols), latent, Q)`` of ``p``: local shards and their state
    (created like the sharded path does, SPEC §7) for a DTensor; else the tensors."""
    state = opt.state[p]
    if shard_plan.is_dtensor(p):
        plan = sharding.cached_plan(opt, index, j, p, group.get("quant_block_size"), K)
        before = state.get("latent")
        latent = sharding.latent_buffer(state, p, plan)
        if state.get("latent") is not before:  # created: the latent starts at p
            latent.copy_(plan.local)
        return (
            plan.local,
            (plan.rows_local, plan.cols_local),
            latent,
            (sharding.quants_buffer(state, plan, fresh)),
        )
    layout = opt._layout(group, index, j, p)
    latent = latent_of(state, p)  # warmup just ended or a late parameter: starts at p
    Q = state.get("quants")
    q_shape = (layout.rows, K) if layout.grouped else (K,)
    if fresh and not reusable_levels(Q, q_shape, p.device):
        Q = state["quants"] = torch.empty(q_shape, dtype=torch.float32, device=p.device)
    return p, (layout.rows, layout.cols), latent, Q


@dataclass
class _Cached:
    """The 2-D views of a parameter's step, kept between level updates: valid while the
    weights' storage, the latent, the levels and the state buffers are the same objects.
    The gradient's view is made at every step and dropped after it (never kept alive)."""

    item: _Item
    ptr: int
    latent: Tensor
    Q: Tensor
    bufs: tuple[Tensor, ...]
    layout: tuple  # (quant_block_size, quant_per_channel, K): what the views' shapes follow
    shape2d: tuple[int, int]


@dataclass(frozen=True)
class _GroupCtx:
    """What the parameters of one group's step share (computed once per group)."""

    cache: dict  # (index, j) -> _Cached
    keys: list[str]  # the base optimizer's state buffers
    layout: tuple  # _Cached.layout of this step


def _views_cache(opt) -> dict:
    cache = opt.__dict__.get("_fused_views")
    if cache is None:
        cache = opt.__dict__["_fused_views"] = {}
    return cache


def _layout_key(opt, group: dict, K: int) -> tuple:
    return (group.get("quant_block_size"), opt.quant_per_channel, K)


def _cached_item(ctx: _GroupCtx, kind: OptimKind, index: int, j: int, p: Tensor, state: dict):
    """``(item, tag)`` from the cache, or None to rebuild it."""
    hit = ctx.cache.get((index, j))
    if hit is None or hit.item.p is not p or hit.layout != ctx.layout:
        return None
    grad = p.grad
    if grad is None or p.data_ptr() != hit.ptr:
        return None
    if state.get("latent") is not hit.latent or state.get("quants") is not hit.Q:
        return None
    if len(ctx.keys) != len(hit.bufs):
        return None
    for key, buf in zip(ctx.keys, hit.bufs, strict=True):
        if state.get(key) is not buf:
            return None
    if grad.dtype != p.dtype or grad.shape != p.shape:
        return None
    hit.item.grad = _rows(grad, hit.shape2d)
    if kind != OptimKind.SGD:
        return hit.item, (float(state["step"]) + 1,)
    return hit.item, ((False,) if ctx.keys else ())


def _state_keys(kind: OptimKind, group: dict) -> list[str]:
    if kind == OptimKind.SGD:
        return ["momentum_buffer"] if group["momentum"] != 0 else []
    return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])


def _prepare(opt, ctx: _GroupCtx, kind: OptimKind, group: dict, index: int, j: int,
             p: Tensor, state: dict, K: int, fresh: bool):  # fmt: skip
    """The :class:`_Item` of ``p`` and its bucket key (also creates missing state). A plain
    tensor's views come from the cache (:class:`_Cached`) while its storage, state, levels
    buffer and layout stay the same (level updates write the same levels buffer)."""
    hit = _cached_item(ctx, kind, index, j, p, state)
    if hit is not None:
        return hit
    item, tag = _prepare_views(opt, kind, group, index, j, p, K, fresh)
    if item.grad is not None and not item.writeback and not shard_plan.is_dtensor(p):
        state = opt.state[p]
        bufs = tuple(state[k] for k in ctx.keys)
        ctx.cache[(index, j)] = _Cached(item, p.data_ptr(), state["latent"], state["quants"],
                                        bufs, ctx.layout, tuple(item.out.shape))  # fmt: skip
    return item, tag


def _prepare_views(opt, kind: OptimKind, group: dict, index: int, j: int, p: Tensor, K: int,
                   fresh: bool):  # fmt: skip
    """:func:`_prepare` without the cache."""
    local, shape2d, latent, Q = _levels_and_latent(opt, group, index, j, p, K, fresh)
    state = opt.state[p]
    writeback = []
    out = local.view(shape2d) if local.is_contiguous() else torch.empty(
        shape2d, dtype=local.dtype, device=local.device)  # fmt: skip
    if not local.is_contiguous():
        writeback.append((local, out))
    grad = p.grad
    if grad is None:
        return _Item(j, p, out, latent.view(shape2d), None, [], Q.view(-1, K), writeback), (
            "nograd",
        )
    keys, tag = _state_keys(kind, group), ()
    if kind == OptimKind.SGD:
        if keys:
            init = state.get("momentum_buffer") is None
            if init:  # zeros: what a rejected (non-finite) first update leaves
                state["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.contiguous_format
                )
            tag = (init,)
    else:
        if "step" not in state:
            _init_adam_state(group, p, state)
        tag = (float(state["step"]) + 1,)
    for key in keys:  # the model's dtype changed mid-training: the state follows it
        if state[key].dtype != p.dtype:
            state[key] = state[key].to(p.dtype)
    bufs = [state[key] for key in keys]
    views = []
    for b in shard_plan.local_tensors(bufs):
        v = _rows(b, shape2d)
        if v.data_ptr() != b.data_ptr() or not b.is_contiguous():
            writeback.append((b, v))
        views.append(v)
    grad2d = _rows(shard_plan.local_tensors([grad])[0], shape2d)
    item = _Item(j, p, out, latent.view(shape2d), grad2d, views, Q.view(-1, K), writeback)
    return item, tag


def _hparams(kind: OptimKind, group: dict, tag: tuple) -> list[float]:
    maximize = float(bool(group.get("maximize", False)))
    if kind == OptimKind.SGD:
        init = float(bool(tag and tag[0]))
        return [float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                float(group["weight_decay"]), float(bool(group["nesterov"])), maximize,
                init]  # fmt: skip
    beta1, beta2 = (float(b) for b in group["betas"])
    return [float(group["lr"]), beta1, beta2, float(group["eps"]), float(group["weight_decay"]),
            maximize, float(bool(group["amsgrad"])), tag[0]]  # fmt: skip


def step_group(
    opt, kind: OptimKind, index: int, group: dict, params: list[Tensor], quantizer,
    gamma: float, update: bool, n: int,
) -> float | None:  # fmt: skip
    """Base update + quantize + prox of one quantized group (module doc)."""
    if not params:
        return None
    kind = optim_kind(opt.base_optimizer, kind, group)
    bits = group["quant_bits"]
    qkind, qargs = quantizer.kernel_spec(bits)
    prox_kind, prox_arg, rho = opt.prox_map.schedule(n)
    qa = (int(qkind), bits, list(qargs), quantizer.center)
    keys = _state_keys(kind, group)
    call = fused_call.take(opt, index)  # kept from the last step, checked by routing (ready)
    if call is not None:
        tag = (call.step,) if kind != OptimKind.SGD else ((False,) if keys else ())
        tail = (*qa[:2], tuple(qargs), quantizer.center, update, int(prox_kind),
                float(prox_arg), float(gamma))  # fmt: skip
        fused_call.run(opt, index, call, _hparams(kind, group, tag), tail, n)
        return rho
    K = quantizer.get_quant_size(bits)
    buckets: dict[tuple, list[_Item]] = {}
    ctx = _GroupCtx(_views_cache(opt), keys, _layout_key(opt, group, K))
    states = opt.state
    for j, p in enumerate(params):
        state = states[p]
        fresh = update or "quants" not in state
        item, tag = _prepare(opt, ctx, kind, group, index, j, p, state, K, fresh)
        buckets.setdefault((p.device, p.dtype, fresh, tag), []).append(item)
    stepped: list[Tensor] = []
    for (device, _dtype, fresh, tag), items in buckets.items():
        flags = torch.zeros(len(items), dtype=torch.int32, device=device)
        outs = [it.out for it in items]
        lats = [it.latent for it in items]
        Qs = [it.Q for it in items]
        tail = (*qa, fresh, int(prox_kind), float(prox_arg), float(gamma), opt.backend or "")
        if tag == ("nograd",):  # not updated, still projected: from the latent
            torch._foreach_copy_(outs, lats)
            quant_prox_(outs, lats, Qs, flags, *tail)
        else:
            bufs = [[it.bufs[k] for it in items if len(it.bufs) > k] for k in range(3)]
            fused_step_(outs, lats, [it.grad for it in items], *bufs, Qs, flags, int(kind),
                        _hparams(kind, group, tag), *tail)  # fmt: skip
            if kind != OptimKind.SGD:
                stepped += [opt.state[it.p]["step"] for it in items]
        for it in items:
            for original, copy in it.writeback:
                original.copy_(copy.view(original.shape))
            it.grad = None  # a cached item must not keep the gradient alive
        opt._note_nonfinite(index, [(it.j, it.p) for it in items], flags, n)
    if stepped:
        torch._foreach_add_(stepped, 1)
    fused_call.forget(opt, index)
    if len(buckets) == 1:  # one op call on plain tensors: kept for the next step
        (_, _, _, tag), items = next(iter(buckets.items()))
        if (
            len(items) == len(params)
            and tag != ("nograd",)
            and not any(it.writeback or shard_plan.is_dtensor(it.p) for it in items)
        ):
            fused_call.build(opt, index, group, quantizer, kind, keys, items, tag)
    return rho

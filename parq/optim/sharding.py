"""Sharded parameters (FSDP2 / DTensor) in ``QuantOptimizer.step`` (SPEC.md §7).

A quantized DTensor parameter is cut into quantization groups (SPEC.md §2) on
its *global* shape, and each group is handled in one of two ways:

* **whole on this rank** (``Shard(0)`` with per-channel or per-block groups,
  ``Shard(1)`` per-block groups whose blocks do not straddle ranks, and any
  ``Replicate`` placement): the fused op (or the generic per-parameter path)
  runs on the local tensor ``p.to_local()``. No collective.
* **split across ranks** (per-tensor quantization of a sharded parameter,
  per-channel quantization of a ``Shard(d >= 1)`` parameter): the statistics
  are global (:mod:`parq.optim.sharded_stats`). Every reduction the quantizer
  needs is reduced over the process group of the sharded mesh dimension,
  batched over all such parameters of the parameter group: one ``all_gather_single`` of a small
  float64 vector per reduction round (center: +1 round; uniform, ternary,
  asymmetric, simple-ternary LSBQ: 1 round; greedy LSBQ: ``b`` rounds), or,
  for optimal LSBQ (b = 0, 2), one all-gather of the magnitudes followed by
  the reference's exact split (:func:`parq_kernels.reference.optimal_split`)
  on the gathered values. Every rank reduces the gathered vector in the same
  order, so the levels ``Q`` are bitwise equal on every rank; they are stored
  replicated. The prox map then runs on the local tensor. Steps that do not
  recompute ``Q`` issue no collective.

Placements: one mesh dimension may carry ``Shard(d)``; the others must be
``Replicate`` (HSDP ``(Replicate, Shard(0))``: reductions run over the shard
dimension's group only). ``Partial``, strided shards and two sharded mesh
dimensions raise :class:`UnsupportedPlacementError` naming the parameter.

Non-finite values: groups split across ranks fold the check into the reduced
statistics, so every rank raises together; whole groups are checked on the rank
that holds them (no collective), so only that rank raises.

Optimizer state stays checkpointable with ``torch.distributed.checkpoint``:
``latent`` is a DTensor like the parameter; ``quants`` is a DTensor of global
shape ``(K,)`` (per-tensor, replicated), ``(rows, K)`` (per-channel, placed
like the parameter when rows are whole, else replicated), ``(rows, blocks, K)``
(per-block of a 2-D parameter, placed like it) or ``(blocks, K)`` (per-block of
a 1-D parameter). :func:`add_state_placeholders` / :func:`drop_state_placeholders`
let the ``get_state_dict`` / ``set_state_dict`` round trip restore them even
when the resuming optimizer has not quantized yet.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from parq.optim.layout import group_bits, row_layout
from parq.optim.proxmap import KernelProxMap
from parq.optim.shard_plan import (
    ShardPlan,
    UnsupportedPlacementError,
    _local,
    _where,
    is_dtensor,
    local_tensors,
    plan_param,
)
from parq.optim.sharded_stats import global_quantize
from parq.quant.quantizer import KernelQuantizer
from parq_kernels import reference
from parq_kernels.ops import ProxKind, quant_prox_

# ---------------------------------------------------------------------------
# The step of a parameter group holding DTensor parameters.
# ---------------------------------------------------------------------------


def _wrap(local: Tensor, plan: ShardPlan, shape: tuple[int, ...], placements) -> Tensor:
    """``local`` as a DTensor of global ``shape`` (plain tensors stay plain)."""
    if plan.mesh is None:
        return local
    from torch.distributed.tensor import DTensor

    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, plan.mesh, placements, run_check=False, shape=shape,
                              stride=stride)  # fmt: skip


def latent_buffer(state: dict, p: Tensor, plan: ShardPlan) -> Tensor:
    """The local tensor of ``state["latent"]`` (created like ``p`` if missing or unusable)."""
    latent = state.get("latent")
    if latent is not None and is_dtensor(latent) == is_dtensor(p):
        buf = _local(latent)
        if buf.shape == plan.local.shape and buf.dtype == p.dtype and buf.is_contiguous():
            return buf
    buf = torch.empty_like(plan.local, memory_format=torch.contiguous_format)
    state["latent"] = _wrap(buf, plan, tuple(p.shape), plan.placements)
    return buf


def quants_buffer(state: dict, plan: ShardPlan, fresh: bool) -> Tensor:
    """The local tensor of ``state["quants"]``; reallocated when it will be rewritten."""
    Q = state.get("quants")
    buf = None if Q is None else _local(Q)
    if fresh and not (
        buf is not None
        and tuple(buf.shape) == plan.q_local_shape
        and buf.dtype == torch.float32
        and buf.device == plan.local.device
        and buf.is_contiguous()
    ):
        buf = torch.zeros(plan.q_local_shape, dtype=torch.float32, device=plan.local.device)
        state["quants"] = _wrap(buf, plan, plan.q_shape, plan.q_placements)
    return buf


def _rows(t: Tensor, plan: ShardPlan) -> Tensor:
    return t.reshape(plan.rows_local, plan.cols_local)


def whole_on_rank(opt, index: int, group: dict, params: list[Tensor], K: int) -> bool:
    """Does every quantization group of these parameters lie whole on this rank (so
    that the fused ops can run on the local shards with no collective)?"""
    block = group.get("quant_block_size")
    return not any(cached_plan(opt, index, j, p, block, K).split for j, p in enumerate(params))


def step_group(
    opt, index: int, group: dict, params: list[Tensor], quantizer, gamma: float, update: bool,
    n: int,
) -> float | None:  # fmt: skip
    """One ``QuantOptimizer.step`` for a group with DTensor parameters (module doc)."""
    bits = group["quant_bits"]
    K = quantizer.get_quant_size(bits)
    fused = opt._use_fused(quantizer, local_tensors(params))  # also checks the local dtypes
    fused = fused and not _host_levels(quantizer, bits)  # refined LSBQ: per-shard quantize
    prox = opt.prox_map
    builtin_prox = isinstance(prox, KernelProxMap) and type(prox).apply_ is KernelProxMap.apply_
    local_items, split_items = [], []
    for j, p in enumerate(params):
        plan = cached_plan(opt, index, j, p, group.get("quant_block_size"), K)
        state = opt.state[p]
        fresh = update or "quants" not in state
        if plan.split and fresh:
            split_items.append((j, p, plan))
        else:
            local_items.append((j, p, plan, fresh))
    rho = None
    if split_items:
        rho, handoff = _split_update(
            opt, index, bits, quantizer, prox, builtin_prox, fused, gamma, n, split_items
        )
        local_items += handoff
    if local_items and fused:
        rho = _local_fused(opt, index, bits, quantizer, gamma, n, local_items)
    elif local_items:
        rho = _local_generic(opt, index, bits, quantizer, gamma, n, local_items)
    return rho


def cached_plan(opt, index: int, j: int, p: Tensor, block: int | None, K: int) -> ShardPlan:
    """:func:`plan_param`, cached per parameter while its spec and local tensor stay the
    same objects (DTensor attribute reads cost microseconds each; a step reads many)."""
    cache = opt.__dict__.setdefault("_shard_plans", {})
    spec, local = getattr(p, "_spec", None), getattr(p, "_local_tensor", None)
    key = (block, opt.quant_per_channel, K)
    hit = cache.get(id(p))
    if (
        hit is not None
        and local is not None
        and hit[0] is p
        and hit[1] is spec
        and hit[2] is local
        and hit[3] == key
    ):
        return hit[4]
    where = _where(index, j, p)
    plan = plan_param(p, row_layout(p, block, opt.quant_per_channel, where + ": "), K, where)
    cache[id(p)] = (p, spec, local, key, plan)
    return plan


def _local_fused(opt, index, bits, quantizer, gamma, n, items) -> float | None:
    """Whole groups on this rank: ``quant_prox_`` on the local tensors."""
    kind, qargs = quantizer.kernel_spec(bits)
    K = quantizer.get_quant_size(bits)
    prox_kind, prox_arg, rho = opt.prox_map.schedule(n)
    buckets: dict[tuple, list] = {}
    for j, p, plan, fresh in items:
        state = opt.state[p]
        latent = latent_buffer(state, p, plan)
        Q = quants_buffer(state, plan, fresh)
        local = plan.local
        if local.numel() == 0:
            continue
        rows = _rows(local, plan) if local.is_contiguous() else _rows(local.contiguous(), plan)
        buckets.setdefault((local.device, local.dtype, fresh), []).append(
            (j, p, local, rows, _rows(latent, plan), Q.view(-1, K))
        )
    for (device, _dtype, fresh), its in buckets.items():
        flags = torch.zeros(len(its), dtype=torch.int32, device=device)
        quant_prox_(
            [it[3] for it in its], [it[4] for it in its], [it[5] for it in its], flags,
            int(kind), bits, list(qargs), quantizer.center, fresh, int(prox_kind),
            float(prox_arg), float(gamma), opt.backend or "",
        )  # fmt: skip
        for _, _, local, rows, _, _ in its:
            if rows.data_ptr() != local.data_ptr():
                local.copy_(rows.view(local.shape))
        opt._note_nonfinite(index, [(it[0], it[1]) for it in its], flags, n)
    return rho


def _local_view(local: Tensor, plan: ShardPlan) -> Tensor:
    """What the generic path hands to ``quantize`` / ``apply_`` (as for a plain parameter)."""
    if plan.layout.grouped or plan.layout.block_size is not None:
        return _rows(local, plan)
    return local


def _local_generic(opt, index, bits, quantizer, gamma, n, items) -> float | None:
    """Whole groups on this rank, user quantizer / prox map: the per-parameter path."""
    rho = None
    for j, p, plan, fresh in items:
        state = opt.state[p]
        latent_buffer(state, p, plan).copy_(plan.local)
        local = plan.local
        if gamma != 1.0:
            local.div_(gamma)
        view = _local_view(local, plan)
        dim = plan.layout.dim
        if fresh:
            if opt.check_finite and not torch.isfinite(local).all():
                opt._raise_nonfinite(index, j, p)
            q, Q = quantizer.quantize(view, bits, dim)
            quants_buffer(state, plan, True).copy_(Q.reshape(plan.q_local_shape))
        else:
            q = None
        Q = _local(state["quants"])
        Q = Q.reshape(-1, Q.size(-1)) if dim is not None else Q.reshape(-1)
        rho = opt.prox_map.apply_(view, q, Q, step_count=n, dim=dim)
        if view.data_ptr() != local.data_ptr() or not local.is_contiguous():
            local.copy_(view.reshape(local.shape))
    return rho


def _host_levels(quantizer, bits: int) -> bool:
    host = getattr(quantizer, "host_levels", None)
    return host is not None and host(bits)


def _no_global_reason(quantizer, bits: int) -> str:
    if _host_levels(quantizer, bits):
        return "refined LSBQ has no global-statistics form"
    return getattr(quantizer, "generic_path_reason", "") or "a user quantizer"


def _split_update(opt, index, bits, quantizer, prox, builtin_prox, fused, gamma, n, items):
    """Groups split across ranks on an update step: global statistics, local prox.

    Returns ``(rho, handoff)``: the items whose prox does not use the quantizer's ``q``
    (PARQ, soft, none) are handed to the fused op with the fresh levels instead.
    """
    if (
        not isinstance(quantizer, KernelQuantizer)
        or type(quantizer).quantize is not KernelQuantizer.quantize
        or getattr(quantizer, "generic_path_reason", "")
        or _host_levels(quantizer, bits)
    ):
        j, p, _ = items[0]
        raise UnsupportedPlacementError(
            f"{_where(index, j, p)}: quantization groups split across ranks need global "
            f"statistics, which only the built-in quantizers with fused kernels compute; "
            f"{type(quantizer).__name__}: "
            f"{_no_global_reason(quantizer, bits)} "
            "(use quant_per_channel with Shard(0), or Replicate)"
        )
    kind, qargs = quantizer.kernel_spec(bits)
    prox_kind, prox_arg, rho = prox.schedule(n) if builtin_prox else (None, None, None)
    handoff = fused and prox_kind in (ProxKind.NONE, ProxKind.SOFT, ProxKind.PARQ)
    xs, ns, groups, chunks = [], [], [], []
    for _, p, plan in items:
        state = opt.state[p]
        if not handoff:
            latent_buffer(state, p, plan).copy_(plan.local)
        x = _rows(plan.local.detach(), plan).float()
        if gamma != 1.0:
            x = x / gamma
        xs.append(x)
        ns.append(plan.cols_global)
        groups.append(plan.group)
        chunks.append(list(plan.row_chunks))
    qs, Qs, bad = global_quantize(
        xs, ns, groups, chunks, kind, bits, qargs, quantizer.center, need_q=not handoff
    )
    if opt.check_finite and any(bad):
        j, p, _ = items[bad.index(True)]
        opt._raise_nonfinite(index, j, p)
    for (_, p, plan), x, q, Q in zip(items, xs, qs, Qs, strict=True):
        quants_buffer(opt.state[p], plan, True).copy_(Q.reshape(plan.q_local_shape))
        if handoff:
            continue
        if builtin_prox:
            y = reference.apply_prox(x, q, Q, prox_kind, prox_arg)
            plan.local.copy_(y.reshape(plan.local.shape))
            if prox_kind == ProxKind.BINARYCONNECT:  # clipped latent (SPEC §9), global levels
                lat = _rows(latent_buffer(opt.state[p], p, plan), plan)
                reference.clamp_latents_([lat], [Q.reshape(lat.size(0), -1)], float(gamma))
        else:
            dim = None if not plan.layout.grouped else -1
            view = x if dim is not None else x.reshape(-1)
            q_view = q if dim is not None else q.reshape(-1)
            rho = prox.apply_(view, q_view, Q if dim is not None else Q[0], step_count=n, dim=dim)
            plan.local.copy_(view.reshape(plan.local.shape))
    return rho, ([(j, p, plan, False) for j, p, plan in items] if handoff else [])


# ---------------------------------------------------------------------------
# Checkpoints: state placeholders so that get_state_dict / set_state_dict
# (torch.distributed.checkpoint) carry latent and quants for a fresh optimizer.
# ---------------------------------------------------------------------------


def add_state_placeholders(opt, state_dict: dict) -> dict:
    """Before quantization starts (``num_steps <= warmup_steps``), give the quantized
    DTensor parameters ``latent`` / ``quants`` placeholders in ``state_dict["state"]`` (a copy
    of ``p`` and all-NaN levels, placed like the real ones), so that a checkpoint
    skeleton built from a resuming optimizer requests them (``get_state_dict`` runs a
    zero-lr ``step`` first, which may still be in warmup). The live state is not
    touched; :func:`drop_state_placeholders` removes them again at load time."""
    if opt.num_steps > opt.warmup_steps:  # quantization started: latents are real
        return state_dict
    saved = state_dict["state"]
    # a parameter the base optimizer has no state for (e.g. its grad was None) gets none:
    # Adam-like optimizers refuse to load a state without "step"
    stateless = not any(opt.state.values())
    pid = 0
    qi = 0
    for index, group in enumerate(opt.param_groups):
        bits = group_bits(group, index)
        quantizer = opt._quantizer_for(qi) if bits is not None else None
        if bits is not None:
            qi += 1
        for j, p in enumerate(group["params"]):
            live = opt.state.get(p, {})
            if bits is not None and p.requires_grad and (live or stateless) and is_dtensor(p):
                where = _where(index, j, p)
                block = group.get("quant_block_size")
                layout = row_layout(p, block, opt.quant_per_channel, where + ": ")
                plan = plan_param(p, layout, quantizer.get_quant_size(bits), where)
                entry = dict(saved.get(pid, {}))
                entry["latent"] = p.detach().clone()
                Q = torch.full(plan.q_local_shape, math.nan, device=plan.local.device)
                entry["quants"] = _wrap(Q, plan, plan.q_shape, plan.q_placements)
                saved[pid] = entry
            pid += 1
    return state_dict


def drop_state_placeholders(opt) -> None:
    """After loading: a checkpoint taken before quantization started (``num_steps <=
    warmup_steps``) holds only placeholders; remove them so that the base optimizer
    still sees an empty state on its first step and the latents are taken afresh.
    Later, all-NaN ``quants`` (a parameter that had not been quantized yet) are
    dropped so that its levels are computed at its next step."""
    started = opt.num_steps > opt.warmup_steps
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            if not started:
                state.pop("latent", None)
                state.pop("quants", None)
            elif "quants" in state:
                Q = _local(state["quants"])
                if Q.numel() and bool(torch.isnan(Q).all()):
                    del state["quants"]
            if not state:
                del opt.state[p]

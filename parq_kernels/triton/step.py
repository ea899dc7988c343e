"""Launcher of the Triton fused step: ``fused_step_`` (contract in :mod:`parq_kernels.ops`).

The base optimizer's update (:mod:`.base_update`) is folded into the first read
of the latent (:mod:`.step_kernels`), so it costs no pass of its own:

* non-update steps: one ``_step_apply_kernel`` launch per tile class reads the
  latent, gradient and state and writes the latent, state and projected weights;
* update steps: the first statistics launch of each class applies the update
  as it reads (the whole-rows kernel when every row fits in a tile, else the
  first partials pass); the later passes and the apply pass read the updated
  latent, and the apply pass writes the projected weights only.

Addressing: the plan of :mod:`.plan` (params, latents, quants) plus two
per-parameter offset tables (int64 element offsets relative to the first tensor
of each list, added to the tile's offset inside its parameter): one for the
optimizer state ``bufs1/2/3``, stable across steps and cached like the plan,
and one for the gradients, which ``zero_grad(set_to_none=True)`` reallocates
every iteration: it is built per call from the gradients' addresses (a host
computation and, on a miss, one asynchronous copy from pinned memory: no host
synchronization) and kept in a small LRU keyed on those addresses, which the
caching allocator tends to hand out again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from parq_kernels.kinds import OptimKind
from parq_kernels.triton import plan as plans
from parq_kernels.triton.base_update import StepArgs, step_args
from parq_kernels.triton.launch import _launch, apply_meta, class_meta, prepare, update_levels
from parq_kernels.triton.stats import NST
from parq_kernels.triton.step_kernels import (
    _step_apply_kernel,
    _step_partials_kernel,
    _step_whole_rows_stats_kernel,
)

_BUF_NAMES = {
    OptimKind.SGD: ("bufs1 (momentum buffers)", "bufs2", "bufs3"),
    OptimKind.ADAM: ("bufs1 (exp_avg)", "bufs2 (exp_avg_sq)", "bufs3 (max_exp_avg_sq)"),
}


class OffsetTables:
    """Per-parameter offsets of tensor lists, as ``(n, len(lists))`` int64 device tables.

    Entry ``[i, k]`` is the element offset of ``lists[k][i]`` from ``lists[k][0]``
    (0 for an empty list). Cached by the tensors' addresses (LRU of ``size``);
    ``aligned`` says whether every list allows 16-byte vector accesses.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.cache: OrderedDict[tuple, tuple[Tensor, bool]] = OrderedDict()
        self.builds = 0  # tables built (tests watch the cache)

    def get(self, lists: tuple[list[Tensor], ...], n: int, names: tuple[str, ...],
            like: Tensor) -> tuple[Tensor, bool]:  # fmt: skip
        key = (like.device, like.dtype, n, tuple(tuple(t.data_ptr() for t in ts) for ts in lists))
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            return hit
        cols = [[plans._offset(t, ts[0], name, i) for i, t in enumerate(ts)] if ts else [0] * n
                for ts, name in zip(lists, names, strict=True)]  # fmt: skip
        vec = max(1, 16 // like.element_size())
        aligned = all(not ts or ts[0].data_ptr() % 16 == 0 for ts in lists) and all(
            o % vec == 0 for col in cols for o in col
        )
        host = torch.tensor(list(zip(*cols, strict=True)), dtype=torch.int64).reshape(n, -1)
        if like.device.type == "cuda":  # pinned source: the copy is asynchronous, no sync
            table = host.pin_memory().to(like.device, non_blocking=True)
        else:
            table = host.to(like.device)
        self.builds += 1
        self.cache[key] = (table, aligned)
        if len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return table, aligned


#: optimizer state (stable: lives as long as the parameters, like the plan)
BUF_TABLES = OffsetTables(16)
#: gradients (reallocated by ``zero_grad(set_to_none=True)``): a small LRU per call
GRAD_TABLES = OffsetTables(8)


def _check_like(ts: list[Tensor], params: list[Tensor], name: str) -> None:
    for i, (t, p) in enumerate(zip(ts, params, strict=True)):
        if (t.shape != p.shape or t.dtype != p.dtype or t.device != p.device
                or not t.is_contiguous()):  # fmt: skip
            raise ValueError(f"fused_step_: {name}[{i}] must be a contiguous {p.dtype} tensor of "
                             f"shape {tuple(p.shape)} on {p.device} like params[{i}], got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")  # fmt: skip
        if p.numel() and t.data_ptr() == p.data_ptr():
            raise ValueError(f"fused_step_: {name}[{i}] must not alias params[{i}]")


def _check_state(params: list[Tensor], grads: list[Tensor], bufs: tuple[list[Tensor], ...],
                 sa: StepArgs) -> None:  # fmt: skip
    """Gradients and optimizer state: one per parameter where the update uses them, each
    like its parameter (the checks of csrc/validate_step.cpp)."""
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"fused_step_: grads must hold {n} tensors (one per param), "
                         f"got {len(grads)}")  # fmt: skip
    _check_like(grads, params, "grads")
    names = _BUF_NAMES[OptimKind.SGD if sa.kind == OptimKind.SGD else OptimKind.ADAM]
    for k, (ts, name) in enumerate(zip(bufs, names, strict=True)):
        want = n if k < sa.nbufs else 0
        if len(ts) != want:
            why = "for this optimizer and its options" if want == 0 else "(one per param)"
            raise ValueError(f"fused_step_: {name} must hold {want} tensors {why}, "
                             f"got {len(ts)}")  # fmt: skip
        if ts:
            _check_like(ts, params, name.split()[0])


class StepSource:
    """Where the fused step's statistics passes read (cf. :class:`.launch.ParamSource`):
    the latent; the first read of each tile class applies the base update."""

    def __init__(self, plan: plans.Plan, latents, grads, bufs, sa: StepArgs, gtab: Tensor,
                 btab: Tensor, aligned: bool, flags: Tensor) -> None:  # fmt: skip
        L = latents[0]
        self.flags = flags  # the first read flags the updates it rejects as non-finite
        self.tensors = (L, grads[0], *(ts[0] if ts else L for ts in bufs))
        self.gtab, self.btab = gtab, btab
        self.sa = sa
        self.aligned = aligned
        self.fresh = {id(tc) for tc in plan.classes}  # classes not yet updated

    def base(self, tc: plans.TileClass) -> bool:
        """Whether this read of class ``tc`` applies the update (its first read does)."""
        fresh = id(tc) in self.fresh
        self.fresh.discard(id(tc))
        return fresh

    def meta(self, tc: plans.TileClass) -> dict:
        return dict(OPT=self.sa.opt, **class_meta(tc, tc.align if self.aligned else 1))

    def whole_rows(self, tc, stats, gamma, qa0, qa1, **meta) -> None:
        if not self.base(tc):
            raise AssertionError("the whole-rows statistics read a class a second time")
        L, G, B1, B2, B3 = self.tensors
        _launch(_step_whole_rows_stats_kernel, (tc.n_tiles,), L, G, B1, B2, B3, tc.table,
                self.gtab, self.btab, stats, self.flags, gamma, qa0, qa1, *self.sa.scalars, **meta,
                **self.meta(tc))  # fmt: skip

    def partials(self, tc, stats, part, pad, width, gamma, **meta) -> None:
        L, G, B1, B2, B3 = self.tensors
        _launch(_step_partials_kernel, (tc.n_tiles,), L, G, B1, B2, B3, tc.table, self.gtab,
                self.btab, stats, part, pad, width, self.flags, gamma, *self.sa.scalars,
                BASE=self.base(tc),
                **meta, **self.meta(tc))  # fmt: skip


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
    """Triton backend of ``parq_kernels::fused_step_`` (contract in ops.py, design above).

    ``params[i]`` ``(rows, n)`` is written with the projection of ``w / gamma``,
    ``w`` the base update of ``latents[i]`` (read, then overwritten with ``w`` in
    the parameter dtype); ``grads[i]`` is read; ``bufs1/2/3[i]`` are read and
    written; ``quants`` and ``nonfinite`` as in ``quant_prox_``.
    """
    if not params:
        return
    sa = step_args(optim_kind, tuple(hparams))
    bufs = (bufs1, bufs2, bufs3)
    _check_state(params, grads, bufs, sa)
    kind, K, arg, arg2 = prepare(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 prox_kind, prox_arg, gamma)  # fmt: skip
    plan = plans.get_plan(params, latents, quants, K)
    if plan.n_rows == 0:
        return
    n, P = len(params), params[0]
    btab, b_ok = BUF_TABLES.get(bufs, n, ("bufs1", "bufs2", "bufs3"), P)
    gtab, g_ok = GRAD_TABLES.get((grads,), n, ("grads",), P)
    src = StepSource(plan, latents, grads, bufs, sa, gtab, btab, b_ok and g_ok, nonfinite)
    stats = qws = quants[0]  # not read on non-update steps
    if update:
        stats = torch.zeros((plan.n_rows, NST.value), dtype=torch.float32, device=P.device)
        qws = update_levels(plan, src, stats, int(kind), bits, K, qargs, center, gamma)
    qa0, qa2, meta = apply_meta(kind, bits, K, qargs, center, update, prox_kind)
    L, G, B1, B2, B3 = src.tensors
    for tc in plan.classes:
        _launch(_step_apply_kernel, (tc.n_tiles,), L, G, B1, B2, B3, P, quants[0], qws, stats,
                tc.table, gtab, btab, nonfinite, float(gamma), float(arg), float(arg2), qa0, qa2,
                *sa.scalars, BASE=src.base(tc), **meta, **src.meta(tc))  # fmt: skip
    if src.fresh:
        raise AssertionError("fused_step_: a tile class missed its base update")

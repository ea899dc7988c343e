"""Launcher of the Triton backend: ``quant_prox_`` (contract in :mod:`parq_kernels.ops`).

Also the pieces the fused step's launcher (:mod:`.step`) shares: the argument
checks (:func:`prepare`), the statistics passes and levels (:func:`update_levels`,
reading through a *source*), the launch constants and the launch counter.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from parq_kernels.kinds import ProxKind, QuantKind, num_levels
from parq_kernels.triton import plan as plans
from parq_kernels.triton.apply import _apply_kernel
from parq_kernels.triton.stats import (
    NST,
    SIDES,
    _finalize_kernel,
    _levels_kernel,
    _partials_kernel,
    _whole_rows_stats_kernel,
)

_S_V = 4  # STATS column of v_1 (stats.S_V)

#: Triton kernel launches issued by this backend since import (tests count them).
launch_count = 0


def _launch(kernel, grid: tuple[int], *args, **meta) -> None:
    global launch_count
    launch_count += 1
    kernel[grid](*args, **meta)


def _warps(tc: plans.TileClass) -> int:
    """8 warps for full tiles (4096 elements, 1024 with more than 4 levels: plan.full_tile):
    at most 128 registers per thread on sm_90 (ptxas, no spills) where 4 warps need up to
    165 and cap occupancy; the planner chose it (TileClass.warps)."""
    return tc.warps


def _check(params, latents, quants, nonfinite, K: int) -> None:
    p0 = params[0]
    if not (len(latents) == len(quants) == len(params)):
        raise ValueError(
            f"params, latents and quants must have the same length, got "
            f"{len(params)}, {len(latents)}, {len(quants)}"
        )
    if p0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"params must be float32, bfloat16 or float16, got {p0.dtype}")
    for i, (p, lat, Q) in enumerate(zip(params, latents, quants, strict=True)):
        if p.dim() != 2 or not p.is_contiguous():
            raise ValueError(f"params[{i}] must be a contiguous 2-D tensor, got {tuple(p.shape)}")
        if p.dtype != p0.dtype or p.device != p0.device:
            raise ValueError(f"params[{i}] is {p.dtype} on {p.device}, params[0] {p0.dtype} "
                             f"on {p0.device}: one call serves one dtype and device")  # fmt: skip
        if lat.shape != p.shape or lat.dtype != p.dtype or not lat.is_contiguous():
            raise ValueError(f"latents[{i}] must be a contiguous {p.dtype} tensor of shape "
                             f"{tuple(p.shape)}, got {lat.dtype} {tuple(lat.shape)}")  # fmt: skip
        if Q.shape != (p.size(0), K) or Q.dtype != torch.float32 or not Q.is_contiguous():
            raise ValueError(f"quants[{i}] must be a contiguous float32 tensor of shape "
                             f"{(p.size(0), K)}, got {Q.dtype} {tuple(Q.shape)}")  # fmt: skip
        if lat.device != p.device or Q.device != p.device:
            raise ValueError(f"latents[{i}] and quants[{i}] must be on {p.device}")
    if nonfinite.dtype != torch.int32 or nonfinite.numel() != len(params):
        raise ValueError(f"nonfinite must be int32 of length {len(params)}, got "
                         f"{nonfinite.dtype} {tuple(nonfinite.shape)}")  # fmt: skip


def _prox_args(prox_kind: int, prox_arg: float) -> tuple[float, float]:
    if prox_kind == ProxKind.SOFT:
        return prox_arg, 1.0 / (1.0 + math.exp(-prox_arg / 2)) - 0.5
    if prox_kind == ProxKind.PARQ:
        if not prox_arg > 0:
            raise ValueError(f"prox_arg (PARQ inverse slope rho) must be > 0, got {prox_arg}")
        return prox_arg, 1.0
    if prox_kind == ProxKind.RELAX:
        return prox_arg, 1.0 - prox_arg
    if prox_kind in (ProxKind.PROXQUANT_L1, ProxKind.PROXQUANT_L2):
        if not prox_arg >= 0:
            raise ValueError(f"prox_arg (ProxQuant lambda) must be >= 0, got {prox_arg}")
        return prox_arg, 1.0 + prox_arg
    if prox_kind in (ProxKind.NONE, ProxKind.HARD, ProxKind.BINARYCONNECT):
        return 0.0, 1.0
    raise ValueError(f"unknown prox_kind {prox_kind}")


def _optimal_split(plan: plans.Plan, pad: Tensor, stats: Tensor, bits: int) -> None:
    """Optimal LSBQ (SPEC.md §3): sort |x'| per row, prefix sums in float64, argmin.

    ``pad`` is ``(R, max_len)`` float32 holding each row's ``|x'|`` (``+inf``
    beyond the row's length). Writes ``v1, v2`` (2-bit) or ``A`` (ternary) into
    ``stats``. Batched torch ops over all rows: no host synchronization.
    """
    n = plan.row_len  # (R, 1) float64
    a = pad.double().sort(dim=1).values
    valid = torch.arange(a.size(1), device=a.device) < n
    a = torch.where(valid, a, 0.0)
    S = torch.cat([a.new_zeros(a.size(0), 1), a.cumsum(dim=1)], dim=1)  # S_k, k = 0..max_len
    T = (a * a).sum(dim=1, keepdim=True)
    k = torch.arange(S.size(1), dtype=torch.float64, device=a.device)
    S_n = S.gather(1, n.long())
    lo = torch.where(k > 0, S / k.clamp_min(1), 0.0)
    hi = torch.where(k < n, (S_n - S) / (n - k).clamp_min(1), 0.0)
    if bits == 0:
        E = T - (n - k) * hi * hi
        lo = torch.zeros_like(lo)
    else:
        E = T - k * lo * lo - (n - k) * hi * hi
    E = torch.where(k <= n, E, math.inf)
    k_star = E.argmin(dim=1, keepdim=True)
    lo, hi = lo.gather(1, k_star), hi.gather(1, k_star)
    if bits == 0:
        stats[:, _S_V] = hi[:, 0].float()
    else:
        stats[:, _S_V] = ((hi + lo) / 2)[:, 0].float()
        stats[:, _S_V + 1] = ((hi - lo) / 2)[:, 0].float()


class ParamSource:
    """Where the statistics passes of ``quant_prox_`` read: the weights ``p``.

    A *source* launches the statistics kernels of one tile class; the fused step
    has its own (:class:`parq_kernels.triton.step.StepSource`), whose first read
    of each tile applies the base update to the latent (cf. csrc/cpu/sources.h).
    """

    def __init__(self, P: Tensor, L: Tensor) -> None:
        self.P = P  # params[0]: the tile table addresses every parameter from it
        self.L = L  # latents[0]: what an element whose weight is NaN/Inf keeps

    def whole_rows(self, tc: plans.TileClass, stats: Tensor, gamma: float, qa0: float,
                   qa1: float, **meta) -> None:  # fmt: skip
        _launch(_whole_rows_stats_kernel, (tc.n_tiles,), self.P, self.L, tc.table, stats, gamma,
                qa0, qa1, **meta, **class_meta(tc))  # fmt: skip

    def partials(self, tc: plans.TileClass, stats: Tensor, part: Tensor, pad: Tensor,
                 width: int, gamma: float, **meta) -> None:  # fmt: skip
        _launch(_partials_kernel, (tc.n_tiles,), self.P, self.L, tc.table, stats, part, pad,
                width, gamma, **meta, **class_meta(tc))  # fmt: skip


def class_meta(tc: plans.TileClass, align: int | None = None) -> dict:
    """The launch constants of a tile class (``align`` overrides its vector alignment)."""
    return dict(NF=plans.NF, ROWS=tc.rows, BLOCK=tc.block,
                ALIGN=tc.align if align is None else align, num_warps=_warps(tc))  # fmt: skip


def update_levels(plan, src, stats, kind, bits, K, qargs, center, gamma) -> Tensor:
    """Statistics passes (read through ``src``) + levels for every row: returns ``QWS``
    ``(R, K)`` sorted ascending. ``stats`` ``(R, NST)`` is filled on the way."""
    dev = stats.device
    R = plan.n_rows
    part = torch.empty((max(plan.n_pslots, 1), 4), dtype=torch.float32, device=dev)
    qa0 = float(qargs[0]) if qargs else 0.0
    qa1 = float(qargs[1]) if len(qargs) > 1 else 0.0
    fin_rows = plans.tile_rows(dev, 32, R)  # rows per program of the per-row kernels
    fin_grid = (triton_cdiv(R, fin_rows),)

    def stats_pass(pass_: int) -> None:
        for tc in plan.classes:
            src.partials(tc, stats, part, part, 0, gamma, PASS=pass_, CENTER=center, GATHER=False)
        _launch(_finalize_kernel, fin_grid, plan.row_table, part, stats, R, plan.max_chunks,
                qa0, qa1, 0.0, PASS=pass_, KIND=kind, BITS=bits, NR=plans.NR,
                ROWS=fin_rows)  # fmt: skip

    if kind != QuantKind.LSBQ_OPTIMAL and plan.max_len <= plans.MAX_BLOCK:
        for tc in plan.classes:  # every row lies whole in one tile: one read, all passes
            src.whole_rows(tc, stats, gamma, qa0, qa1, KIND=kind, BITS=bits, CENTER=center)
    elif kind != QuantKind.LSBQ_OPTIMAL:
        if center:
            stats_pass(0)
        stats_pass(1)
        if kind == QuantKind.TERNARY_THRESHOLD:  # D first, then the sums per side
            stats_pass(SIDES.value)
        if kind == QuantKind.LSBQ_GREEDY:
            for k in range(2, bits + 1):
                stats_pass(k)
    else:
        if center:
            stats_pass(0)
        width = max(plan.max_len, 1)
        pad = torch.full((R, width), math.inf, dtype=torch.float32, device=dev)
        for tc in plan.classes:
            src.partials(tc, stats, part, pad, width, gamma, PASS=1, CENTER=center, GATHER=True)
        _optimal_split(plan, pad, stats, bits)
    qws = torch.empty((R, K), dtype=torch.float32, device=dev)
    KP = max(2, triton_next_pow2(K))
    lv_rows = plans.tile_rows(dev, KP, R)
    _launch(_levels_kernel, (triton_cdiv(R, lv_rows),), stats, qws, R, qa1, KIND=kind,
            BITS=bits, K=K, KP=KP, CENTER=center, ROWS=lv_rows)  # fmt: skip
    binary = kind in (QuantKind.LSBQ_GREEDY, QuantKind.LSBQ_OPTIMAL) and bits >= 1
    return qws.sort(dim=1).values if binary else qws


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prepare(params, latents, quants, nonfinite, quant_kind, bits, qargs, prox_kind, prox_arg,
            gamma) -> tuple[QuantKind, int, float, float]:  # fmt: skip
    """Checks of the quantize/prox arguments shared by both ops: ``(kind, K, arg, arg2)``
    with ``kind`` normalized (optimal 1-bit LSBQ is greedy) and the prox scalars."""
    kind = QuantKind(quant_kind)
    if kind == QuantKind.LSBQ_OPTIMAL and bits == 1:
        kind = QuantKind.LSBQ_GREEDY  # optimal 1-bit is greedy
    if kind == QuantKind.LSBQ_OPTIMAL and bits not in (0, 2):
        raise NotImplementedError(f"optimal LSBQ is defined for bits in {{0, 1, 2}}, got {bits}")
    K = num_levels(kind, bits, tuple(qargs))
    _check(params, latents, quants, nonfinite, K)
    if params[0].device.type != "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter copies each tensor argument to the host on its own, which breaks
        # the relative addressing of the other tensors of a list
        raise RuntimeError("the triton backend cannot serve CUDA tensors under TRITON_INTERPRET=1")
    if not gamma > 0:
        raise ValueError(f"gamma (shrink divisor) must be > 0, got {gamma}")
    arg, arg2 = _prox_args(int(prox_kind), float(prox_arg))
    return kind, K, arg, arg2


def apply_meta(kind, bits, K, qargs, center, update, prox_kind) -> tuple[float, float, dict]:
    """``(qa0, qa2, constexprs)`` of the apply kernels (``_apply_kernel`` and the step's)."""
    qa0 = float(qargs[0]) if qargs else 0.0
    qa2 = float(qargs[2]) if len(qargs) > 2 else 0.0
    KP = max(2, triton_next_pow2(K))
    meta = dict(KIND=int(kind), BITS=bits, K=K, KP=KP, LOGKP=KP.bit_length() - 1,
                CENTER=bool(center), UPDATE=bool(update), PROX=int(prox_kind))  # fmt: skip
    return qa0, qa2, meta


def quant_prox_(
    params: list[Tensor],
    latents: list[Tensor],
    quants: list[Tensor],
    nonfinite: Tensor,
    quant_kind: int,
    bits: int,
    qargs: tuple[float, ...],
    center: bool,
    update: bool,
    prox_kind: int,
    prox_arg: float,
    gamma: float,
) -> None:
    """Triton backend of ``parq_kernels::quant_prox_`` (contract in ops.py)."""
    if not params:
        return
    kind, K, arg, arg2 = prepare(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 prox_kind, prox_arg, gamma)  # fmt: skip
    plan = plans.get_plan(params, latents, quants, K)
    if plan.n_rows == 0:
        return
    stats = qws = quants[0]  # not read on non-update steps
    if update:
        stats = torch.zeros((plan.n_rows, NST.value), dtype=torch.float32, device=params[0].device)
        src = ParamSource(params[0], latents[0])
        qws = update_levels(plan, src, stats, int(kind), bits, K, qargs, center, gamma)
    qa0, qa2, meta = apply_meta(kind, bits, K, qargs, center, update, prox_kind)
    for tc in plan.classes:
        _launch(_apply_kernel, (tc.n_tiles,), params[0], latents[0], quants[0], qws, stats,
                tc.table, nonfinite, float(gamma), float(arg), float(arg2), qa0, qa2, **meta,
                **class_meta(tc))  # fmt: skip

"""Global statistics of quantization groups split across ranks (SPEC.md §7).

The rows handed in are the local parts of quantization groups whose elements
live on several ranks (per-tensor quantization of a sharded parameter, or
per-channel quantization of a ``Shard(d >= 1)`` one). Every mean, max and sum
the quantizer needs is reduced over the group's process group, batched over all
the rows of a parameter group: one ``all_gather_single`` of a small float64
vector per reduction round, which every rank reduces in the same order (so the
levels are bitwise equal on every rank); threshold ternary takes two rounds (the
threshold, then the sums and counts of each side). Optimal LSBQ (b = 0, 2) all-gathers
the magnitudes instead and runs the reference's exact split on them. The math
is :func:`parq_kernels.reference.quantize_rows` with global statistics.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from parq_kernels import reference
from parq_kernels.ops import QuantKind


def _all_gather(flat: Tensor, group) -> Tensor:
    """``(world, m)``: ``flat`` of every rank of ``group``, in group-rank order."""
    world = dist.get_world_size(group)
    out = flat.new_empty(world * flat.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, flat.contiguous(), group=group)
    return out.view(world, flat.numel())


def _reduce(
    groups: list, sums: list[Tensor], maxes: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Sum ``sums[i]`` and max ``maxes[i]`` (float64, any shape) over ``groups[i]``.

    One collective per distinct process group; every rank reduces the gathered
    values in rank order, so the results are bitwise equal everywhere.
    """
    out_s, out_m = list(sums), list(maxes)
    by_group: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            by_group.setdefault(g, []).append(i)
    for g, idx in by_group.items():
        parts = [sums[i].reshape(-1) for i in idx] + [maxes[i].reshape(-1) for i in idx]
        flat = torch.cat(parts) if parts else sums[idx[0]].new_zeros(0)
        gathered = _all_gather(flat, g)
        ns = sum(sums[i].numel() for i in idx)
        s_all, m_all = gathered[:, :ns].sum(dim=0), gathered[:, ns:].amax(dim=0)
        off = 0
        for i in idx:
            out_s[i] = s_all[off : off + sums[i].numel()].view_as(sums[i])
            off += sums[i].numel()
        off = 0
        for i in idx:
            out_m[i] = m_all[off : off + maxes[i].numel()].view_as(maxes[i])
            off += maxes[i].numel()
    return out_s, out_m


def _means(S: Tensor, n: int) -> Tensor:
    """float32 ``S / n`` (0 for empty groups), like ``reference._row_mean``."""
    return (S / n if n else torch.zeros_like(S)).float()


def _abs_max(x: Tensor) -> Tensor:
    """max |x| per row (0 on an empty shard), float64 ``(rows, 1)``."""
    if x.size(1) == 0:
        return x.new_zeros(x.size(0), 1, dtype=torch.float64)
    return x.abs().amax(dim=1, keepdim=True).double()


def _abs_sum(x: Tensor) -> Tensor:
    return x.abs().double().sum(dim=1, keepdim=True)


def global_quantize(
    xs: list[Tensor],
    ns: list[int],
    groups: list,
    chunks: list[list[int]],
    kind: int,
    b: int,
    qargs: tuple[float, ...],
    center: bool,
    need_q: bool = True,
) -> tuple[list[Tensor | None], list[Tensor], list[bool]]:
    """``(q, Q, nonfinite)`` for rows split across ranks, with global statistics.

    ``xs[i]``: float32 ``(rows, n_local)``, the local parts of ``rows`` groups of
    global length ``ns[i]``, reduced over ``groups[i]``; ``chunks[i]``: the
    ``n_local`` of every rank of the group (for optimal LSBQ's all-gather).
    The math is :func:`parq_kernels.reference.quantize_rows` with every mean,
    max and sum taken over the whole group; ``Q`` is ``(rows, K)``. With
    ``need_q=False`` the elementwise ``q`` is skipped (``None``): only ``Q`` is wanted.
    """
    kind = QuantKind(kind)
    nonfinite = [False] * len(xs)
    ms = None
    if center:
        (S,), _ = _reduce_one(groups, [[x.double().sum(dim=1, keepdim=True)] for x in xs])
        ms = [_means(s, n) for s, n in zip(S, ns, strict=True)]
        nonfinite = [not bool(torch.isfinite(s).all()) for s in S]
        xs = [x - m for x, m in zip(xs, ms, strict=True)]
    if kind == QuantKind.LSBQ_OPTIMAL and b != 1:
        out, bad = _optimal(xs, groups, chunks, b, need_q)
    else:
        out, bad = _by_stats(xs, ns, groups, kind, b, qargs, need_q)
    nonfinite = [a or c for a, c in zip(nonfinite, bad, strict=True)]
    qs, Qs = [o[0] for o in out], [o[1] for o in out]
    if ms is not None:
        qs = [None if q is None else q + m for q, m in zip(qs, ms, strict=True)]
        Qs = [Q + m for Q, m in zip(Qs, ms, strict=True)]
    return qs, Qs, nonfinite


def _reduce_one(groups: list, sums: list[list[Tensor]], maxes: list[list[Tensor]] | None = None):
    """:func:`_reduce` over per-item lists of ``(rows, 1)`` columns; returns lists of columns."""
    maxes = maxes or [[] for _ in sums]
    width_s = len(sums[0]) if sums else 0
    width_m = len(maxes[0]) if maxes else 0

    def cat(cols: list[Tensor], like: Tensor) -> Tensor:
        return torch.cat(cols, dim=1) if cols else like.new_zeros(like.size(0), 0)

    like = [(s or m)[0] for s, m in zip(sums, maxes, strict=True)]
    S, M = _reduce(
        groups,
        [cat(s, lk) for s, lk in zip(sums, like, strict=True)],
        [cat(m, lk) for m, lk in zip(maxes, like, strict=True)],
    )
    s_cols = [[s[:, k : k + 1] for s in S] for k in range(width_s)]
    m_cols = [[m[:, k : k + 1] for m in M] for k in range(width_m)]
    return s_cols, m_cols


def _by_stats(xs, ns, groups, kind: QuantKind, b: int, qargs, need_q) -> tuple[list, list[bool]]:
    """Quantizers whose statistics are sums and maxima (all but optimal LSBQ)."""
    tiny = torch.finfo(torch.float32).tiny
    if kind == QuantKind.LSBQ_GREEDY or kind == QuantKind.LSBQ_OPTIMAL:  # optimal b=1 is greedy
        rs = list(xs)
        qs = [torch.zeros_like(x) for x in xs]
        vs: list[list[Tensor]] = [[] for _ in xs]
        bad = [False] * len(xs)
        for _ in range(b):
            (S,), _ = _reduce_one(groups, [[_abs_sum(r)] for r in rs])
            for i, (s, n) in enumerate(zip(S, ns, strict=True)):
                bad[i] = bad[i] or not bool(torch.isfinite(s).all())
                v = _means(s, n)
                step = v * reference._sgn(rs[i])
                if need_q:
                    qs[i] = qs[i] + step
                rs[i] = rs[i] - step
                vs[i].append(v)
        out = [(q if need_q else None, reference._binary_levels(torch.cat(v, dim=1)))
               for q, v in zip(qs, vs, strict=True)]  # fmt: skip
        return out, bad
    if kind == QuantKind.LSBQ_TERNARY:
        (S,), _ = _reduce_one(groups, [[_abs_sum(x)] for x in xs])
        out = []
        for x, s, n in zip(xs, S, ns, strict=True):
            v = qargs[0] * _means(s, n)
            q = None
            if need_q:
                q = torch.where(x <= -v / 2, -v, torch.where(x <= v / 2, torch.zeros_like(x), v))
            out.append((q, torch.cat([-v, torch.zeros_like(v), v], dim=1)))
        return out, [not bool(torch.isfinite(s).all()) for s in S]
    if kind == QuantKind.ASYM:
        neg_inf = [x.new_full((x.size(0), 1), -math.inf, dtype=torch.float64) for x in xs]
        mx = [_amax_or(x, fill) for x, fill in zip(xs, neg_inf, strict=True)]
        mn = [_amax_or(-x, fill) for x, fill in zip(xs, neg_inf, strict=True)]
        _, (M_max, M_negmin) = _reduce_one(
            groups, [[] for _ in xs], [[a, c] for a, c in zip(mx, mn, strict=True)]
        )
        out = []
        top = 2**b - 1
        for x, hi, neg_lo, n in zip(xs, M_max, M_negmin, ns, strict=True):
            x_max = hi.float() if n else torch.zeros_like(hi, dtype=torch.float32)
            x_min = (-neg_lo).float() if n else torch.zeros_like(hi, dtype=torch.float32)
            s = ((x_max - x_min) / top).clamp_min(tiny)
            z = torch.round(x_min / s)
            q = torch.clamp(torch.round(x / s), z, z + top) * s if need_q else None
            Q = (z + torch.arange(top + 1, dtype=x.dtype, device=x.device)) * s
            out.append((q, Q))
        return out, [not bool(torch.isfinite(a).all() and torch.isfinite(c).all())
                     for a, c in zip(M_max, M_negmin, strict=True)]  # fmt: skip
    if kind == QuantKind.TERNARY_THRESHOLD:
        return _threshold(xs, ns, groups, qargs, need_q)
    if kind == QuantKind.TERNARY_UNIF:
        _, (M,) = _reduce_one(groups, [[] for _ in xs], [[_abs_max(x)] for x in xs])
        out = []
        for x, m in zip(xs, M, strict=True):
            s = m.float().clamp_min(tiny) / 1.5
            q = torch.clamp(torch.round(x / s), -1, 1) * s if need_q else None
            out.append((q, torch.tensor([-1.0, 0.0, 1.0], dtype=x.dtype, device=x.device) * s))
        return out, [not bool(torch.isfinite(m).all()) for m in M]
    # UNIFORM
    scale_max, int_shift, zero_point = bool(qargs[0]), qargs[1], qargs[2]
    sums = [[] if scale_max else [_abs_sum(x)] for x in xs]
    cols, (M,) = _reduce_one(groups, sums, [[_abs_max(x)] for x in xs])
    out = []
    r = 2 ** (b - 1) - int_shift
    K = int((2**b - 2 * int_shift) // 1) + 1
    for i, (x, m, n) in enumerate(zip(xs, M, ns, strict=True)):
        q_max = m.float()
        if not scale_max:
            q_max = torch.minimum(b * _means(cols[0][i], n), q_max)
        q_max = q_max.clamp_min(tiny)
        s = q_max / r
        q = None
        if need_q:
            q = (torch.round(torch.clamp(x, -q_max, q_max) / s - zero_point) + zero_point) * s
        out.append((q, (torch.arange(K, dtype=x.dtype, device=x.device) - r) * s))
    return out, [not bool(torch.isfinite(m).all()) for m in M]


def _threshold(xs, ns, groups, qargs, need_q) -> tuple[list, list[bool]]:
    """Threshold ternary (SPEC.md §9) with global statistics, two reductions: ``D`` from
    the global mean|x| (or max|x|), then the global sums and counts of each side."""
    factor, by_max = qargs[0], bool(qargs[1])
    if by_max:
        _, (M,) = _reduce_one(groups, [[] for _ in xs], [[_abs_max(x)] for x in xs])
        Ds = [factor * m.float() for m in M]
    else:
        (M,), _ = _reduce_one(groups, [[_abs_sum(x)] for x in xs])
        Ds = [factor * _means(s, n) for s, n in zip(M, ns, strict=True)]
    sides = []
    for x, D in zip(xs, Ds, strict=True):
        pos, neg = x >= D, x <= -D
        sides.append([torch.where(pos, x, 0.0).double().sum(dim=1, keepdim=True),
                      pos.double().sum(dim=1, keepdim=True),
                      torch.where(neg, -x, 0.0).double().sum(dim=1, keepdim=True),
                      neg.double().sum(dim=1, keepdim=True)])  # fmt: skip
    (SP, NP, SN, NN), _ = _reduce_one(groups, sides)
    tiny = torch.finfo(torch.float32).tiny
    out = []
    for x, D, sp, n_pos, sn, n_neg in zip(xs, Ds, SP, NP, SN, NN, strict=True):
        a_pos = (sp / n_pos.clamp_min(1)).float()
        a_neg = (sn / n_neg.clamp_min(1)).float()
        both = D.clamp_min(tiny)
        a_pos, a_neg = (
            torch.where(n_pos > 0, a_pos, torch.where(n_neg > 0, a_neg, both)),
            torch.where(n_neg > 0, a_neg, torch.where(n_pos > 0, a_pos, both)),
        )
        q = None
        if need_q:
            q = torch.where(x >= D, a_pos, torch.where(x <= -D, -a_neg, torch.zeros_like(x)))
        out.append((q, torch.cat([-a_neg, torch.zeros_like(a_pos), a_pos], dim=1)))
    return out, [not bool(torch.isfinite(m).all()) for m in M]


def _amax_or(x: Tensor, fill: Tensor) -> Tensor:
    return fill if x.size(1) == 0 else x.amax(dim=1, keepdim=True).double()


def _optimal(xs, groups, chunks, b: int, need_q: bool) -> tuple[list, list[bool]]:
    """Optimal LSBQ (b = 0, 2): all-gather the magnitudes, then the reference split."""
    full: list[Tensor | None] = [None] * len(xs)
    by_group: dict = {}
    for i, g in enumerate(groups):
        if g is None:
            full[i] = xs[i].abs()
        else:
            by_group.setdefault(g, []).append(i)
    for g, idx in by_group.items():
        world = len(chunks[idx[0]])
        totals = [sum(xs[i].size(0) * chunks[i][c] for i in idx) for c in range(world)]
        flat = torch.cat([xs[i].abs().reshape(-1) for i in idx])
        padded = flat.new_zeros(max(totals))
        padded[: flat.numel()] = flat
        gathered = _all_gather(padded, g)
        offsets = [0] * world
        for i in idx:
            rows = xs[i].size(0)
            pieces = []
            for c in range(world):
                m = rows * chunks[i][c]
                pieces.append(gathered[c, offsets[c] : offsets[c] + m].view(rows, chunks[i][c]))
                offsets[c] += m
            full[i] = torch.cat(pieces, dim=1)
    out, bad = [], []
    for x, a in zip(xs, full, strict=True):
        bad.append(not bool(torch.isfinite(a).all()))
        lo, hi = reference.optimal_split(a, ternary=(b == 0))
        if b == 0:  # the elementwise part of reference.quantize_lsbq_optimal
            A = hi.to(x.dtype)
            half = A / 2
            q = None
            if need_q:
                s = reference._sgn(x)
                q = (s + reference._sgn(x - s * half)) * half
            out.append((q, torch.cat([-A, torch.zeros_like(A), A], dim=1)))
        else:
            v1 = ((hi + lo) / 2).to(x.dtype)
            v2 = ((hi - lo) / 2).to(x.dtype)
            q = None
            if need_q:
                q = v1 * reference._sgn(x)
                q = q + v2 * reference._sgn(x - q)
            out.append((q, reference._binary_levels(torch.cat([v1, v2], dim=1))))
    return out, bad

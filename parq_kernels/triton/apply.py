"""The fused pass: latent copy, non-finite flag, hard quantization and prox.

``_apply_kernel`` runs once per tile class on every step. Per tile it reads the
weights once, writes them to the latent copy, flags non-finite values, and
writes the projected weights. On quantization-update steps ``hard(x)`` is the
quantizer's own ``q`` (arithmetic from the row statistics: no level search)
and the tile that starts a row also copies the row's fresh levels into
``quants``; on the other steps ``hard(x)`` is the nearest stored level.
Level lookups: a compare-and-select over the ``K`` levels for ``K <= 16``, a
binary search (gathers from the row's levels) above. The body after the read is
the jit helper ``flag_and_project``, shared with the fused step's apply kernel
(:mod:`.step_kernels`), which reads the (updated) latent instead of ``p``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from parq_kernels.triton.stats import (
    ASYM,
    LSBQ_TERNARY,
    NST,
    S_MEAN,
    S_QMAX,
    S_SCALE,
    S_THR,
    S_V,
    S_ZERO,
    TERNARY_THRESHOLD,
    TERNARY_UNIF,
    UNIFORM,
    round_half_even,
    sgn,
)

# ProxKind values (parq_kernels.ops.ProxKind)
NONE = tl.constexpr(0)
HARD = tl.constexpr(1)
SOFT = tl.constexpr(2)
PARQ = tl.constexpr(3)
RELAX = tl.constexpr(4)
PQ_L1 = tl.constexpr(5)  # ProxQuant, l1 penalty
PQ_L2 = tl.constexpr(6)  # ProxQuant, l2 penalty
BC = tl.constexpr(7)  # BinaryConnect: HARD, and the latent clamped to the row's level range


@triton.jit
def quantizer_q(xc, st, rmask, qa0, qa2, KIND: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr):
    """The quantizer's ``q`` of the (centered) values ``xc`` from the row statistics."""
    if KIND == UNIFORM:  # qa2 = zero_point
        qmax = tl.load(st + S_QMAX, mask=rmask, other=1.0)
        s = tl.load(st + S_SCALE, mask=rmask, other=1.0)
        y = tl.minimum(tl.maximum(xc, -qmax), qmax) / s - qa2
        q = (round_half_even(y) + qa2) * s
    elif KIND == TERNARY_UNIF:
        s = tl.load(st + S_SCALE, mask=rmask, other=1.0)
        q = tl.minimum(tl.maximum(round_half_even(xc / s), -1.0), 1.0) * s
    elif KIND == ASYM:
        s = tl.load(st + S_SCALE, mask=rmask, other=1.0)
        z = tl.load(st + S_ZERO, mask=rmask, other=0.0)
        top = 2.0**BITS - 1.0
        q = tl.minimum(tl.maximum(round_half_even(xc / s), z), z + top) * s
    elif KIND == LSBQ_TERNARY:
        v = tl.load(st + S_V, mask=rmask, other=0.0)
        q = tl.where(xc <= -v / 2, -v, tl.where(xc <= v / 2, 0.0, v))
    elif KIND == TERNARY_THRESHOLD:  # a_pos where x >= D, -a_neg where x <= -D, else 0
        d = tl.load(st + S_THR, mask=rmask, other=0.0)
        ap = tl.load(st + S_V, mask=rmask, other=0.0)
        an = tl.load(st + S_V + 1, mask=rmask, other=0.0)
        q = tl.where(xc >= d, ap, tl.where(xc <= -d, -an, 0.0))
    elif K == 3:  # optimal ternary: A = hi
        half = tl.load(st + S_V, mask=rmask, other=0.0) / 2
        s1 = sgn(xc)
        q = (s1 + sgn(xc - s1 * half)) * half
    else:  # greedy / optimal 2-bit: q = sum_i v_i sgn(r_{i-1})
        q = tl.zeros_like(xc)
        res = xc
        for i in tl.static_range(BITS):
            v = tl.load(st + S_V + i, mask=rmask, other=0.0)
            step = v * tl.where(res >= 0, 1.0, -1.0)  # v sgn(r), inlined
            q = q + step
            res = res - step
    return q


@triton.jit
def interval(x, qrow, mask, rmask, K: tl.constexpr, KP: tl.constexpr, LOGKP: tl.constexpr):
    """``(lo, hi)``: ``Q[max(i-1, 0)]``, ``Q[min(i, K-1)]`` with ``i = #{Q_j < x}``."""
    if K <= 16:
        lo = tl.zeros_like(x) + tl.load(qrow, mask=rmask, other=0.0)
        hi = tl.zeros_like(x) + tl.load(qrow + (K - 1), mask=rmask, other=0.0)
        for j in tl.static_range(K):
            qj = tl.load(qrow + j, mask=rmask, other=0.0)
            lo = tl.where(qj < x, qj, lo)
        for j in tl.static_range(K):
            qj = tl.load(qrow + (K - 1 - j), mask=rmask, other=0.0)
            hi = tl.where(qj >= x, qj, hi)
    else:
        pos = tl.zeros(x.shape, tl.int32)
        for s in tl.static_range(LOGKP):
            cand = pos + (KP >> (s + 1))
            ok = mask & (cand <= K)
            qv = tl.load(qrow + (cand - 1), mask=ok, other=0.0)
            pos = tl.where(ok & (qv < x), cand, pos)
        lo = tl.load(qrow + tl.maximum(pos - 1, 0), mask=mask, other=0.0)
        hi = tl.load(qrow + tl.minimum(pos, K - 1), mask=mask, other=0.0)
    return lo, hi


@triton.jit
def nearest(x, qrow, mask, rmask, K: tl.constexpr, KP: tl.constexpr, LOGKP: tl.constexpr):
    """``Q[#{j : M_j < x}]`` with midpoints ``M_j = (Q_j + Q_{j+1}) / 2``."""
    if K <= 16:
        prev = tl.load(qrow, mask=rmask, other=0.0)
        near = tl.zeros_like(x) + prev
        for j in tl.static_range(1, K):
            qj = tl.load(qrow + j, mask=rmask, other=0.0)
            near = tl.where((prev + qj) / 2 < x, qj, near)
            prev = qj
    else:
        pos = tl.zeros(x.shape, tl.int32)
        for s in tl.static_range(LOGKP):
            cand = pos + (KP >> (s + 1))
            ok = mask & (cand <= K - 1)
            q0 = tl.load(qrow + (cand - 1), mask=ok, other=0.0)
            q1 = tl.load(qrow + cand, mask=ok, other=0.0)
            pos = tl.where(ok & ((q0 + q1) / 2 < x), cand, pos)
        near = tl.load(qrow + pos, mask=mask, other=0.0)
    return near


@triton.jit
def _apply_kernel(
    P, L, QS, QWS, STATS, TAB, FLAGS, gamma, arg, arg2, qa0, qa2,
    KIND: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    LOGKP: tl.constexpr, CENTER: tl.constexpr, UPDATE: tl.constexpr, PROX: tl.constexpr,
    NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One tile: ``L = P`` (where ``P`` is finite; elsewhere ``L`` keeps its value);
    ``P = prox(L / gamma)``; flag non-finite values.

    ``arg``/``arg2``: SOFT ``T``/``sigmoid(T/2) - 1/2``, PARQ ``rho``,
    RELAX ``theta``/``1 - theta``. ``QWS`` holds the fresh levels (update steps),
    ``QS`` the stored ones (written from ``QWS`` on update steps).
    """
    pid = tl.program_id(0)
    t = TAB + pid * NF
    # (v // ALIGN) * ALIGN == v here (the plan checked it): tells the compiler that
    # offsets, stride and length are multiples of ALIGN, so loads/stores vectorize
    p_off = (tl.load(t + 0) // ALIGN) * ALIGN
    l_off = (tl.load(t + 1) // ALIGN) * ALIGN
    ncols = (tl.load(t + 5) // ALIGN) * ALIGN  # n, or a chunk of n: a multiple too
    stride = (tl.load(t + 6) // ALIGN) * ALIGN
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    rmask = r < tl.load(t + 4)
    mask = rmask & (c < ncols)
    offs = r * stride + c
    raw = tl.load(P + p_off + offs, mask=mask, other=0.0)
    fine = finite(raw.to(tl.float32))
    # a NaN/Inf input keeps the old latent (read only there: no traffic for finite tiles)
    old = tl.load(L + l_off + offs, mask=mask & (fine == 0), other=0.0)
    kept = tl.where(fine, raw, old)
    if PROX == BC:  # the latent clipped to the row's level range (x keeps the unclipped one)
        tl.store(L + l_off + offs, clamp_latent(kept.to(tl.float32), r, rmask, t, QS, QWS, gamma,
                                                K, UPDATE).to(kept.dtype), mask=mask)  # fmt: skip
    else:
        tl.store(L + l_off + offs, kept, mask=mask)
    x = kept.to(tl.float32) / gamma
    y = flag_and_project(x, mask & (fine == 0), r, rmask, mask, t, QS, QWS, STATS, FLAGS, arg,
                         arg2, qa0, qa2, KIND, BITS, K, KP, LOGKP, CENTER, UPDATE,
                         PROX)  # fmt: skip
    tl.store(P + p_off + offs, y.to(P.dtype.element_ty), mask=mask)


@triton.jit
def clamp_latent(w, r, rmask, t, QS, QWS, gamma, K: tl.constexpr, UPDATE: tl.constexpr):
    """BinaryConnect: ``w`` (float32 latents of the tile) clamped to its rows'
    ``[gamma Q_0, gamma Q_{K-1}]`` (fresh levels on update steps, else the stored ones);
    a NaN stays NaN (the reference's float32 clamp)."""
    if UPDATE:  # noqa: SIM108 (constexpr branch in triton)
        qrow = QWS + (tl.load(t + 3) + r) * K
    else:
        qrow = QS + tl.load(t + 2) + r * K
    lo = tl.load(qrow, mask=rmask, other=0.0) * gamma
    hi = tl.load(qrow + (K - 1), mask=rmask, other=0.0) * gamma
    c = tl.minimum(tl.maximum(w, lo), hi)
    return tl.where(w == w, c, w)


@triton.jit
def flag_kept(kept, t, FLAGS):
    """Flag the tile's parameter (``FLAGS[pidx]``) if any element kept its old latent."""
    bad = tl.max(tl.max(tl.where(kept, 1, 0), axis=1), axis=0)
    tl.store(FLAGS + tl.load(t + 7), 1, mask=bad > 0)


@triton.jit
def finite(x):
    """True where ``x`` (float32) is finite."""
    return (x - x) == 0.0


@triton.jit
def flag_and_project(
    x, kept, r, rmask, mask, t, QS, QWS, STATS, FLAGS, arg, arg2, qa0, qa2,
    KIND: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    LOGKP: tl.constexpr, CENTER: tl.constexpr, UPDATE: tl.constexpr, PROX: tl.constexpr,
):  # fmt: skip
    """The projected values of the tile ``x`` (``(ROWS, BLOCK)`` float32, ``t`` points at
    its tile-table entry): flags ``FLAGS[pidx]`` for a non-finite ``x`` or an element that
    ``kept`` its old latent and, on update steps, copies the fresh levels of the rows the
    tile starts into ``QS``. A non-finite ``x`` is written as it is."""
    q_off = tl.load(t + 2)
    row0 = tl.load(t + 3)
    fine = finite(x)
    flag_kept(kept | (mask & (fine == 0)), t, FLAGS)

    if UPDATE:
        qrow = QWS + (row0 + r) * K
        first = tl.load(t + 10)  # 1 if this tile starts its rows: it writes their levels
        j = tl.arange(0, KP)[None, :]
        qmask = rmask & (j < K * first)
        tl.store(QS + q_off + r * K + j, tl.load(qrow + j, mask=qmask, other=0.0), mask=qmask)
    else:
        qrow = QS + q_off + r * K

    if PROX == NONE:
        y = x
    elif PROX == HARD or PROX == RELAX or PROX == PQ_L1 or PROX == PQ_L2 or PROX == BC:  # noqa: SIM109
        if UPDATE:
            st = STATS + (row0 + r) * NST
            if CENTER:
                m = tl.load(st + S_MEAN, mask=rmask, other=0.0)
                hard = quantizer_q(x - m, st, rmask, qa0, qa2, KIND, BITS, K) + m
            else:
                hard = quantizer_q(x, st, rmask, qa0, qa2, KIND, BITS, K)
        else:
            hard = nearest(x, qrow, mask, rmask, K, KP, LOGKP)
        if PROX == HARD or PROX == BC:  # noqa: SIM109
            y = hard
        elif PROX == RELAX:
            y = arg2 * x + arg * hard
        elif PROX == PQ_L1:  # h + sgn(x - h) max(|x - h| - lam, 0)
            d = x - hard
            mag = tl.maximum(tl.abs(d) - arg, 0.0)
            y = hard + tl.where(d >= 0, mag, -mag)
        else:  # PQ_L2: (x + lam h) / (1 + lam), arg2 = 1 + lam
            y = (x + arg * hard) / arg2
    else:
        lo, hi = interval(x, qrow, mask, rmask, K, KP, LOGKP)
        mid = (lo + hi) / 2
        if PROX == SOFT:
            d = (hi - lo) / 2
            u = (tl.minimum(tl.maximum(x, lo), hi) - lo) / (hi - lo + 1e-12)
            sig = 1.0 / (1.0 + tl.exp(-(arg * (u - 0.5))))
            y = mid + d * (sig - 0.5) / arg2
        else:  # PARQ
            y = tl.minimum(tl.maximum(mid + (x - mid) / arg, lo), hi)
    return tl.where(fine, y, x)

"""Row statistics and level sets (quantization-update steps only).

Statistics are gathered in *passes*. In each pass, ``_partials_kernel`` reduces
every tile (one or more whole rows, or one chunk of a long row) into partial
sums/extrema per row (``PART``, ``(pslots, NP)`` float32), and
``_finalize_kernel`` adds each row's partials in a fixed order (deterministic)
and writes the row's statistics (``STATS``, ``(R, NST)`` float32):

* pass 0 (``center`` only): ``m = mean(x)``;
* pass 1: ``sum|x'|, max|x'|, min x', max x'`` with ``x' = x - m``, from which
  the quantizer's scale (uniform, ternary, asym), zero point (asym) or first
  LSBQ coefficient ``v_1`` follows;
* pass ``k >= 2`` (greedy LSBQ): ``v_k = mean|r_{k-1}|``, the residual being
  recomputed from ``x'`` and ``v_1..v_{k-1}`` exactly as the quantizer does;
* pass ``SIDES`` (threshold ternary, after pass 1 gave ``D``): the sums and counts of
  the ``x' >= D`` and of the ``-x'`` with ``x' <= -D``, from which ``a_pos`` and ``a_neg``.

``_levels_kernel`` then writes each row's ``K`` levels (``QWS``, ``(R, K)``);
the binary LSBQ levels are sorted afterwards by the launcher (``torch.sort``).
The kernels take ``x = p / gamma`` in float32 whatever the parameter dtype.
Their bodies are the jit helpers ``partial_stats`` and ``whole_rows_stats``, which
the fused step's kernels (:mod:`.step_kernels`) call on the updated latent.
"""

from __future__ import annotations

import triton
import triton.language as tl

# STATS columns
S_MEAN = tl.constexpr(0)
S_SCALE = tl.constexpr(1)
S_QMAX = tl.constexpr(2)
S_ZERO = tl.constexpr(3)
S_V = tl.constexpr(4)  # v_1..v_8 (LSBQ), v (LSBQ ternary), A (optimal ternary), a_pos, a_neg
S_THR = tl.constexpr(1)  # threshold ternary: D (in the scale's column)
NST = tl.constexpr(12)
NP = tl.constexpr(4)  # PART columns

# QuantKind values (parq_kernels.ops.QuantKind)
UNIFORM = tl.constexpr(0)
TERNARY_UNIF = tl.constexpr(1)
ASYM = tl.constexpr(2)
LSBQ_GREEDY = tl.constexpr(3)
LSBQ_TERNARY = tl.constexpr(4)
LSBQ_OPTIMAL = tl.constexpr(5)
TERNARY_THRESHOLD = tl.constexpr(6)

SIDES = tl.constexpr(16)  # the statistics pass of threshold ternary's side sums and counts

TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny
INF = tl.constexpr(float("inf"))


@triton.jit
def round_half_even(y):
    """``torch.round`` in float32: nearest integer, ties to even."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def sgn(x):
    """+1 for x >= 0, -1 otherwise."""
    return tl.where(x >= 0, 1.0, -1.0)


@triton.jit
def load_tile(P, L, TAB, pid, gamma, NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
              ALIGN: tl.constexpr):  # fmt: skip
    """One tile of ``x = p / gamma`` (float32) and its coordinates; where ``p`` is NaN/Inf,
    ``x`` is the old latent ``L`` instead (what the apply pass will keep there).

    ``(v // ALIGN) * ALIGN == v`` for the offsets, length and stride (the plan
    checked it): it tells the compiler so, and the loads vectorize.
    """
    t = TAB + pid * NF
    p_off = (tl.load(t + 0) // ALIGN) * ALIGN
    row0 = tl.load(t + 3)
    nrows = tl.load(t + 4)
    ncols = (tl.load(t + 5) // ALIGN) * ALIGN
    stride = (tl.load(t + 6) // ALIGN) * ALIGN
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    rmask = r < nrows
    mask = rmask & (c < ncols)
    raw = tl.load(P + p_off + r * stride + c, mask=mask, other=0.0).to(tl.float32)
    fine = (raw - raw) == 0.0
    l_off = (tl.load(t + 1) // ALIGN) * ALIGN  # read only where p is not finite
    old = tl.load(L + l_off + r * stride + c, mask=mask & (fine == 0), other=0.0)
    x = tl.where(fine, raw, old.to(tl.float32)) / gamma
    return x, r, c, rmask, mask, row0


@triton.jit
def _partials_kernel(
    P, L, TAB, STATS, PART, PAD, pad_ld, gamma,
    PASS: tl.constexpr, CENTER: tl.constexpr, GATHER: tl.constexpr,
    NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Partial statistics of one tile of ``x = p / gamma`` for pass ``PASS`` (module doc).

    ``GATHER``: instead, write ``|x'|`` of the tile into the padded matrix
    ``PAD`` (``(R, pad_ld)`` float32) for the optimal-LSBQ sort.
    """
    pid = tl.program_id(0)
    x, r, c, rmask, mask, row0 = load_tile(P, L, TAB, pid, gamma, NF, ROWS, BLOCK, ALIGN)
    partial_stats(x, r, c, rmask, mask, row0, TAB + pid * NF, STATS, PART, PAD, pad_ld, PASS,
                  CENTER, GATHER)  # fmt: skip


@triton.jit
def partial_stats(x, r, c, rmask, mask, row0, t, STATS, PART, PAD, pad_ld, PASS: tl.constexpr,
                  CENTER: tl.constexpr, GATHER: tl.constexpr):  # fmt: skip
    """Store the partials of the tile ``x`` (``(ROWS, BLOCK)`` float32; ``t`` points at
    its tile-table entry) into ``PART`` (or ``|x'|`` into ``PAD`` when ``GATHER``)."""
    pslot = tl.load(t + 8)
    st = STATS + (row0 + r) * NST
    if CENTER and (PASS > 0 or GATHER):
        x = x - tl.load(st + S_MEAN, mask=rmask, other=0.0)
    if GATHER:
        col0 = tl.load(t + 9)
        tl.store(PAD + (row0 + r) * pad_ld + col0 + c, tl.abs(x), mask=mask)
    else:
        out = PART + (pslot + r) * NP
        if PASS == 0:
            tl.store(out, tl.sum(x, axis=1)[:, None], mask=rmask)
        elif PASS == SIDES:
            d = tl.load(st + S_THR, mask=rmask, other=0.0)
            sp, cp, sn, cn = side_sums(x, mask, d)
            tl.store(out, sp[:, None], mask=rmask)
            tl.store(out + 1, cp[:, None], mask=rmask)
            tl.store(out + 2, sn[:, None], mask=rmask)
            tl.store(out + 3, cn[:, None], mask=rmask)
        elif PASS == 1:
            ax = tl.abs(x)
            tl.store(out, tl.sum(tl.where(mask, ax, 0.0), axis=1)[:, None], mask=rmask)
            tl.store(out + 1, tl.max(tl.where(mask, ax, -INF), axis=1)[:, None], mask=rmask)
            tl.store(out + 2, tl.min(tl.where(mask, x, INF), axis=1)[:, None], mask=rmask)
            tl.store(out + 3, tl.max(tl.where(mask, x, -INF), axis=1)[:, None], mask=rmask)
        else:
            res = x
            for i in tl.static_range(PASS - 1):
                v = tl.load(st + S_V + i, mask=rmask, other=0.0)
                res = res - v * tl.where(res >= 0, 1.0, -1.0)  # v sgn(r), inlined
            tl.store(out, tl.sum(tl.where(mask, tl.abs(res), 0.0), axis=1)[:, None], mask=rmask)


@triton.jit
def _finalize_kernel(
    RT, PART, STATS, n_rows, max_chunks, qa0, qa1, qa2,
    PASS: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, NR: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """Reduce each row's partials (in chunk order) into its statistics."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < n_rows
    first = tl.load(RT + rows * NR + 0, mask=rmask, other=0)
    count = tl.load(RT + rows * NR + 1, mask=rmask, other=0)
    n = tl.load(RT + rows * NR + 2, mask=rmask, other=0).to(tl.float32)
    s0 = tl.zeros([ROWS], tl.float32)
    amax = tl.full([ROWS], -INF, tl.float32)
    mn = tl.full([ROWS], INF, tl.float32)
    mx = tl.full([ROWS], -INF, tl.float32)
    s1 = tl.zeros([ROWS], tl.float32)
    s2 = tl.zeros([ROWS], tl.float32)
    s3 = tl.zeros([ROWS], tl.float32)
    for k in range(0, max_chunks):
        ok = rmask & (k < count)
        part = PART + (first + k) * NP
        s0 = s0 + tl.load(part, mask=ok, other=0.0)
        if PASS == 1:
            amax = tl.maximum(amax, tl.load(part + 1, mask=ok, other=-INF))
            mn = tl.minimum(mn, tl.load(part + 2, mask=ok, other=INF))
            mx = tl.maximum(mx, tl.load(part + 3, mask=ok, other=-INF))
        elif PASS == SIDES:
            s1 = s1 + tl.load(part + 1, mask=ok, other=0.0)
            s2 = s2 + tl.load(part + 2, mask=ok, other=0.0)
            s3 = s3 + tl.load(part + 3, mask=ok, other=0.0)
    nonempty = n > 0
    mean = tl.where(nonempty, s0 / tl.maximum(n, 1.0), 0.0)
    st = STATS + rows * NST
    if PASS == SIDES:
        store_sides(st, rmask, s0, s1, s2, s3)
    elif PASS == 0:
        tl.store(st + S_MEAN, mean, mask=rmask)
    elif PASS == 1:
        store_scale(st, rmask, nonempty, mean, amax, mn, mx, qa0, qa1, KIND, BITS)
    else:
        tl.store(st + S_V + (PASS - 1), mean, mask=rmask)


@triton.jit
def store_scale(st, rmask, nonempty, mean, amax, mn, mx, qa0, qa1,
                KIND: tl.constexpr, BITS: tl.constexpr):  # fmt: skip
    """From ``mean|x'|, max|x'|, min x', max x'`` of each row (pointers ``st`` into
    STATS): the scale (uniform, ternary, asym), zero point (asym) or ``v_1`` (LSBQ)."""
    amax = tl.where(nonempty, amax, 0.0)
    mn = tl.where(nonempty, mn, 0.0)
    mx = tl.where(nonempty, mx, 0.0)
    if KIND == UNIFORM:  # qa0 = scale_is_max, qa1 = int_shift
        qmax = tl.where(qa0 == 0.0, tl.minimum(BITS * mean, amax), amax)
        qmax = tl.maximum(qmax, TINY)
        tl.store(st + S_QMAX, qmax, mask=rmask)
        tl.store(st + S_SCALE, qmax / (2.0 ** (BITS - 1) - qa1), mask=rmask)
    elif KIND == TERNARY_UNIF:
        tl.store(st + S_SCALE, tl.maximum(amax, TINY) / 1.5, mask=rmask)
    elif KIND == ASYM:
        s = tl.maximum((mx - mn) / (2.0**BITS - 1.0), TINY)
        tl.store(st + S_SCALE, s, mask=rmask)
        tl.store(st + S_ZERO, round_half_even(mn / s), mask=rmask)
    elif KIND == LSBQ_TERNARY:  # qa0 = ternary_multiplier
        tl.store(st + S_V, qa0 * mean, mask=rmask)
    elif KIND == TERNARY_THRESHOLD:  # qa0 = delta_factor, qa1 = 1: D from max|x|, 0: mean|x|
        tl.store(st + S_THR, qa0 * tl.where(qa1 != 0.0, amax, mean), mask=rmask)
    else:  # greedy LSBQ: v_1
        tl.store(st + S_V, mean, mask=rmask)


@triton.jit
def side_sums(x, mask, d):
    """Threshold ternary, per row of the tile ``x``: the sum and count of the ``x >= d``
    and of the ``-x`` with ``x <= -d`` (``d``: ``(ROWS, 1)``; counts as float32)."""
    pos = mask & (x >= d)
    neg = mask & (x <= -d)
    sp = tl.sum(tl.where(pos, x, 0.0), axis=1)
    cp = tl.sum(tl.where(pos, 1.0, 0.0), axis=1)
    sn = tl.sum(tl.where(neg, -x, 0.0), axis=1)
    cn = tl.sum(tl.where(neg, 1.0, 0.0), axis=1)
    return sp, cp, sn, cn


@triton.jit
def store_sides(st, rmask, sp, cp, sn, cn):
    """``a_pos``, ``a_neg`` from the side sums and counts (SPEC.md §9): an empty side takes
    the other side's value, both empty ``max(D, tiny)`` (``D`` read from ``st``)."""
    both = tl.maximum(tl.load(st + S_THR, mask=rmask, other=0.0), TINY)
    ap = sp / tl.maximum(cp, 1.0)
    an = sn / tl.maximum(cn, 1.0)
    a_pos = tl.where(cp > 0, ap, tl.where(cn > 0, an, both))
    a_neg = tl.where(cn > 0, an, tl.where(cp > 0, ap, both))
    tl.store(st + S_V, a_pos, mask=rmask)
    tl.store(st + S_V + 1, a_neg, mask=rmask)


@triton.jit
def _whole_rows_stats_kernel(
    P, L, TAB, STATS, gamma, qa0, qa1,
    KIND: tl.constexpr, BITS: tl.constexpr, CENTER: tl.constexpr,
    NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """All statistics passes at once for tiles of whole rows (one read of the weights)."""
    pid = tl.program_id(0)
    x, r, c, rmask, mask, row0 = load_tile(P, L, TAB, pid, gamma, NF, ROWS, BLOCK, ALIGN)
    whole_rows_stats(x, mask, row0, TAB + pid * NF, STATS, qa0, qa1, KIND, BITS, CENTER, ROWS)


@triton.jit
def whole_rows_stats(x, mask, row0, t, STATS, qa0, qa1, KIND: tl.constexpr, BITS: tl.constexpr,
                     CENTER: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
    """Every statistic of the whole rows of the tile ``x`` (``(ROWS, BLOCK)`` float32;
    ``t`` points at its tile-table entry) into ``STATS``.

    Same float32 operations as the pass-by-pass kernels (the greedy residual is
    carried in registers instead of being recomputed), so the same values.
    """
    rows = row0 + tl.arange(0, ROWS)
    rmask1 = tl.arange(0, ROWS) < tl.load(t + 4)
    n = tl.load(t + 5).to(tl.float32)
    nonempty = rmask1 & ((tl.zeros([ROWS], tl.float32) + n) > 0)
    inv_n = tl.maximum(n, 1.0)
    st = STATS + rows * NST
    if CENTER:
        m = tl.where(nonempty, tl.sum(x, axis=1) / inv_n, 0.0)
        tl.store(st + S_MEAN, m, mask=rmask1)
        x = tl.where(mask, x - m[:, None], 0.0)
    ax = tl.abs(x)
    mean = tl.where(nonempty, tl.sum(ax, axis=1) / inv_n, 0.0)
    amax = tl.max(tl.where(mask, ax, -INF), axis=1)
    mn = tl.min(tl.where(mask, x, INF), axis=1)
    mx = tl.max(tl.where(mask, x, -INF), axis=1)
    store_scale(st, rmask1, nonempty, mean, amax, mn, mx, qa0, qa1, KIND, BITS)
    if KIND == TERNARY_THRESHOLD:  # the second read of the rows is from registers
        d = qa0 * tl.where(qa1 != 0.0, tl.where(nonempty, amax, 0.0), mean)
        sp, cp, sn, cn = side_sums(x, mask, d[:, None])
        store_sides(st, rmask1, sp, cp, sn, cn)
    if KIND == LSBQ_GREEDY:
        res = x
        v = mean
        for i in tl.static_range(1, BITS):
            res = res - v[:, None] * tl.where(res >= 0, 1.0, -1.0)  # v sgn(r), inlined
            v = tl.where(nonempty, tl.sum(tl.where(mask, tl.abs(res), 0.0), axis=1) / inv_n, 0.0)
            tl.store(st + S_V + i, v, mask=rmask1)


@triton.jit
def _levels_kernel(
    STATS, QWS, n_rows, qa1,
    KIND: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    CENTER: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    """``QWS[row, :K]``: the row's levels, computed like the reference's ``Q``.

    Ascending for every kind except the binary LSBQ levels (greedy and optimal
    2-bit), which the launcher sorts afterwards.
    """
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, KP)[None, :]
    rmask = rows < n_rows
    st = STATS + rows * NST
    jf = j.to(tl.float32)
    if KIND == UNIFORM:  # qa1 = int_shift
        s = tl.load(st + S_SCALE, mask=rmask, other=0.0)
        Q = (jf - (2.0 ** (BITS - 1) - qa1)) * s
    elif KIND == TERNARY_UNIF:
        s = tl.load(st + S_SCALE, mask=rmask, other=0.0)
        Q = (jf - 1.0) * s
    elif KIND == ASYM:
        s = tl.load(st + S_SCALE, mask=rmask, other=0.0)
        z = tl.load(st + S_ZERO, mask=rmask, other=0.0)
        Q = (z + jf) * s
    elif KIND == TERNARY_THRESHOLD:  # [-a_neg, 0, a_pos]
        ap = tl.load(st + S_V, mask=rmask, other=0.0)
        an = tl.load(st + S_V + 1, mask=rmask, other=0.0)
        Q = tl.where(j == 0, -an, tl.where(j == 1, 0.0, ap))
    elif K == 3:  # LSBQ ternary, optimal ternary: [-v, 0, v]
        v = tl.load(st + S_V, mask=rmask, other=0.0)
        Q = tl.where(j == 0, -v, tl.where(j == 1, 0.0, v))
    else:  # binary levels sum_i c_i v_i, accumulated in i order like q
        Q = tl.zeros([ROWS, KP], tl.float32)
        for i in tl.static_range(BITS):
            v = tl.load(st + S_V + i, mask=rmask, other=0.0)
            bit = (j >> (BITS - 1 - i)) & 1
            Q = Q + tl.where(bit == 1, v, -v)
    if CENTER:
        Q = Q + tl.load(st + S_MEAN, mask=rmask, other=0.0)
    tl.store(QWS + rows * K + j, Q, mask=rmask & (j < K))

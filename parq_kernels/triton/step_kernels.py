"""Kernels of the fused step: the base update folded into the first read of the latent.

Each kernel is its ``quant_prox_`` twin (:mod:`.stats`, :mod:`.apply`) with a
different read: instead of ``x = p / gamma`` it reads ``x = w / gamma`` where
``w`` is the latent, and with ``BASE`` that read *is* the base update
(:func:`.base_update.update_tile`: latent, gradient and state in, latent and
state out, the stored latent handed on). The statistics and projection bodies
are the shared jit helpers, so both ops compute the same values from the same
``x``.

* ``_step_apply_kernel``: non-update steps (``BASE``: one pass reading latent,
  gradient and state, writing latent, state and ``p``), and the last pass of
  update steps (``BASE`` off: reads the updated latent, writes ``p`` only);
* ``_step_whole_rows_stats_kernel``: update steps whose rows all fit in one
  tile: the base update and every statistic of the rows in one read;
* ``_step_partials_kernel``: update steps with long rows: the first statistics
  pass applies the base update (``BASE``), later passes read the latent.

Addressing (int64 element offsets): the latent and ``p`` from the tile table
(relative to ``latents[0]`` / ``params[0]``); the gradient at
``GTAB[pidx] + eoff`` relative to ``grads[0]`` and the state at
``BTAB[pidx, k] + eoff`` relative to ``bufs{k+1}[0]``, where ``eoff`` is the
tile's offset inside its parameter (``F_EOFF``) and ``pidx`` its parameter.
"""

from __future__ import annotations

import triton
import triton.language as tl

from parq_kernels.triton.apply import BC, clamp_latent, flag_and_project, flag_kept
from parq_kernels.triton.base_update import update_tile
from parq_kernels.triton.stats import partial_stats, whole_rows_stats


@triton.jit
def step_tile(
    L, G, B1, B2, B3, TAB, GTAB, BTAB, pid, h0, h1, h2, h3, h4, h5, h6, h7, h8,
    BASE: tl.constexpr, OPT: tl.constexpr, NF: tl.constexpr, ROWS: tl.constexpr,
    BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Tile ``pid``'s latent as float32 (after the base update when ``BASE``, which also
    writes the latent and the state) and its coordinates.

    ``(v // ALIGN) * ALIGN == v`` for every offset, length and stride (the launcher
    checked it for all five lists): it tells the compiler so, and accesses vectorize.
    """
    t = TAB + pid * NF
    l_off = (tl.load(t + 1) // ALIGN) * ALIGN
    ncols = (tl.load(t + 5) // ALIGN) * ALIGN
    stride = (tl.load(t + 6) // ALIGN) * ALIGN
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    rmask = r < tl.load(t + 4)
    mask = rmask & (c < ncols)
    offs = r * stride + c
    if BASE:
        pidx = tl.load(t + 7)
        e_off = (tl.load(t + 11) // ALIGN) * ALIGN
        g_off = (tl.load(GTAB + pidx) // ALIGN) * ALIGN + e_off
        b1_off = (tl.load(BTAB + pidx * 3) // ALIGN) * ALIGN + e_off
        b2_off = (tl.load(BTAB + pidx * 3 + 1) // ALIGN) * ALIGN + e_off
        b3_off = (tl.load(BTAB + pidx * 3 + 2) // ALIGN) * ALIGN + e_off
        w, kept = update_tile(L + l_off + offs, G + g_off + offs, B1 + b1_off + offs,
                              B2 + b2_off + offs, B3 + b3_off + offs, mask, h0, h1, h2, h3, h4,
                              h5, h6, h7, h8, OPT)  # fmt: skip
    else:
        w = tl.load(L + l_off + offs, mask=mask, other=0.0).to(tl.float32)
        kept = mask & (c < 0)  # nothing updated, nothing kept
    return w, kept, r, c, rmask, mask, offs, t


@triton.jit
def _step_apply_kernel(
    L, G, B1, B2, B3, P, QS, QWS, STATS, TAB, GTAB, BTAB, FLAGS,
    gamma, arg, arg2, qa0, qa2, h0, h1, h2, h3, h4, h5, h6, h7, h8,
    BASE: tl.constexpr, OPT: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr,
    LOGKP: tl.constexpr, CENTER: tl.constexpr, UPDATE: tl.constexpr, PROX: tl.constexpr,
    NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """One tile: (``BASE``: the base update of the latent and state, then)
    ``P = prox(L / gamma)``; flag non-finite ``L / gamma``. Scalars as ``_apply_kernel``."""
    pid = tl.program_id(0)
    w, kept, r, c, rmask, mask, offs, t = step_tile(
        L, G, B1, B2, B3, TAB, GTAB, BTAB, pid, h0, h1, h2, h3, h4, h5, h6, h7, h8, BASE, OPT, NF,
        ROWS, BLOCK, ALIGN)  # fmt: skip
    y = flag_and_project(w / gamma, kept, r, rmask, mask, t, QS, QWS, STATS, FLAGS, arg, arg2, qa0,
                         qa2, KIND, BITS, K, KP, LOGKP, CENTER, UPDATE, PROX)  # fmt: skip
    if PROX == BC:  # BinaryConnect: the (updated) latent clipped to the row's level range
        l_off = (tl.load(t + 1) // ALIGN) * ALIGN
        wc = clamp_latent(w, r, rmask, t, QS, QWS, gamma, K, UPDATE)
        tl.store(L + l_off + offs, wc.to(L.dtype.element_ty), mask=mask)
    p_off = (tl.load(t + 0) // ALIGN) * ALIGN
    tl.store(P + p_off + offs, y.to(P.dtype.element_ty), mask=mask)


@triton.jit
def _step_whole_rows_stats_kernel(
    L, G, B1, B2, B3, TAB, GTAB, BTAB, STATS, FLAGS, gamma, qa0, qa1,
    h0, h1, h2, h3, h4, h5, h6, h7, h8, OPT: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, CENTER: tl.constexpr,
    NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """The base update of a tile of whole rows and all their statistics, in one read
    (updates rejected as non-finite are flagged here: later passes only see the latent)."""
    pid = tl.program_id(0)
    w, kept, r, c, rmask, mask, offs, t = step_tile(
        L, G, B1, B2, B3, TAB, GTAB, BTAB, pid, h0, h1, h2, h3, h4, h5, h6, h7, h8, True, OPT, NF,
        ROWS, BLOCK, ALIGN)  # fmt: skip
    flag_kept(kept, t, FLAGS)
    whole_rows_stats(w / gamma, mask, tl.load(t + 3), t, STATS, qa0, qa1, KIND, BITS, CENTER, ROWS)


@triton.jit
def _step_partials_kernel(
    L, G, B1, B2, B3, TAB, GTAB, BTAB, STATS, PART, PAD, pad_ld, FLAGS, gamma,
    h0, h1, h2, h3, h4, h5, h6, h7, h8, BASE: tl.constexpr, OPT: tl.constexpr,
    PASS: tl.constexpr, CENTER: tl.constexpr, GATHER: tl.constexpr,
    NF: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    """Partial statistics of one tile of ``x = L / gamma`` for pass ``PASS`` (:mod:`.stats`),
    the first pass (``BASE``) applying the base update as it reads."""
    pid = tl.program_id(0)
    w, kept, r, c, rmask, mask, offs, t = step_tile(
        L, G, B1, B2, B3, TAB, GTAB, BTAB, pid, h0, h1, h2, h3, h4, h5, h6, h7, h8, BASE, OPT, NF,
        ROWS, BLOCK, ALIGN)  # fmt: skip
    if BASE:
        flag_kept(kept, t, FLAGS)
    partial_stats(w / gamma, r, c, rmask, mask, tl.load(t + 3), t, STATS, PART, PAD, pad_ld, PASS,
                  CENTER, GATHER)  # fmt: skip

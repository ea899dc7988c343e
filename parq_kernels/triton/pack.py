"""Triton backend of the packed-export ops ``pack_``, ``unpack_`` and ``dequantize_``
(SPEC.md §10; contract in :mod:`parq_kernels.pack_ops`).

A stream of ``w``-bit indices is cut into groups of 8 elements, which fill exactly
``w`` bytes: element ``k`` of group ``g`` holds bits ``[k*w, (k+1)*w)`` of the
little-endian word made of bytes ``[g*w, g*w + w)``. A program handles a tile of
``G`` groups of one tensor as a ``(G, 8)`` block of elements and a ``(G, WP)``
block of bytes (``WP = next_pow2(w)``, masked to ``w``): packing sums the shifted
indices of a group into an int64 word (the bit fields are disjoint, so the sum is
an OR) and splits it into bytes; unpacking does the reverse. Dequantize unpacks
and gathers each element's level from its row (``row = element // cols``),
converting through float32 like ``Tensor.to``; an index ``>= K`` reads level
``K - 1`` and flags the tensor.

All tensors of a call go through one launch: a tile table (int64, built once per
tensor set and cached) holds, per tile, the element offsets of its tensors
relative to the first tensor of each list, its first group, the tensor's element
count, its row length and level count, and the tensor's index.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from parq_kernels.triton.plan import _offset

# tile table fields (int64)
# (globals that a kernel reads must be constexpr: the real lowering rejects plain ones)
T_IN, T_OUT, T_LEV, T_G0, T_N, T_COLS, T_K, T_PIDX = (tl.constexpr(i) for i in range(8))
NF = tl.constexpr(8)
GROUPS = 256  # groups of 8 elements per program (2048 elements)
INTERPRET_GROUPS = 4096  # under the Triton interpreter a program costs milliseconds

_CACHE: OrderedDict[tuple, tuple[Tensor, int]] = OrderedDict()
_CACHE_SIZE = 16


@triton.jit
def _pack_kernel(IDX, OUT, TABLE, W: tl.constexpr, WP: tl.constexpr, G: tl.constexpr):
    t = TABLE + tl.program_id(0) * NF
    g = tl.load(t + T_G0) + tl.arange(0, G)
    n = tl.load(t + T_N)
    k = tl.arange(0, 8).to(tl.int64)
    e = g[:, None] * 8 + k[None, :]
    v = tl.load(IDX + tl.load(t + T_IN) + e, mask=e < n, other=0).to(tl.int64) & ((1 << W) - 1)
    word = tl.sum(v << (k[None, :] * W), axis=1)  # disjoint bit fields: the sum is an OR
    b = tl.arange(0, WP).to(tl.int64)
    o = g[:, None] * W + b[None, :]
    byte = (word[:, None] >> (b[None, :] * 8)) & 255
    mask = (b[None, :] < W) & (o < (n * W + 7) // 8)
    tl.store(OUT + tl.load(t + T_OUT) + o, byte.to(tl.uint8), mask=mask)


@triton.jit
def _unpacked(PK, t, g, n, k, W: tl.constexpr, WP: tl.constexpr):
    """The ``(G, 8)`` int64 indices of groups ``g`` of the stream at ``PK + t[T_IN]``."""
    b = tl.arange(0, WP).to(tl.int64)
    o = g[:, None] * W + b[None, :]
    mask = (b[None, :] < W) & (o < (n * W + 7) // 8)
    byte = tl.load(PK + tl.load(t + T_IN) + o, mask=mask, other=0).to(tl.int64)
    word = tl.sum(byte << (b[None, :] * 8), axis=1)
    return (word[:, None] >> (k[None, :] * W)) & ((1 << W) - 1)


@triton.jit
def _unpack_kernel(PK, IDX, TABLE, W: tl.constexpr, WP: tl.constexpr, G: tl.constexpr):
    t = TABLE + tl.program_id(0) * NF
    g = tl.load(t + T_G0) + tl.arange(0, G)
    n = tl.load(t + T_N)
    k = tl.arange(0, 8).to(tl.int64)
    e = g[:, None] * 8 + k[None, :]
    v = _unpacked(PK, t, g, n, k, W, WP)
    tl.store(IDX + tl.load(t + T_OUT) + e, v.to(tl.uint8), mask=e < n)


@triton.jit
def _round_to_bf16(x):
    """float32 -> bfloat16, round half to even (as ``Tensor.to``; the interpreter's own
    conversion truncates); NaN stays NaN."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _dequantize_kernel(PK, LEV, OUT, BAD, TABLE, W: tl.constexpr, WP: tl.constexpr,
                       G: tl.constexpr, BF16: tl.constexpr):  # fmt: skip
    t = TABLE + tl.program_id(0) * NF
    g = tl.load(t + T_G0) + tl.arange(0, G)
    n = tl.load(t + T_N)
    cols = tl.load(t + T_COLS)
    K = tl.load(t + T_K)
    k = tl.arange(0, 8).to(tl.int64)
    e = g[:, None] * 8 + k[None, :]
    mask = e < n
    if W > 0:  # noqa: SIM108 (constexpr branch)
        v = _unpacked(PK, t, g, n, k, W, WP)
    else:
        v = tl.zeros((G, 8), dtype=tl.int64)
    bad = tl.max(tl.max(tl.where(mask & (v >= K), 1, 0), axis=1), axis=0)
    tl.store(BAD + tl.load(t + T_PIDX), 1, mask=bad > 0)
    lev = tl.load(LEV + tl.load(t + T_LEV) + (e // cols) * K + tl.minimum(v, K - 1), mask=mask)
    if BF16:
        out = _round_to_bf16(lev.to(tl.float32))
    else:
        out = lev.to(tl.float32).to(OUT.dtype.element_ty)
    tl.store(OUT + tl.load(t + T_OUT) + e, out, mask=mask)


def _groups(device: torch.device) -> int:
    return INTERPRET_GROUPS if device.type == "cpu" else GROUPS


def _table(ins: list[Tensor], outs: list[Tensor], levels: list[Tensor] | None,
           numels: list[int], cols: list[int]) -> tuple[Tensor, int]:  # fmt: skip
    """``(table, tiles)`` of one call (module doc), cached on the tensors' addresses."""
    device = outs[0].device
    G = _groups(device)
    lev_key = None if levels is None else tuple((q.data_ptr(), tuple(q.shape)) for q in levels)
    key = (G, device, tuple((t.data_ptr(), t.numel()) for t in ins),
           tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in outs), lev_key)  # fmt: skip
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    rows = []
    for i, (src, dst, n) in enumerate(zip(ins, outs, numels, strict=True)):
        in_off = _offset(src, ins[0], "inputs", i)
        out_off = _offset(dst, outs[0], "outputs", i)
        lev_off, K = 0, 1
        if levels is not None:
            lev_off, K = _offset(levels[i], levels[0], "levels", i), levels[i].size(1)
        groups = (n + 7) // 8
        for g0 in range(0, groups, G):
            rows.append([in_off, out_off, lev_off, g0, n, max(cols[i], 1), K, i])
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, int(NF)).to(device)
    _CACHE[key] = (table, len(rows))
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table, len(rows)


def _meta(width: int, device: torch.device) -> dict:
    wp = 1 << max(0, (max(width, 1) - 1).bit_length())
    return dict(W=width, WP=wp, G=_groups(device))


def _check_device(t: Tensor) -> None:
    if t.device.type != "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        # the interpreter copies each tensor argument to the host on its own, which breaks
        # the relative addressing of the other tensors of a list
        raise RuntimeError("the triton backend cannot serve CUDA tensors under TRITON_INTERPRET=1")


def pack_(indices: list[Tensor], packed: list[Tensor], width: int) -> None:
    """Triton backend of ``parq_kernels::pack_``."""
    _check_device(indices[0])
    live = [(s, d) for s, d in zip(indices, packed, strict=True) if s.numel() > 0]
    if width == 0 or not live:
        return
    ins, outs = [s for s, _ in live], [d for _, d in live]
    table, tiles = _table(ins, outs, None, [s.numel() for s in ins], [1] * len(ins))
    _pack_kernel[(tiles,)](ins[0], outs[0], table, **_meta(width, ins[0].device))


def unpack_(packed: list[Tensor], indices: list[Tensor], width: int) -> None:
    """Triton backend of ``parq_kernels::unpack_``."""
    _check_device(indices[0])
    live = [(s, d) for s, d in zip(packed, indices, strict=True) if d.numel() > 0]
    if not live:
        return
    if width == 0:
        for _, d in live:
            d.zero_()
        return
    ins, outs = [s for s, _ in live], [d for _, d in live]
    table, tiles = _table(ins, outs, None, [d.numel() for d in outs], [1] * len(outs))
    _unpack_kernel[(tiles,)](ins[0], outs[0], table, **_meta(width, outs[0].device))


def dequantize_(packed: list[Tensor], levels: list[Tensor], out: list[Tensor], bad: Tensor,
                width: int) -> None:  # fmt: skip
    """Triton backend of ``parq_kernels::dequantize_``."""
    _check_device(out[0])
    live = [i for i, o in enumerate(out) if o.numel() > 0]
    if not live:
        return
    outs = [out[i] for i in live]
    lev = [levels[i] for i in live]
    ins = [packed[i] for i in live]
    if width == 0:  # empty streams: point every tile at a 1-byte stand-in (never read)
        ins = [torch.zeros(1, dtype=torch.uint8, device=outs[0].device)] * len(live)
    table, tiles = _table(ins, outs, lev, [o.numel() for o in outs], [o.size(1) for o in outs])
    flags = torch.zeros(len(live), dtype=torch.int32, device=bad.device)
    bf16 = outs[0].dtype == torch.bfloat16
    _dequantize_kernel[(tiles,)](ins[0], lev[0], outs[0], flags, table, BF16=bf16,
                                 **_meta(width, outs[0].device))  # fmt: skip
    bad[live] |= flags

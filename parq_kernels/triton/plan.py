"""Host-side launch plans: per-call tables of tiles and rows, built once and cached.

A plan describes one parameter set (the tensors' addresses and shapes) of a
``quant_prox_`` call. Every parameter row is cut into *tiles* of
``ROWS x BLOCK`` elements; tiles of the same ``(ROWS, BLOCK)`` form a *class*
and each class is one launch per phase, whatever the number of parameters:

* short rows (``n <= MAX_BLOCK``): ``BLOCK = next_pow2(n)`` (at least
  ``MIN_BLOCK``), ``ROWS = max(1, TILE // BLOCK)`` whole rows per tile;
* long rows (``n > MAX_BLOCK``, e.g. a whole tensor as one row): ``ROWS = 1``
  and the row is split into chunks of ``MAX_BLOCK`` columns, one tile each.

Tensors are addressed relative to the first tensor of their list (element
offsets, possibly negative), so a single pointer argument reaches all of them.
Each tile also records its element offset inside its parameter (``F_EOFF``):
the fused step (:mod:`.step`) adds it to per-parameter offsets of the gradient
and optimizer-state lists, which are not part of the plan.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

TILE = 4096  # elements per tile of short rows
# ... and with more than 4 levels: the fused step's 15-level PARQ projection spilled registers
# for sm_90 at 16 x 256 tiles (8 or 16 warps) and 8 B at 8 x 256; none at 1024-element tiles
# (benchmarks/results/triton_aot_sm90_models.md)
TILE_MANY_LEVELS = 1024
# Under the Triton interpreter (CPU tensors) each program costs milliseconds of Python,
# whatever its size: pack more rows per tile there.
INTERPRET_TILE = 65536
MIN_BLOCK = 16
MAX_BLOCK = 4096  # longer rows are split into chunks of this many columns

# tile table fields (int64), shared with the kernels
(F_POFF, F_LOFF, F_QOFF, F_ROW0, F_NROWS, F_NCOLS, F_STRIDE, F_PIDX, F_PSLOT, F_COL0, F_FIRST,
 F_EOFF) = range(12)  # fmt: skip
NF = 12
# row table fields (int64): first partial slot, number of partial slots (chunks), row length
R_PSLOT, R_COUNT, R_LEN = range(3)
NR = 3

_CACHE: OrderedDict[tuple, Plan] = OrderedDict()
_CACHE_SIZE = 16


@dataclass
class TileClass:
    rows: int  # ROWS of the tiles (constexpr)
    block: int  # BLOCK of the tiles (constexpr)
    table: Tensor  # (n_tiles, NF) int64 on the device
    n_tiles: int
    align: int  # every tile offset and row stride is a multiple of this (16-byte vectors)
    warps: int = 4  # num_warps of its launches: 8 for full tiles


@dataclass
class Plan:
    classes: list[TileClass]
    row_table: Tensor  # (R, NR) int64 on the device
    row_len: Tensor  # (R, 1) float64 on the device: n per row (optimal LSBQ)
    n_rows: int  # R, total rows over all parameters
    n_pslots: int  # partial-statistics slots
    max_chunks: int  # most partial slots of any row
    max_len: int  # longest row


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _offset(t: Tensor, base: Tensor, what: str, i: int) -> int:
    diff = t.data_ptr() - base.data_ptr()
    size = t.element_size()
    if diff % size:
        raise ValueError(f"{what}[{i}] is not aligned to its element size relative to {what}[0]")
    return diff // size


def full_tile(K: int | None = None) -> int:
    """Elements per tile of short rows on a GPU for level sets of ``K`` levels."""
    return TILE_MANY_LEVELS if K is not None and K > 4 else TILE


def tile_rows(device: torch.device, width: int, most: int, K: int | None = None) -> int:
    """Rows per tile of ``width`` columns, for at most ``most`` rows (a power of 2)."""
    interpreted = device.type == "cpu" and INTERPRET_TILE != TILE  # (recording: GPU sizes)
    tile = INTERPRET_TILE if interpreted else full_tile(K)
    return max(1, min(tile // width, _next_pow2(max(most, 1))))


def tile_shape(params: list[Tensor], K: int | None = None) -> list[tuple[int, int]]:
    """``(ROWS, BLOCK)`` of the tiles of each parameter (shared by all of its class)."""
    blocks = [MAX_BLOCK if n > MAX_BLOCK else max(MIN_BLOCK, _next_pow2(n)) for _, n in
              (p.shape for p in params)]  # fmt: skip
    most: dict[int, int] = {}
    for p, block in zip(params, blocks, strict=True):
        most[block] = max(most.get(block, 0), p.size(0) if p.size(1) <= MAX_BLOCK else 1)
    rows = {block: tile_rows(params[0].device, block, m, K) for block, m in most.items()}
    return [(rows[block], block) for block in blocks]


def _alignment(tiles: list[list[int]], params: list[Tensor], latents: list[Tensor]) -> int:
    """Elements per 16 bytes if every tile's offsets and row stride allow 16-byte vectors."""
    vec = max(1, 16 // params[0].element_size())
    if params[0].data_ptr() % 16 or latents[0].data_ptr() % 16:
        return 1
    ok = all(t[F_POFF] % vec == 0 and t[F_LOFF] % vec == 0 and t[F_STRIDE] % vec == 0
             and t[F_NCOLS] % vec == 0 and t[F_EOFF] % vec == 0 for t in tiles)  # fmt: skip
    return vec if ok else 1


def _build(params: list[Tensor], latents: list[Tensor], quants: list[Tensor], K: int) -> Plan:
    device = params[0].device
    shapes = tile_shape(params, K)
    by_class: dict[tuple[int, int], list[list[int]]] = {}
    row_pslot, row_count, row_len = [], [], []
    row_base = pslot = 0
    for i, (p, lat, Q) in enumerate(zip(params, latents, quants, strict=True)):
        rows, n = p.shape
        p_off = _offset(p, params[0], "params", i)
        l_off = _offset(lat, latents[0], "latents", i)
        q_off = _offset(Q, quants[0], "quants", i)
        ROWS, BLOCK = shapes[i]
        tiles = by_class.setdefault((ROWS, BLOCK), [])
        if n <= MAX_BLOCK:
            for r0 in range(0, rows, ROWS):
                nr = min(ROWS, rows - r0)
                tiles.append([p_off + r0 * n, l_off + r0 * n, q_off + r0 * K, row_base + r0, nr,
                              n, n, i, pslot, 0, 1, r0 * n])  # fmt: skip
                row_pslot.extend(range(pslot, pslot + nr))
                row_count.extend([1] * nr)
                pslot += nr
        else:
            chunks = (n + BLOCK - 1) // BLOCK
            for r in range(rows):
                row_pslot.append(pslot)
                row_count.append(chunks)
                for c in range(chunks):
                    c0 = c * BLOCK
                    tiles.append([p_off + r * n + c0, l_off + r * n + c0, q_off + r * K,
                                  row_base + r, 1, min(BLOCK, n - c0), n, i, pslot, c0,
                                  int(c0 == 0), r * n + c0])  # fmt: skip
                    pslot += 1
        row_len.extend([n] * rows)
        row_base += rows
    classes = [
        TileClass(
            rows,
            block,
            torch.tensor(t, dtype=torch.int64).to(device),
            len(t),
            _alignment(t, params, latents),
            8 if rows * block >= full_tile(K) else 4,
        )  # fmt: skip
        for (rows, block), t in sorted(by_class.items())
        if t
    ]
    row_table = torch.tensor(
        list(zip(row_pslot, row_count, row_len, strict=True)), dtype=torch.int64
    ).reshape(-1, NR)
    return Plan(
        classes=classes,
        row_table=row_table.to(device),
        row_len=torch.tensor(row_len, dtype=torch.float64).reshape(-1, 1).to(device),
        n_rows=row_base,
        n_pslots=pslot,
        max_chunks=max(row_count, default=0),
        max_len=max(row_len, default=0),
    )


def get_plan(params: list[Tensor], latents: list[Tensor], quants: list[Tensor], K: int) -> Plan:
    """The cached plan of this parameter set (keyed on addresses and shapes)."""
    key = (
        K,
        TILE,
        INTERPRET_TILE,
        MAX_BLOCK,
        params[0].device,
        params[0].dtype,
        tuple((p.data_ptr(), tuple(p.shape)) for p in params),
        tuple(t.data_ptr() for t in latents),
        tuple(Q.data_ptr() for Q in quants),
    )
    plan = _CACHE.get(key)
    if plan is None:
        plan = _build(params, latents, quants, K)
        _CACHE[key] = plan
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return plan

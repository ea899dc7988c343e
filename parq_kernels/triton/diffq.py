"""Triton backend of the DiffQ ops ``diffq_noise_``, ``diffq_noise_backward_`` and
``diffq_quantize_`` (SPEC.md §11; contract in :mod:`parq_kernels.diffq_ops`).

All tensors of a call (of one dtype) go through one launch per kernel: a tile table
(int64, cached on the tensors' addresses) holds, per tile of ``BLOCK`` elements, the
offsets of its tensor in each list (relative to the first tensor of the list), the
offset of the tensor's groups in the flat per-group vector, its first element, element
count, group size and index. The per-group values (noise scale ``D``, its derivative,
``2^b - 1``) are computed on the flat vector of all logits by the reference's own torch
functions (so they agree with it bitwise); the per-tensor min / max come from per-tile
partials reduced with one ``scatter_reduce``. The backward sums each group's products
with atomic adds (the order of the additions is not fixed: float32 rounding may differ
from the reference's in the last bits). The noise and quantize kernels are compiled
without FMA contraction (``enable_fp_fusion=False``), as the reference computes.
Rounding to the nearest level is half to even (``x + 1.5 * 2^23 - 1.5 * 2^23``, exact
for levels below ``2^22``), like ``torch.round``.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from parq_kernels import reference_diffq as ref
from parq_kernels.triton.pack import _check_device, _round_to_bf16
from parq_kernels.triton.plan import _offset

# tile table fields (int64); constexpr for the kernels (compiled Triton reads no plain globals)
T_W, T_OUT, T_E, T_D, T_START, T_N, T_G, T_IDX = (tl.constexpr(k) for k in range(8))
NF = tl.constexpr(8)
IDX_FIELD = 7  # T_IDX on the host
INF = tl.constexpr(float("inf"))
BLOCK = 1024
INTERPRET_BLOCK = 16384  # under the Triton interpreter a program costs milliseconds
ROUND = tl.constexpr(
    12582912.0
)  # 1.5 * 2**23: x + ROUND - ROUND rounds x to an integer, half to even

_CACHE: OrderedDict[tuple, tuple[Tensor, int]] = OrderedDict()
_CACHE_SIZE = 16


@triton.jit
def _store(OUT, off, x, mask, BF16: tl.constexpr):
    if BF16:
        tl.store(OUT + off, _round_to_bf16(x), mask=mask)
    else:
        tl.store(OUT + off, x.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _minmax_kernel(W, PART, TABLE, BLOCK: tl.constexpr):
    t = TABLE + tl.program_id(0) * NF
    j = tl.load(t + T_START) + tl.arange(0, BLOCK)
    mask = j < tl.load(t + T_N)
    w = tl.load(W + tl.load(t + T_W) + j, mask=mask).to(tl.float32)
    tl.store(PART + tl.program_id(0) * 2, tl.min(tl.where(mask, w, INF), axis=0))
    tl.store(PART + tl.program_id(0) * 2 + 1, tl.max(tl.where(mask, w, -INF), axis=0))


@triton.jit
def _noise_kernel(W, E, OUT, D, R, TABLE, BLOCK: tl.constexpr, BF16: tl.constexpr):
    t = TABLE + tl.program_id(0) * NF
    j = tl.load(t + T_START) + tl.arange(0, BLOCK)
    mask = j < tl.load(t + T_N)
    w = tl.load(W + tl.load(t + T_W) + j, mask=mask).to(tl.float32)
    e = tl.load(E + tl.load(t + T_E) + j, mask=mask)
    d = tl.load(D + tl.load(t + T_D) + j // tl.load(t + T_G), mask=mask)
    r = tl.load(R + tl.load(t + T_IDX))
    _store(OUT, tl.load(t + T_OUT) + j, w + r * d * e, mask, BF16)


@triton.jit
def _noise_backward_kernel(GO, E, R, ACC, TABLE, BLOCK: tl.constexpr):
    t = TABLE + tl.program_id(0) * NF
    j = tl.load(t + T_START) + tl.arange(0, BLOCK)
    mask = j < tl.load(t + T_N)
    g = tl.load(GO + tl.load(t + T_W) + j, mask=mask).to(tl.float32)
    e = tl.load(E + tl.load(t + T_E) + j, mask=mask)
    r = tl.load(R + tl.load(t + T_IDX))
    tl.atomic_add(ACC + tl.load(t + T_D) + j // tl.load(t + T_G), g * r * e, mask=mask)


@triton.jit
def _quantize_kernel(W, OUT, LV, S, MM, TABLE, BLOCK: tl.constexpr, BF16: tl.constexpr,
                     LEVELS: tl.constexpr):  # fmt: skip
    t = TABLE + tl.program_id(0) * NF
    j = tl.load(t + T_START) + tl.arange(0, BLOCK)
    mask = j < tl.load(t + T_N)
    w = tl.load(W + tl.load(t + T_W) + j, mask=mask).to(tl.float32)
    s = tl.load(S + tl.load(t + T_D) + j // tl.load(t + T_G), mask=mask, other=1.0)
    i = tl.load(t + T_IDX)
    mn = tl.load(MM + 2 * i)
    mx = tl.load(MM + 2 * i + 1)
    same = mx == mn
    span = tl.where(same, 1.0, mx - mn)
    level = (w - mn) / span * s
    level = (level + ROUND) - ROUND
    level = tl.where(same, 0.0, level)
    q = tl.where(same, w, level / s * span + mn)
    _store(OUT, tl.load(t + T_OUT) + j, q, mask, BF16)
    if LEVELS:
        tl.store(LV + tl.load(t + T_E) + j, level.to(tl.int16), mask=mask)


def _block(device: torch.device) -> int:
    return INTERPRET_BLOCK if device.type == "cpu" else BLOCK


def _table(lists: list[list[Tensor]], group_sizes: list[int], groups: list[int],
           numels: list[int]) -> tuple[Tensor, int]:  # fmt: skip
    """``(table, tiles)`` of one call (module doc); ``lists``: weights (or gradients), out,
    and noise (or levels)."""
    device = lists[0][0].device
    block = _block(device)
    key = (block, device, tuple(group_sizes),
           tuple(tuple((t.data_ptr(), t.numel()) for t in ts) for ts in lists))  # fmt: skip
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    rows, d_off = [], 0
    for i, n in enumerate(numels):
        offs = [_offset(ts[i], ts[0], name, i) for ts, name in zip(lists, ("in", "out", "aux"),
                                                                  strict=True)]  # fmt: skip
        for start in range(0, n, block):
            rows.append([*offs, d_off, start, n, group_sizes[i], i])
        d_off += groups[i]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 8).to(device)
    _CACHE[key] = (table, len(rows))
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return table, len(rows)


def _min_max(weights: list[Tensor], table: Tensor, tiles: int) -> Tensor:
    """``(n, 2)`` float32 min / max of each tensor (0, 0 for an empty one)."""
    device = weights[0].device
    part = torch.empty(tiles, 2, dtype=torch.float32, device=device)
    mm = torch.zeros(len(weights), 2, dtype=torch.float32, device=device)
    if tiles:
        _minmax_kernel[(tiles,)](weights[0], part, table, BLOCK=_block(device))
        idx = table[:, IDX_FIELD, None].expand(tiles, 2)
        mm[:, 0], mm[:, 1] = float("inf"), float("-inf")
        mm[:, 0].scatter_reduce_(0, idx[:, 0], part[:, 0], "amin")
        mm[:, 1].scatter_reduce_(0, idx[:, 1], part[:, 1], "amax")
        empty = torch.tensor([w.numel() == 0 for w in weights], device=device)
        mm[empty] = 0.0
    return mm


def _same_dtype(op: str, tensors: list[Tensor]) -> None:
    if len({t.dtype for t in tensors}) > 1:
        raise ValueError(f"{op}: the triton backend needs all weights of a call in one dtype")


def _flat(logits: list[Tensor]) -> Tensor:
    return torch.cat([lg.reshape(-1) for lg in logits])


def diffq_noise_(weights, logits, noise, out, ranges, group_sizes, min_bits, max_bits, param):
    """Triton backend of ``parq_kernels::diffq_noise_``."""
    _check_device(weights[0])
    _same_dtype("diffq_noise_", weights)
    table, tiles = _table([weights, out, noise], list(group_sizes),
                          [lg.numel() for lg in logits], [w.numel() for w in weights])  # fmt: skip
    mm = _min_max(weights, table, tiles)
    ranges.copy_(mm[:, 1] - mm[:, 0])
    if tiles:
        D = ref.noise_scale_from_logits(_flat(logits), min_bits, max_bits, param).contiguous()
        _noise_kernel[(tiles,)](weights[0], noise[0], out[0], D, ranges, table,
                                BLOCK=_block(weights[0].device),
                                BF16=out[0].dtype == torch.bfloat16,
                                enable_fp_fusion=False)  # fmt: skip


def diffq_noise_backward_(grad_out, logits, noise, ranges, grad_logits, group_sizes, min_bits,
                          max_bits, param):  # fmt: skip
    """Triton backend of ``parq_kernels::diffq_noise_backward_``."""
    _check_device(grad_out[0])
    _same_dtype("diffq_noise_backward_", grad_out)
    table, tiles = _table([grad_out, grad_out, noise], list(group_sizes),
                          [lg.numel() for lg in logits], [g.numel() for g in grad_out])  # fmt: skip
    flat = _flat(logits)
    acc = torch.zeros_like(flat)
    if tiles:
        _noise_backward_kernel[(tiles,)](grad_out[0], noise[0], ranges, acc, table,
                                         BLOCK=_block(flat.device))  # fmt: skip
    leaf = flat.detach().requires_grad_(True)
    with torch.enable_grad():
        D = ref.noise_scale_from_logits(leaf, min_bits, max_bits, param)
        (grad,) = torch.autograd.grad(D, leaf, acc)
    for gl, part in zip(grad_logits, grad.split([lg.numel() for lg in logits]), strict=True):
        gl.copy_(part.view(gl.shape))


def diffq_quantize_(weights, logits, out, levels, minmax, group_sizes, min_bits, max_bits, param,
                    extra_bits):  # fmt: skip
    """Triton backend of ``parq_kernels::diffq_quantize_``."""
    _check_device(weights[0])
    _same_dtype("diffq_quantize_", weights)
    with_levels = bool(levels)
    aux = levels if with_levels else weights  # the third list: levels (or unused)
    table, tiles = _table([weights, out, aux], list(group_sizes),
                          [lg.numel() for lg in logits], [w.numel() for w in weights])  # fmt: skip
    minmax.copy_(_min_max(weights, table, tiles))
    if tiles:
        b = ref.true_bits(_flat(logits), min_bits, max_bits, param, extra_bits)
        S = (torch.exp2(b) - 1).contiguous()
        _quantize_kernel[(tiles,)](weights[0], out[0], aux[0], S, minmax, table,
                                   BLOCK=_block(weights[0].device),
                                   BF16=out[0].dtype == torch.bfloat16,
                                   LEVELS=with_levels, enable_fp_fusion=False)  # fmt: skip

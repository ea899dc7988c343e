"""The op contracts of packed low-bit export (SPEC.md §10): pack, unpack, dequantize.

Three multi-tensor, in-place ops with the backend table of ``quant_prox_``
(reference, cpu, triton; see :mod:`parq_kernels.backends`). Every tensor of a
call uses the same index width ``width`` (``w`` in 0..8 bits per element).

The bit stream (SPEC.md §10): element ``i`` of a tensor occupies bits
``[i*w, (i+1)*w)`` of its stream, and bit ``k`` of the stream is bit ``k % 8`` of
byte ``k // 8``. A tensor of ``n`` elements packs into ``packed_nbytes(n, w) =
ceil(n*w/8)`` bytes; the unused high bits of the last byte are zero.

``pack_(indices, packed, width, backend)``:

* ``indices[i]``: uint8, contiguous, any shape, ``n_i`` elements (read). Only the
  low ``width`` bits of each value are stored (callers pass values ``< 2**width``).
* ``packed[i]``: uint8, contiguous, ``packed_nbytes(n_i, width)`` elements (written).

``unpack_(packed, indices, width, backend)``: the inverse; ``indices[i]`` (written)
gets the ``n_i = indices[i].numel()`` values of ``packed[i]`` (read).

``dequantize_(packed, levels, out, bad, width, backend)``: ``out[i][r, c] =
levels[i][r, idx]`` with ``idx`` the element ``r * cols + c`` of ``packed[i]``,
cast to ``out``'s dtype:

* ``levels[i]``: ``(rows, K)`` float32 / float16 / bfloat16, contiguous (read); one
  level set per row (per-tensor levels: ``rows == 1`` and ``cols == n``);
* ``out[i]``: ``(rows, cols)`` float32 / float16 / bfloat16, contiguous (written);
* ``bad``: int32 ``(len(out),)``; entry ``i`` is set to 1 if an index of
  ``packed[i]`` is ``>= K`` (a corrupted stream); such an element gets
  ``levels[i][r, K - 1]``, so no read leaves the level set (never cleared by the op).

One call serves one device; all ``levels`` share one dtype, all ``out`` another.
The level is converted exactly as ``Tensor.to`` does (through float32), so every
backend's output is bitwise the reference's.
"""

from __future__ import annotations

import torch
from torch import Tensor

import parq_kernels.ops  # noqa: F401  (defines the "parq_kernels" namespace first)

PACK_SCHEMA = 'pack_(Tensor[] indices, Tensor(a!)[] packed, int width, str backend="") -> ()'
UNPACK_SCHEMA = 'unpack_(Tensor[] packed, Tensor(a!)[] indices, int width, str backend="") -> ()'
DEQUANTIZE_SCHEMA = (
    "dequantize_(Tensor[] packed, Tensor[] levels, Tensor(a!)[] out, Tensor(b!) bad, "
    'int width, str backend="") -> ()'
)
MAX_WIDTH = 8

# a fragment of the "parq_kernels" namespace that parq_kernels.ops defines
_lib = torch.library.Library("parq_kernels", "FRAGMENT")
_lib.define(PACK_SCHEMA)
_lib.define(UNPACK_SCHEMA)
_lib.define(DEQUANTIZE_SCHEMA)


def packed_nbytes(numel: int, width: int) -> int:
    """Bytes of the stream of ``numel`` elements of ``width`` bits: ``ceil(numel*width/8)``."""
    return (numel * width + 7) // 8


def index_width(K: int) -> int:
    """``w = ceil(log2 K)`` bits per index for ``K`` levels (0 for a single level)."""
    if K < 1:
        raise ValueError(f"a level set needs K >= 1 levels, got {K}")
    return (K - 1).bit_length()


def _impl(tensors: list[Tensor], backend: str, op: str):
    from parq_kernels import backends

    name = backends.resolve(tensors[0].device, backend or None, op=op)
    return backends.get_impl(name, op)


def _check_stream(op: str, i: int, data: Tensor, numel: int, width: int, device) -> None:
    if data.dtype != torch.uint8 or data.dim() != 1 or not data.is_contiguous():
        raise ValueError(f"{op}: packed[{i}] must be a contiguous 1-D uint8 tensor, got "
                         f"{data.dtype} of shape {tuple(data.shape)}")  # fmt: skip
    if data.numel() != packed_nbytes(numel, width):
        raise ValueError(f"{op}: packed[{i}] holds {data.numel()} bytes, {numel} elements of "
                         f"{width} bits need {packed_nbytes(numel, width)}")  # fmt: skip
    if data.device != device:
        raise ValueError(f"{op}: packed[{i}] is on {data.device}, expected {device}")


def check_args(op: str, width: int, packed: list[Tensor], indices: list[Tensor] | None = None,
               levels: list[Tensor] | None = None, out: list[Tensor] | None = None,
               bad: Tensor | None = None) -> None:  # fmt: skip
    """Raise ``ValueError`` naming the tensor for arguments outside the contract (module
    doc); shared by every backend (the C++ entry points check again)."""
    if not 0 <= width <= MAX_WIDTH:
        raise ValueError(f"{op}: width must be in 0..{MAX_WIDTH}, got {width}")
    if indices is not None:
        if len(indices) != len(packed):
            raise ValueError(f"{op}: {len(indices)} index tensors but {len(packed)} streams")
        device = indices[0].device if indices else None
        for i, (idx, data) in enumerate(zip(indices, packed, strict=True)):
            if idx.dtype != torch.uint8 or not idx.is_contiguous() or idx.device != device:
                raise ValueError(f"{op}: indices[{i}] must be a contiguous uint8 tensor on "
                                 f"{device}, got {idx.dtype} on {idx.device}")  # fmt: skip
            _check_stream(op, i, data, idx.numel(), width, device)
        return
    assert levels is not None and out is not None and bad is not None
    if not (len(levels) == len(out) == len(packed)):
        raise ValueError(f"{op}: packed, levels and out must have the same length, got "
                         f"{len(packed)}, {len(levels)}, {len(out)}")  # fmt: skip
    if not out:
        return
    device, ldt, odt = out[0].device, levels[0].dtype, out[0].dtype
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if ldt not in floats or odt not in floats:
        raise ValueError(f"{op}: levels and out must be float32, float16 or bfloat16, got "
                         f"{ldt} and {odt}")  # fmt: skip
    if bad.dtype != torch.int32 or bad.shape != (len(out),) or bad.device != device:
        raise ValueError(f"{op}: bad must be int32 of shape ({len(out)},) on {device}")
    for i, (data, Q, o) in enumerate(zip(packed, levels, out, strict=True)):
        if o.dim() != 2 or o.dtype != odt or not o.is_contiguous() or o.device != device:
            raise ValueError(f"{op}: out[{i}] must be a contiguous 2-D {odt} tensor on {device}, "
                             f"got {o.dtype} of shape {tuple(o.shape)} on {o.device}")  # fmt: skip
        rows = o.size(0)
        if (Q.dim() != 2 or Q.size(0) != rows or Q.dtype != ldt or not Q.is_contiguous()
                or Q.device != device or (o.numel() > 0 and Q.size(1) < 1)):  # fmt: skip
            raise ValueError(f"{op}: levels[{i}] must be a contiguous {ldt} tensor of shape "
                             f"({rows}, K >= 1) on {device}, got {Q.dtype} of shape "
                             f"{tuple(Q.shape)} on {Q.device}")  # fmt: skip
        _check_stream(op, i, data, o.numel(), width, device)


def _pack_impl(indices: list[Tensor], packed: list[Tensor], width: int, backend: str = "") -> None:
    check_args("pack_", width, packed, indices=indices)
    if indices:
        _impl(indices, backend, "pack_")(indices, packed, width)


def _unpack_impl(packed: list[Tensor], indices: list[Tensor], width: int,
                 backend: str = "") -> None:  # fmt: skip
    check_args("unpack_", width, packed, indices=indices)
    if indices:
        _impl(indices, backend, "unpack_")(packed, indices, width)


def _dequantize_impl(packed: list[Tensor], levels: list[Tensor], out: list[Tensor], bad: Tensor,
                     width: int, backend: str = "") -> None:  # fmt: skip
    check_args("dequantize_", width, packed, levels=levels, out=out, bad=bad)
    if out:
        _impl(out, backend, "dequantize_")(packed, levels, out, bad, width)


_lib.impl("pack_", _pack_impl, "CompositeExplicitAutograd")
_lib.impl("unpack_", _unpack_impl, "CompositeExplicitAutograd")
_lib.impl("dequantize_", _dequantize_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("parq_kernels::pack_")
def _pack_fake(indices, packed, width, backend=""):
    return None


@torch.library.register_fake("parq_kernels::unpack_")
def _unpack_fake(packed, indices, width, backend=""):
    return None


@torch.library.register_fake("parq_kernels::dequantize_")
def _dequantize_fake(packed, levels, out, bad, width, backend=""):
    return None


def pack_(indices: list[Tensor], packed: list[Tensor], width: int, backend: str = "") -> None:
    """Pack ``indices[i]`` into ``packed[i]`` (module doc)."""
    torch.ops.parq_kernels.pack_(indices, packed, int(width), backend)


def unpack_(packed: list[Tensor], indices: list[Tensor], width: int, backend: str = "") -> None:
    """Unpack ``packed[i]`` into ``indices[i]`` (module doc)."""
    torch.ops.parq_kernels.unpack_(packed, indices, int(width), backend)


def dequantize_(packed: list[Tensor], levels: list[Tensor], out: list[Tensor], bad: Tensor,
                width: int, backend: str = "") -> None:  # fmt: skip
    """``out[i] = levels[i][row, unpacked index]`` (module doc)."""
    torch.ops.parq_kernels.dequantize_(packed, levels, out, bad, int(width), backend)


def pack(indices: list[Tensor], width: int, backend: str = "") -> list[Tensor]:
    """New packed streams (uint8, 1-D) of ``indices``."""
    packed = [torch.empty(packed_nbytes(t.numel(), width), dtype=torch.uint8, device=t.device)
              for t in indices]  # fmt: skip
    pack_([t.contiguous() for t in indices], packed, width, backend)
    return packed


def unpack(packed: list[Tensor], numels: list[int], width: int, backend: str = "") -> list[Tensor]:
    """The ``numels[i]`` uint8 indices (1-D) held by ``packed[i]``."""
    indices = [torch.empty(n, dtype=torch.uint8, device=p.device) for p, n in
               zip(packed, numels, strict=True)]  # fmt: skip
    unpack_(packed, indices, width, backend)
    return indices


def dequantize(
    packed: list[Tensor],
    levels: list[Tensor],
    shapes: list[tuple[int, int]],
    width: int,
    dtype: torch.dtype = torch.float32,
    backend: str = "",
) -> tuple[list[Tensor], Tensor]:
    """``(out, bad)``: new ``(rows, cols)`` tensors of ``dtype`` (``shapes[i]``) and the
    int32 flags of streams holding an index ``>= K`` (module doc)."""
    device = levels[0].device if levels else torch.device("cpu")
    out = [torch.empty(shape, dtype=dtype, device=device) for shape in shapes]
    bad = torch.zeros(len(out), dtype=torch.int32, device=device)
    dequantize_(packed, [q.contiguous() for q in levels], out, bad, width, backend)
    return out, bad


__all__ = ["pack_", "unpack_", "dequantize_", "pack", "unpack", "dequantize", "packed_nbytes",
           "index_width", "check_args", "MAX_WIDTH", "PACK_SCHEMA", "UNPACK_SCHEMA",
           "DEQUANTIZE_SCHEMA"]  # fmt: skip

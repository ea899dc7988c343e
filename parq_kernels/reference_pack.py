"""Pure-PyTorch ground truth of the packed-export ops (SPEC.md §10; contract in
:mod:`parq_kernels.pack_ops`).

Written straight from the definition of the stream, one tensor at a time: element
``i`` holds bits ``[i*w, (i+1)*w)``; bit ``k`` of the stream is bit ``k % 8`` of
byte ``k // 8``. Each index is spread into its ``w`` bits (low bit first), the bits
of all elements are laid end to end, and every run of 8 bits becomes a byte
(low bit first). Never change this file to match a kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _bit_weights(count: int, device: torch.device) -> Tensor:
    """``[1, 2, 4, ...]`` (int32, ``count`` entries)."""
    return torch.ones(count, dtype=torch.int32, device=device) << torch.arange(
        count, dtype=torch.int32, device=device
    )


def stream_bits(idx: Tensor, width: int) -> Tensor:
    """The bit stream (uint8 0/1, ``numel * width`` entries) of the indices ``idx``."""
    v = idx.reshape(-1).to(torch.int32)
    shifts = torch.arange(width, dtype=torch.int32, device=idx.device)
    return ((v[:, None] >> shifts) & 1).to(torch.uint8).reshape(-1)  # element i, bit j: i*w + j


def bits_to_bytes(bits: Tensor) -> Tensor:
    """Bytes (uint8) holding ``bits`` low bit first; the last byte is padded with zeros."""
    nbytes = (bits.numel() + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.int32, device=bits.device)
    padded[: bits.numel()] = bits.to(torch.int32)
    return (padded.view(nbytes, 8) * _bit_weights(8, bits.device)).sum(dim=1).to(torch.uint8)


def bytes_to_bits(data: Tensor, count: int) -> Tensor:
    """The first ``count`` bits (uint8 0/1) of the bytes ``data``, low bit first."""
    shifts = torch.arange(8, dtype=torch.int32, device=data.device)
    bits = (data.reshape(-1).to(torch.int32)[:, None] >> shifts) & 1
    return bits.reshape(-1)[:count].to(torch.uint8)


def unpack_indices(data: Tensor, numel: int, width: int) -> Tensor:
    """The ``numel`` indices (int64, 1-D) of the stream ``data``."""
    if width == 0:
        return torch.zeros(numel, dtype=torch.int64, device=data.device)
    bits = bytes_to_bits(data, numel * width).to(torch.int32).view(numel, width)
    return (bits * _bit_weights(width, data.device)).sum(dim=1).to(torch.int64)


def pack_(indices: list[Tensor], packed: list[Tensor], width: int) -> None:
    """Reference backend of ``parq_kernels::pack_``."""
    for idx, out in zip(indices, packed, strict=True):
        if width > 0:
            out.copy_(bits_to_bytes(stream_bits(idx, width)))


def unpack_(packed: list[Tensor], indices: list[Tensor], width: int) -> None:
    """Reference backend of ``parq_kernels::unpack_``."""
    for data, out in zip(packed, indices, strict=True):
        out.copy_(unpack_indices(data, out.numel(), width).view(out.shape))


def dequantize_(packed: list[Tensor], levels: list[Tensor], out: list[Tensor], bad: Tensor,
                width: int) -> None:  # fmt: skip
    """Reference backend of ``parq_kernels::dequantize_``."""
    for i, (data, Q, o) in enumerate(zip(packed, levels, out, strict=True)):
        rows, cols = o.shape
        if rows * cols == 0:
            continue
        K = Q.size(1)
        idx = unpack_indices(data, rows * cols, width).view(rows, cols)
        bad[i] |= (idx >= K).any().to(bad.dtype)
        o.copy_(Q.gather(1, idx.clamp_max(K - 1)))  # Tensor.copy_ converts like Tensor.to

"""The public PARQ release's ``parq.utils`` names, kept for scripts that import them.

Only these public helpers live here: ``HAS_DTENSOR``, :func:`is_dtensor` and
:func:`channel_bucketize`. The package's own code keeps its helpers next to the
concept they serve.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor

    HAS_DTENSOR = True
except ImportError:  # a torch built without distributed support
    DTensor = None
    HAS_DTENSOR = False


def is_dtensor(x: object) -> bool:
    """True iff ``x`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor parallel)."""
    return HAS_DTENSOR and isinstance(x, DTensor)


def channel_bucketize(input: Tensor, boundaries: Tensor, right: bool = False) -> Tensor:
    """Row-wise :func:`torch.bucketize`: row ``i`` of ``input`` against row ``i`` of
    ``boundaries``.

    Args:
        input: ``(rows, n)`` values (any leading shape whose first dimension
            matches ``boundaries``; trailing dimensions are flattened per row).
        boundaries: ``(rows, K)``, each row sorted ascending.
        right: as in :func:`torch.bucketize`: ``False`` gives
            ``#{j : boundaries[i, j] < x}``, ``True`` gives ``#{j : boundaries[i, j] <= x}``.

    Returns:
        int64 indices in ``0..K``, shaped like ``input``.
    """
    if boundaries.dim() != 2:
        raise ValueError(
            f"channel_bucketize needs 2-D boundaries (rows, K), got shape "
            f"{tuple(boundaries.shape)}; use torch.bucketize for 1-D boundaries"
        )
    rows = boundaries.size(0)
    if input.dim() == 0 or input.size(0) != rows:
        raise ValueError(
            f"channel_bucketize: input's first dimension must equal the {rows} rows of "
            f"boundaries, got input shape {tuple(input.shape)}"
        )
    values = input.reshape(rows, -1)
    if values.dtype != boundaries.dtype:  # searchsorted needs one dtype
        dtype = torch.promote_types(values.dtype, boundaries.dtype)
        values, boundaries = values.to(dtype), boundaries.to(dtype)
    index = torch.searchsorted(boundaries.contiguous(), values.contiguous(), right=right)
    return index.reshape(input.shape)


__all__ = ["HAS_DTENSOR", "is_dtensor", "channel_bucketize"]

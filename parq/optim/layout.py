"""How a parameter is cut into quantization groups (SPEC.md §2), and group checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from parq.quant.quantizer import MAX_BITS, Quantizer, as_bits

UNQUANTIZED_BITS = 16


@dataclass(frozen=True)
class RowLayout:
    """A parameter seen as ``(rows, cols)``: each row is one quantization group.

    ``grouped`` is true for per-channel / per-block groups (``Q`` has shape
    ``(rows, K)``, the quantizer gets ``dim=-1``); false for one per-tensor group
    (``rows == 1``, ``Q`` has shape ``(K,)``, ``dim=None``).
    """

    rows: int
    cols: int
    grouped: bool
    block_size: int | None = None

    @property
    def dim(self) -> int | None:
        return -1 if self.grouped else None


def row_layout(p: Tensor, block_size: int | None, per_channel: bool, where: str = "") -> RowLayout:
    """SPEC.md §2 for parameter ``p``; ``where`` names it in errors."""
    shape = tuple(p.shape)
    if block_size is not None:
        if p.dim() > 2 or p.dim() == 0 or shape[-1] % block_size != 0:
            raise ValueError(
                f"{where}quant_block_size={block_size} needs a 1-D or 2-D parameter whose "
                f"last dimension it divides, got shape {shape}"
            )
        rows, cols = p.numel() // block_size, block_size
        if per_channel:
            return RowLayout(rows, cols, True, block_size)
        return RowLayout(1, p.numel(), False, block_size)
    if per_channel and p.dim() > 1:
        return RowLayout(shape[0], math.prod(shape[1:]), True)
    return RowLayout(1, p.numel(), False)


def group_bits(group: dict, index: int) -> int | None:
    """The group's ``quant_bits`` if it is quantized, else None; validates it.

    Integer-like values (``numpy.int64``, a 0-d integer tensor) are accepted and
    stored back into the group as a Python int, so every later reader sees an int.
    """
    b = group.get("quant_bits")
    if b is None:
        return None
    if type(b) is not int:
        try:
            b = as_bits(b)
        except TypeError as exc:
            raise TypeError(f"param_groups[{index}]: {exc}") from None
        group["quant_bits"] = b
    if b >= UNQUANTIZED_BITS:
        return None
    if not 0 <= b <= MAX_BITS:
        raise ValueError(
            f"param_groups[{index}]: quant_bits must be in 0..{MAX_BITS} "
            f"(or >= {UNQUANTIZED_BITS} to leave the group unquantized), got {b}"
        )
    return b


def check_quantized_group(
    group: dict, index: int, bits: int, quantizer: Quantizer, per_channel: bool
) -> None:
    """Raise a clear error (naming the group and parameter) for bad input."""
    try:
        quantizer.check_bits(bits)
    except (ValueError, NotImplementedError) as exc:
        raise type(exc)(f"param_groups[{index}] (quant_bits={bits}): {exc}") from None
    block_size = group.get("quant_block_size")
    if block_size is not None:
        given = block_size
        try:  # integer-like (numpy, 0-d tensor) is stored back as an int
            block_size = as_bits(block_size, "quant_block_size")
        except TypeError:
            block_size = 0
        if block_size <= 0:
            raise ValueError(
                f"param_groups[{index}]: quant_block_size must be a positive int, got {given!r}"
            )
        group["quant_block_size"] = block_size
    first: dict[int, int] = {}  # id(tensor) -> its first index in the group
    for j, p in enumerate(group["params"]):
        where = f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}): "
        if first.setdefault(id(p), j) != j:  # one latent per tensor: a tie listed twice
            raise ValueError(
                f"{where}the same tensor as params[{first[id(p)]}] (a tied weight listed "
                "twice?): list each tensor once in a quantized group, e.g. collect them from "
                "model.named_parameters(), which lists a tied weight once"
            )
        if not p.is_floating_point() or p.is_complex():
            raise TypeError(
                f"{where}quantized parameters must be real floating point, got {p.dtype}"
            )
        row_layout(p, block_size, per_channel, where)

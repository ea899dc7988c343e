"""The quantized state of the DiffQ-compatible quantizers: bit-packing of the integer
levels with the packed-export ops of SPEC.md §10, and writing entries back into a model
(``restore_quantized_state``, which picks the quantizer class, is in :mod:`.restore`: this
module is below the quantizers, which import it).

An entry (one quantized parameter) holds ``shape``, ``dtype`` (a string), ``group_size``
(``G``, the numel when the whole tensor is one group), ``bits`` (uint8, one per group:
1..15) and either ``min`` / ``max`` (float32: ``w = level / (2^b - 1) * (max - min) +
min``) or ``step`` (LSQ: ``w = (level - 2^(b-1)) * step``). Its ``levels`` are int16
``(numel,)`` (unpacked) or, packed, a dict ``{b: [low, high]}``: the levels of the
elements whose group has ``b`` bits, in element order, as a stream of their low
``min(b, 8)`` bits and (``b > 8``) one of their ``b - 8`` high bits (the pack op holds up
to 8 bits per element). One pack call per stream width serves the whole model.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from parq_kernels.pack_ops import pack, unpack
from parq_kernels.reference_diffq import expand_groups


def minmax_entry(param: Tensor, group_size: int, bits: Tensor, mn: Tensor, mx: Tensor,
                 levels: Tensor) -> dict:  # fmt: skip
    """An entry of the ``min`` / ``max`` form (module doc), its tensors on the CPU."""
    return {"shape": list(param.shape), "dtype": str(param.dtype), "group_size": group_size,
            "bits": bits.to(torch.uint8).cpu(), "min": mn.clone().cpu(),
            "max": mx.clone().cpu(), "levels": levels.reshape(-1).cpu()}  # fmt: skip


def element_bits(entry: dict) -> Tensor:
    """Bits of each element (int32, ``(numel,)``)."""
    numel = int(torch.Size(entry["shape"]).numel())
    return expand_groups(entry["bits"].to(torch.int32), numel, int(entry["group_size"]))


def _parts(b: int) -> list[tuple[int, int]]:
    """``(shift, width)`` of the streams of a ``b``-bit level."""
    return [(0, min(b, 8))] + ([(8, b - 8)] if b > 8 else [])


def pack_levels(entries: list[dict]) -> None:
    """Replace each entry's int16 ``levels`` by its packed streams (in place)."""
    by_width: dict[int, list[tuple[dict, int, int, Tensor]]] = defaultdict(list)
    for entry in entries:
        levels = entry["levels"].reshape(-1).to(torch.int32)
        eb = element_bits(entry)
        entry["levels"] = {}
        for b in torch.unique(eb).tolist():
            vals = levels[eb == b]
            entry["levels"][b] = [None] * len(_parts(b))
            for k, (shift, width) in enumerate(_parts(b)):
                part = ((vals >> shift) & ((1 << width) - 1)).to(torch.uint8)
                by_width[width].append((entry, b, k, part))
    for width, items in by_width.items():
        streams = pack([part for *_, part in items], width)
        for (entry, b, k, _), data in zip(items, streams, strict=True):
            entry["levels"][b][k] = data


def unpack_levels(entries: list[dict]) -> list[Tensor]:
    """The int32 levels ``(numel,)`` of each entry, packed or not."""
    out: list[Tensor | None] = [None] * len(entries)
    by_width: dict[int, list[tuple[int, Tensor, int, int, Tensor]]] = defaultdict(list)
    masks = []
    for i, entry in enumerate(entries):
        levels = entry["levels"]
        if isinstance(levels, Tensor):
            out[i] = levels.reshape(-1).to(torch.int32)
            masks.append(None)
            continue
        eb = element_bits(entry)
        out[i] = torch.zeros(eb.numel(), dtype=torch.int32)
        masks.append(eb)
        for b, streams in levels.items():
            b = int(b)
            mask = eb == b
            count = int(mask.sum())
            if len(streams) != len(_parts(b)):
                raise ValueError(f"state: entry {i} holds {len(streams)} streams for {b} bits")
            for (shift, width), data in zip(_parts(b), streams, strict=True):
                by_width[width].append((i, mask, shift, count, data))
    for width, items in by_width.items():
        values = unpack([it[4].contiguous() for it in items], [it[3] for it in items], width)
        for (i, mask, shift, _, _), v in zip(items, values, strict=True):
            out[i][mask] |= v.to(torch.int32) << shift
    return out  # type: ignore[return-value]


def dequantize_entry(entry: dict, levels: Tensor) -> Tensor:
    """The float32 weights ``(numel,)`` of an entry (module doc)."""
    eb = element_bits(entry).to(torch.float32)
    if "step" in entry:
        offset = torch.exp2(eb - 1)
        return (levels.to(torch.float32) - offset) * entry["step"].float()
    mn, mx = entry["min"].float(), entry["max"].float()
    if bool(mx == mn):
        return torch.full(levels.shape, float(mn))
    return levels.to(torch.float32) / (torch.exp2(eb) - 1) * (mx - mn) + mn


def restore_entries(qparams: list, entries: list[dict]) -> None:
    """Write each entry's weights into its parameter (shapes checked first)."""
    for qp, entry in zip(qparams, entries, strict=True):
        if tuple(entry["shape"]) != tuple(qp.param.shape):
            raise ValueError(f"state: {qp.name} has shape {tuple(entry['shape'])}, the model "
                             f"{tuple(qp.param.shape)}")  # fmt: skip
    for qp, entry, levels in zip(qparams, entries, unpack_levels(entries), strict=True):
        w = dequantize_entry(entry, levels).view(qp.param.shape)
        qp.param.data.copy_(w.to(qp.param.device))

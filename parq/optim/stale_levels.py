"""Levels that no longer fit their group: a level update at the next step (issue 22, item 6).

The levels ``state[p]["quants"]`` are computed at level updates, for the group's bits,
layout (``quant_per_channel``, ``quant_block_size``) and quantizer of that moment. A user
may change any of these between level updates, or resume a checkpoint saved with other
ones; projecting onto the stored levels would then be wrong (or fail on their shape).
So a group whose setup differs from the one its levels were computed for takes a level
update at its next step, on every path; the other groups keep the schedule.

The setup of each group is remembered at its steps (a small dict on the optimizer, cleared
when a checkpoint is loaded); a group without a record (the first step after the
optimizer was built, copied or loaded) has its stored levels' shapes checked instead.
"""

from __future__ import annotations

from torch import Tensor

from parq.optim import shard_plan
from parq.quant import Quantizer

ATTR = "_level_keys"  # {group index: setup key}; a cache (parq.optim.checkpoint.CACHES)


def setup_key(opt, group: dict, quantizer: Quantizer) -> tuple:
    """What a group's levels depend on besides the weights."""
    bits = group["quant_bits"]
    return (bits, group.get("quant_block_size"), bool(opt.quant_per_channel), id(quantizer),
            quantizer.get_quant_size(bits))  # fmt: skip


def _shapes_fit(opt, index: int, group: dict, params: list[Tensor], K: int) -> bool:
    """Do the stored levels have the shape the group's layout gives? (DTensor parameters:
    their sharded path keeps its own buffers and checks them.)"""
    for j, p in enumerate(params):
        Q = opt.state.get(p, {}).get("quants")
        if Q is None or shard_plan.is_dtensor(p):
            continue
        layout = opt._layout(group, index, j, p)
        if tuple(Q.shape) != ((layout.rows, K) if layout.grouped else (K,)):
            return False
    return True


def needs_update(opt, index: int, group: dict, params: list[Tensor], quantizer: Quantizer) -> bool:
    """True when the group's stored levels were computed for another setup (module doc);
    records the group's current setup."""
    keys = opt.__dict__.setdefault(ATTR, {})
    key = setup_key(opt, group, quantizer)
    before = keys.get(index)
    keys[index] = key
    if before is None:
        return not _shapes_fit(opt, index, group, params, key[-1])
    return before != key

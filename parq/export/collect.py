"""What a ``QuantOptimizer`` knows about each quantized parameter, ready to pack.

For every parameter of a quantized group (``quant_bits < 16``, ``requires_grad``) that
the model owns: its bits, its row layout (SPEC.md §2), its levels ``Q`` as
``(rows, K)`` float32 (``state[p]["quants"]``; a parameter that was never quantized
gets fresh levels from its group's quantizer) and the index of each element's level.

The index is that of the nearest level (SPEC.md §4 ``near``: midpoints, ties go to
the lower level). A hard-quantized weight *is* a level (for half-precision weights:
the level rounded to the weight's dtype), so its index is exact and nothing moves;
any other weight is projected, and the largest distance ``|p - Q[idx]|`` (in the
parameter's dtype) is recorded as ``moved``.

Sharded parameters (FSDP2 / DTensor): the full parameter and its levels are gathered
with ``full_tensor()``, a collective, so every rank must take part; the caller then
writes on rank 0 only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from parq.optim.layout import RowLayout, row_layout
from parq.optim.shard_plan import is_dtensor

MAX_LEVELS = 256  # uint8 indices


@dataclass
class QuantizedParam:
    """One quantized parameter, gathered: ``values`` is the full weight (detached),
    ``levels`` ``(rows, K)`` float32 sorted, ``indices`` uint8 ``(rows * cols,)``."""

    name: str
    param: Tensor
    values: Tensor
    bits: int
    layout: RowLayout
    levels: Tensor
    indices: Tensor
    moved: float
    quantizer: str

    @property
    def layout_name(self) -> str:
        if not self.layout.grouped:
            return "tensor"
        return "channel" if self.layout.block_size is None else "block"


def full(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective), else ``t``; detached."""
    return (t.full_tensor() if is_dtensor(t) else t).detach()


def nearest_index(x: Tensor, Q: Tensor) -> Tensor:
    """``#{j : M_j < x}`` per row, ``M_j = (Q_j + Q_{j+1}) / 2`` (SPEC.md §4 ``near``):
    ``x`` ``(rows, n)`` float32, ``Q`` ``(rows, K)`` sorted; int64 ``(rows, n)``."""
    if Q.size(1) == 1:
        return torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    M = ((Q[:, :-1] + Q[:, 1:]) / 2).contiguous()
    return torch.searchsorted(M, x.contiguous(), right=False)


def _quantizer_of(optimizer, qi: int):
    qmap = getattr(optimizer, "group_quantizer_map", None) or {}
    return qmap.get(qi, optimizer.quantizer)


def _fresh_levels(values: Tensor, bits: int, layout: RowLayout, quantizer) -> Tensor:
    """Levels of a parameter the optimizer has not quantized yet (as its step would)."""
    if layout.grouped:
        view = values.reshape(layout.rows, layout.cols)
    elif layout.block_size is not None:
        view = values.reshape(-1, layout.block_size)
    else:
        view = values
    _, Q = quantizer.quantize(view, bits, layout.dim)
    return Q


def _levels(name: str, Q: Tensor, rows: int) -> Tensor:
    Q = full(Q).float()
    K = Q.size(-1) if Q.dim() else 0
    if not 1 <= K <= MAX_LEVELS or Q.numel() != rows * K:
        raise ValueError(f"parameter {name!r}: levels of shape {tuple(Q.shape)} do not fit "
                         f"{rows} quantization group(s) of 1..{MAX_LEVELS} levels")  # fmt: skip
    Q = Q.reshape(rows, K)
    if not torch.isfinite(Q).all():
        raise ValueError(f"parameter {name!r}: its levels are not finite ({Q.flatten()[:8]})")
    return Q.sort(dim=1).values.contiguous()


def _project(name: str, values: Tensor, Q: Tensor, layout: RowLayout) -> tuple[Tensor, float]:
    """``(uint8 indices, largest move)`` of the weights onto their nearest levels."""
    x = values.float().reshape(layout.rows, layout.cols)
    if not torch.isfinite(x).all():
        raise ValueError(f"parameter {name!r} holds NaN/Inf values: nothing to export")
    idx = nearest_index(x, Q)
    hard = Q.gather(1, idx).to(values.dtype).float()
    moved = float((x - hard).abs().max()) if x.numel() else 0.0
    return idx.to(torch.uint8).reshape(-1), moved


def quantized_params(model: torch.nn.Module, optimizer) -> list[QuantizedParam]:
    """The model's quantized parameters, in the optimizer's order (module doc)."""
    if not hasattr(optimizer, "regularized_param_groups"):
        raise TypeError(f"optimizer must be the QuantOptimizer that holds the model's levels, "
                        f"got {type(optimizer).__name__}")  # fmt: skip
    names = {id(p): n for n, p in model.named_parameters()}
    out, seen = [], set()
    for qi, group in enumerate(optimizer.regularized_param_groups()):
        bits = group["quant_bits"]
        quantizer = _quantizer_of(optimizer, qi)
        for p in group["params"]:
            name = names.get(id(p))
            if name is None or not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            layout = row_layout(p, group.get("quant_block_size"), optimizer.quant_per_channel,
                                f"parameter {name!r}: ")  # fmt: skip
            values = full(p)
            Q = optimizer.state[p].get("quants") if p in optimizer.state else None
            if Q is None:
                Q = _fresh_levels(values, bits, layout, quantizer)
            Q = _levels(name, Q, layout.rows)
            idx, moved = _project(name, values, Q, layout)
            out.append(QuantizedParam(name, p, values, bits, layout, Q, idx, moved,
                                      type(quantizer).__name__))  # fmt: skip
    return out


def plain_tensors(model: torch.nn.Module, quantized: list[QuantizedParam]) -> dict[str, Tensor]:
    """Every other parameter and persistent buffer (a tensor shared under several names
    once, under its first name), gathered, detached."""
    skip = {id(q.param) for q in quantized}
    return {name: full(t) for name, t in model_tensors(model).items() if id(t) not in skip}


def model_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's parameters and persistent buffers by name (first name of a shared one)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out

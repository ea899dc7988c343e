"""Quantize + prox of a group after ``base_optimizer.step()`` has updated its weights.

The two unfused paths of ``QuantOptimizer.step()`` (SPEC.md §5; the fused step of
§8 is :mod:`parq.optim.fused_step`):

* :func:`fused_prox_group`: built-in quantizers and prox maps; one
  ``parq_kernels::quant_prox_`` call per (device, dtype) does the latent copy, the
  shrink, the levels and the prox in one pass;
* :func:`generic_group`: user ``Quantizer`` / ``ProxMap`` subclasses (and float64,
  and ``fused=False``): ``quantizer.quantize`` and ``prox_map.apply_`` per
  parameter, exactly as the public PARQ release calls them.

Non-finite values (SPEC.md §6) are handled alike on every path: an element whose
new value is NaN/Inf does not enter the latent (it keeps its previous value, from
which it is projected) and its parameter is flagged; the optimizer raises at the
next level update (:meth:`QuantOptimizer._note_nonfinite`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from parq.quant.quantizer import Quantizer
from parq_kernels.ops import quant_prox_
from parq_kernels.reference import clamp_latents_


def reusable_levels(Q: Tensor | None, shape: tuple[int, ...], device: torch.device) -> bool:
    """Can a stored level tensor be overwritten in place by the fused op?"""
    return (
        Q is not None
        and Q.shape == shape
        and Q.dtype == torch.float32
        and Q.device == device
        and Q.is_contiguous()
    )


def latent_of(state: dict, p: Tensor) -> Tensor:
    """``state["latent"]``, contiguous and in ``p``'s dtype (converted if the model's dtype
    changed mid-training); a parameter without one starts from ``p``."""
    latent = state.get("latent")
    if latent is None:
        latent = state["latent"] = p.detach().clone(memory_format=torch.contiguous_format)
    elif latent.dtype != p.dtype or not latent.is_contiguous() or latent.device != p.device:
        latent = state["latent"] = latent.to(device=p.device, dtype=p.dtype,
                                             memory_format=torch.contiguous_format)  # fmt: skip
    return latent


def generic_group(
    opt, index: int, group: dict, params: list[Tensor], quantizer: Quantizer, gamma: float,
    update: bool, n: int,
) -> float | None:  # fmt: skip
    """Per-parameter path: ``quantizer.quantize`` and ``prox_map.apply_``."""
    bits = group["quant_bits"]
    rho = None
    flags = []
    for j, p in enumerate(params):
        layout = opt._layout(group, index, j, p)
        state = opt.state[p]
        latent = latent_of(state, p)
        finite = torch.isfinite(p)
        flags.append(~finite.all())
        latent.copy_(torch.where(finite, p, latent))  # a NaN/Inf update keeps the old latent
        p.copy_(latent)
        param = p  # half-precision weights are shrunk in float32 (SPEC §6), then stored
        if gamma != 1.0:
            if p.dtype in (torch.float16, torch.bfloat16):
                p = p.float()
            p.div_(gamma)
        if layout.grouped:
            view = p.reshape(layout.rows, layout.cols)
        elif layout.block_size is not None:
            view = p.reshape(-1, layout.block_size)
        else:
            view = p
        if update or "quants" not in state:
            q, Q = quantizer.quantize(view, bits, layout.dim)
            state["quants"] = Q.to(torch.float32)
        else:
            q = None
        rho = opt.prox_map.apply_(view, q, state["quants"], step_count=n, dim=layout.dim)
        if view is not p and not p.is_contiguous():  # reshape copied: write back
            p.copy_(view.reshape(p.shape))
        if getattr(opt.prox_map, "clamps_latent", False) and latent.numel():  # BinaryConnect
            Q = state["quants"]
            clamp_latents_([latent.view(layout.rows, layout.cols)], [Q.view(-1, Q.size(-1))],
                           gamma)  # fmt: skip
        if p is not param:
            param.copy_(p)
    if flags:
        opt._note_nonfinite(index, list(enumerate(params)), torch.stack(flags).int(), n)
    return rho


def fused_prox_group(
    opt, index: int, group: dict, params: list[Tensor], quantizer: Quantizer, gamma: float,
    update: bool, n: int,
) -> float | None:  # fmt: skip
    """All parameters of the group through ``quant_prox_``, one call per (device, dtype)."""
    if not params:
        return None
    bits = group["quant_bits"]
    kind, qargs = quantizer.kernel_spec(bits)
    K = quantizer.get_quant_size(bits)
    prox_kind, prox_arg, rho = opt.prox_map.schedule(n)
    # (device, dtype, update) -> [(j, p, rows view, latent view, Q view)]
    buckets: dict[tuple, list] = {}
    for j, p in enumerate(params):
        layout = opt._layout(group, index, j, p)
        shape2d = (layout.rows, layout.cols)
        state = opt.state[p]
        latent = latent_of(state, p)
        Q = state.get("quants")
        fresh = update or Q is None  # a parameter added mid-training has no levels yet
        q_shape = (layout.rows, K) if layout.grouped else (K,)
        if fresh and not reusable_levels(Q, q_shape, p.device):
            Q = state["quants"] = torch.empty(q_shape, dtype=torch.float32, device=p.device)
        rows = p.view(shape2d) if p.is_contiguous() else p.contiguous().view(shape2d)
        buckets.setdefault((p.device, p.dtype, fresh), []).append(
            (j, p, rows, latent.view(shape2d), Q.view(-1, K))
        )
    host = getattr(quantizer, "host_levels", None)
    if host is not None and host(bits):  # refined LSBQ: levels by torch ops, then stored
        buckets = _store_host_levels(quantizer, bits, gamma, buckets)
    for (device, _dtype, fresh), items in buckets.items():
        flags = torch.zeros(len(items), dtype=torch.int32, device=device)
        quant_prox_([it[2] for it in items], [it[3] for it in items], [it[4] for it in items],
                    flags, int(kind), bits, list(qargs), quantizer.center, fresh, int(prox_kind),
                    float(prox_arg), float(gamma), opt.backend or "")  # fmt: skip
        for _, p, rows, _, _ in items:
            if not p.is_contiguous():
                p.copy_(rows.view(p.shape))
        opt._note_nonfinite(index, [(it[0], it[1]) for it in items], flags, n)
    return rho


def _store_host_levels(quantizer: Quantizer, bits: int, gamma: float, buckets: dict) -> dict:
    """Fresh levels of a quantizer whose ``q`` is the nearest level (``host_levels``):
    computed by ``quantize_rows`` from ``x = p / gamma`` (where ``p`` is not finite: the
    kept latent, as the op does), written to the stored levels, and the op called with
    ``update=False`` (``hard(x)`` = the nearest stored level = the quantizer's ``q``)."""
    out: dict = {}
    for (device, dtype, fresh), items in buckets.items():
        if fresh:
            for _, _, rows, latent, Q in items:
                x = torch.where(torch.isfinite(rows), rows, latent).float()
                if gamma != 1.0:
                    x = x / gamma
                Q.copy_(quantizer.quantize_rows(x, bits)[1].expand_as(Q))
        out.setdefault((device, dtype, False), []).extend(items)
    return out

"""Which path each quantized group takes through ``QuantOptimizer.step()``, and why.

Decided afresh at every step (the checks are cheap attribute and dtype reads), so
that a change of options, dtypes or parameters between steps is honoured; a group that
took the fused step at its last step and whose parameters, state and options are still
those of that step keeps it without the per-parameter checks (:mod:`parq.optim.fused_call`):

* ``FUSED_STEP``: the base update fused with quantize + prox (SPEC.md §8,
  :mod:`parq.optim.fused_step`): built-in quantizer and prox map, ``fused`` and
  ``fuse_base_step``, a torch SGD / Adam / AdamW base that the kernels serve, and
  for DTensor parameters quantization groups that lie whole on each rank;
* ``FUSED_PROX``: ``base_optimizer.step()``, then the fused quantize/prox op;
* ``GENERIC``: ``base_optimizer.step()``, then the per-parameter calls of the
  public release (user quantizers / prox maps, float64, ``fused=False``);
* ``SHARDED``: DTensor parameters that need global statistics, or that the fused
  step cannot serve (:mod:`parq.optim.sharding`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from parq.optim import fused_call, fused_step, shard_plan, sharding
from parq.optim.proxmap import KernelProxMap
from parq.quant.quantizer import KernelQuantizer, Quantizer
from parq_kernels import backends

FUSED_STEP = "fused step"
FUSED_PROX = "base step + fused prox"
GENERIC = "base step + generic prox"
SHARDED = "base step + sharded prox"


def checked_backend(backend: str | None, groups: list[dict]) -> str | None:
    """Reject an unknown or unavailable explicit backend before anything is stepped."""
    if backend in (None, "", "auto"):
        return None
    devices = {p.device for g in groups if g.get("quant_bits", 16) < 16 for p in g["params"]}
    if backend not in backends.BACKENDS:
        raise ValueError(f"backend must be one of {backends.BACKENDS} (or None), got {backend!r}")
    for device in devices:
        if device.type != "meta":
            backends.resolve(device, backend)  # raises BackendUnavailableError, saying why
    return backend


FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def builtin_quantizer(quantizer: Quantizer) -> bool:
    """Is the quantizer a built-in that the fused kernels describe?"""
    if getattr(quantizer, "generic_path_reason", ""):  # a built-in without a fused kernel
        return False
    return (
        isinstance(quantizer, KernelQuantizer)
        and type(quantizer).quantize is KernelQuantizer.quantize
        and type(quantizer).get_quant_size is KernelQuantizer.get_quant_size
    )


def builtin_prox(prox_map) -> bool:
    """Is the prox map a built-in that the fused kernels describe?"""
    return isinstance(prox_map, KernelProxMap) and type(prox_map).apply_ is KernelProxMap.apply_


def use_fused(opt, quantizer: Quantizer, params: list[Tensor]) -> bool:
    """Can the fused quantize/prox op serve this group (fp32 / bf16 / fp16, SPEC §6)?"""
    return (
        opt.fused
        and builtin_quantizer(quantizer)
        and builtin_prox(opt.prox_map)
        and all(p.dtype in FUSED_DTYPES for p in params)
    )


def generic_reason(opt, quantizer: Quantizer, params: list[Tensor]) -> str:
    """Why a group takes the generic per-parameter path."""
    if not opt.fused:
        return "fused=False"
    if getattr(quantizer, "generic_path_reason", ""):
        return quantizer.generic_path_reason
    if not builtin_quantizer(quantizer):
        return f"user quantizer {type(quantizer).__name__}"
    if not builtin_prox(opt.prox_map):
        return f"user prox map {type(opt.prox_map).__name__}"
    dtypes = sorted({str(p.dtype) for p in params if p.dtype not in FUSED_DTYPES})
    return f"{', '.join(dtypes)} parameters"


def host_levels(quantizer: Quantizer, bits: int) -> bool:
    """Does the fused path take this quantizer's levels from torch ops (refined LSBQ)?"""
    host = getattr(quantizer, "host_levels", None)
    return host is not None and host(bits)


def host_levels_reason(opt, group: dict, params: list[Tensor]) -> str:
    """Why a host-levels group cannot take the fused step at this step ("" if it can): its
    levels come from the updated latent, which exists only after the base step."""
    n = opt.num_steps
    update = (n - opt.warmup_steps) % opt.quant_period == 0 or n == opt.freeze_step
    if update or any("quants" not in opt.state.get(p, {}) for p in params):
        return "level update of refined LSBQ: levels from torch ops after the base step"
    return ""


def routes(opt, quantized: list | None = None) -> dict[int, tuple[str, str]]:
    """``{index: (path, reason)}`` of the quantized groups for this step (module doc);
    ``quantized``: ``list(opt._quantized_params())`` if the caller has it."""
    out = {}
    for qi, (index, group, params) in enumerate(quantized or opt._quantized_params()):
        quantizer = opt._quantizer_for(qi)
        if fused_call.ready(opt, index, group, params, quantizer):  # as at its last step
            out[index] = (FUSED_STEP, "")
            continue
        local = shard_plan.local_tensors(params)
        host = host_levels(quantizer, group["quant_bits"])
        if shard_plan.has_dtensor(params) and host:
            why = "refined LSBQ on DTensor parameters: levels per parameter"
            out[index] = (SHARDED, f"DTensor parameters, {why}")
        elif shard_plan.has_dtensor(params):
            if use_fused(opt, quantizer, local):
                why = opt._fused_step_reason(group, local)
            else:
                why = generic_reason(opt, quantizer, local)
            K = quantizer.get_quant_size(group["quant_bits"])
            if not why and not sharding.whole_on_rank(opt, index, group, params, K):
                why = "quantization groups split across ranks: global statistics"
            out[index] = (SHARDED, f"DTensor parameters, {why}") if why else (FUSED_STEP, "")
        elif not use_fused(opt, quantizer, params):
            out[index] = (GENERIC, generic_reason(opt, quantizer, params))
        else:
            why = opt._fused_step_reason(group, params)
            if not why and host:
                why = host_levels_reason(opt, group, params)
            out[index] = (FUSED_PROX, why) if why else (FUSED_STEP, "")
    return out


def fused_step_reason(opt, group: dict, params: list[Tensor]) -> str:
    """Why a group's base update cannot be fused with its quantize/prox ("" if it can)."""
    if not opt.fuse_base_step:
        return "fuse_base_step=False"
    if opt._base_kind is None:
        return opt._base_kind_reason
    return fused_step.group_reason(group, params)


def has_step_hooks(base: torch.optim.Optimizer) -> bool:
    """Does ``base.step()`` run hooks (its own or torch's global ones)? A base step over no
    group is skipped only without them (QuantOptimizer._base_step_without)."""
    own = (getattr(base, "_optimizer_step_pre_hooks", None),
           getattr(base, "_optimizer_step_post_hooks", None))  # fmt: skip
    glob = (getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
            getattr(torch_optimizer, "_global_optimizer_post_hooks", None))  # fmt: skip
    return any(bool(h) for h in (*own, *glob))

"""``QuantOptimizer.state_dict()`` / ``load_state_dict()``: torch's contract, PARQ's keys.

The state dict is the base optimizer's, so its ``param_groups`` carry ``num_steps``,
``cumu_lr``, ``inv_slope`` and ``initial_wd``, and each quantized parameter's state
carries ``latent`` and ``quants`` beside the base optimizer's own keys (SPEC.md §1,
§8). torch's four optimizer state-dict hooks registered on the QuantOptimizer run as
torch runs them. ``load_state_dict(..., start_step=n)`` overrides ``num_steps`` (the
public release's way to resume at a step computed from epochs).

torch's loader replaces each group's keys by the saved group's. A checkpoint of a plain
(pre-QAT) optimizer has none of the wrapper's :data:`QAT_GROUP_KEYS`, so the ones the
checkpoint lacks keep the value the wrapper has now (``quant_bits`` as the user set it up,
``num_steps``, ``cumu_lr``, ``initial_wd``, ...): starting QAT from a full-precision
checkpoint loads the base optimizer's state and keeps quantizing. Keys the checkpoint has
win, as torch's do (a QAT checkpoint resumes as it was saved).

``copy.deepcopy`` / ``pickle`` (:func:`getstate` / :func:`setstate`): torch's
``Optimizer.__getstate__`` saves ``defaults``, ``state`` and ``param_groups``, which here are
properties of the base optimizer; the wrapper pickles its own attributes instead (the base
optimizer among them, pickled by torch), less the caches that the next step rebuilds.

Checkpoints with ``torch.distributed.checkpoint`` need ``latent`` / ``quants`` entries
even before quantization starts (:func:`parq.optim.sharding.add_state_placeholders`);
those placeholders are added for DTensor parameters only, so that an ordinary
checkpoint taken before the first quantized step holds no made-up state and loads into
the public release.
"""

from __future__ import annotations

import torch

from parq.optim import sharding

OURS = ("latent", "quants")
QAT_GROUP_KEYS = (
    "quant_bits",
    "quant_block_size",
    "num_steps",
    "cumu_lr",
    "inv_slope",
    "initial_wd",
)


def state_dict(opt) -> dict:
    """torch's ``Optimizer.state_dict`` protocol (hooks included) over the base's state."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    sd = sharding.add_state_placeholders(opt, opt.base_optimizer.state_dict())
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, sd)
        if result is not None:
            sd = result
    return sd


def load_state_dict(opt, sd: dict, start_step: int | None = None) -> None:
    """Load ``sd``; ``quants`` stay float32 whatever the parameter dtype.

    ``latent`` / ``quants`` are kept away from the base optimizer's loader: Adam-like
    optimizers reject a parameter state without ``step`` (a quantized parameter whose
    grad was None has only these two keys).
    """
    if start_step is not None and not (isinstance(start_step, int) and start_step >= 0):
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    sd = dict(sd)
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, sd)
        if result is not None:
            sd = result
    saved = sd["state"]
    base_state = {k: {n: v for n, v in s.items() if n not in OURS} for k, s in saved.items()}
    base_state = {k: s for k, s in base_state.items() if s}
    kept = [{k: g[k] for k in QAT_GROUP_KEYS if k in g} for g in opt.param_groups]
    opt.base_optimizer.load_state_dict({**sd, "state": base_state})
    for group, qat_keys in zip(opt.param_groups, kept, strict=True):
        for k, v in qat_keys.items():
            group.setdefault(k, v)  # absent from the checkpoint: keep the wrapper's (doc)
    # saved keys are indices (state_dict()) or names (torch.distributed.checkpoint)
    keys = [k for g in sd["param_groups"] for k in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, p in zip(keys, params, strict=True):
        entry = saved.get(key, {})
        if "latent" in entry:
            opt.state[p]["latent"] = entry["latent"].to(device=p.device, dtype=p.dtype)
        if "quants" in entry:
            opt.state[p]["quants"] = entry["quants"].to(p.device, torch.float32)
    sharding.drop_state_placeholders(opt)  # taken before quantization started
    if start_step is not None:
        opt.num_steps = start_step
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


CACHES = ("_fused_views", "_shard_plans", "_level_keys")  # rebuilt at the next step


def getstate(opt) -> dict:
    """``QuantOptimizer.__getstate__``: its attributes (base optimizer included), no caches."""
    return {k: v for k, v in opt.__dict__.items() if k not in CACHES}


def setstate(opt, state: dict) -> None:
    """``QuantOptimizer.__setstate__``: the attributes back, and torch's step profiling hook
    (a class attribute, patched again in a fresh interpreter)."""
    opt.__dict__.update(state)
    opt._patch_step_function()

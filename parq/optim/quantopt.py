"""QuantOptimizer: quantization-aware training through the optimizer (SPEC.md §5).

Wraps any ``torch.optim`` optimizer. Parameter groups with ``quant_bits < 16``
are quantized: after each base step the full-precision weights are kept as
``state[p]["latent"]`` and the model's weights are projected toward the level
set ``state[p]["quants"]`` by the prox map.

Three paths compute the same thing:

* the **fused step** (built-in quantizers and prox maps, base optimizer
  ``torch.optim.SGD`` / ``Adam`` / ``AdamW``): per parameter group, one
  ``parq_kernels::fused_step_`` call per (device, dtype) applies the base
  optimizer's update to the latent weights and then quantizes and projects them,
  in one pass (:mod:`parq.optim.fused_step`, SPEC.md §8); the other groups get
  ``base_optimizer.step()`` as usual, or the fused kernel it would call, called directly
  where that gives the same bits (:mod:`parq.optim.base_call`);
* the **fused prox** (built-in quantizers and prox maps, any other base
  optimizer): ``base_optimizer.step()`` on the restored latents, then one
  ``parq_kernels::quant_prox_`` call per (device, dtype) does the latent copy,
  shrink, level computation and prox in one pass over the weights;
* the **generic path** (user ``Quantizer`` / ``ProxMap`` subclasses that
  override ``quantize`` / ``apply_``, float64 parameters, or ``fused=False``):
  ``quantizer.quantize`` and ``prox_map.apply_`` per parameter, exactly as the
  public PARQ release calls them.

Groups holding DTensor parameters (FSDP2) go to :mod:`parq.optim.sharding`, which
runs the fused prox or the generic path on the local shards, with global statistics
where a quantization group spans ranks (SPEC.md §7).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from parq.optim import (
    base_call,
    checkpoint,
    freeze,
    fused_step,
    prox_paths,
    routing,
    shard_plan,
    sharding,
    stale_levels,
    step_profile,
)
from parq.optim.fused_step import GroupPath
from parq.optim.layout import RowLayout, check_quantized_group, group_bits, row_layout
from parq.optim.nonfinite import NonFiniteFlags, NonFiniteParameterError, split_group_error
from parq.optim.proxmap import ProxMap
from parq.optim.public_surface import PublicSurface
from parq.quant.quantizer import Quantizer

__all__ = ["QuantOptimizer", "NonFiniteParameterError"]


class QuantOptimizer(PublicSurface, Optimizer):
    """Quantization-aware wrapper of ``base_optimizer`` (drop-in for PARQ's).

    Args:
        base_optimizer: any ``torch.optim.Optimizer``; its ``param_groups`` and
            ``state`` are shared, so schedulers and checkpoints see one optimizer.
        quantizer: computes ``(q, Q)`` for groups with ``quant_bits < 16``.
        prox_map: projects the weights toward ``Q`` each step.
        warmup_steps: plain base-optimizer steps before quantization starts.
        quant_period: recompute ``Q`` every this many steps (reuse it between).
        quant_per_channel: one level set per row (``p.size(0)``) instead of per tensor.
        quant_shrink: divide the weights by ``max(1, cumulative lr)`` before quantizing.
        anneal_wd_frac: anneal this fraction of weight decay with PARQ's inverse slope.
        group_quantizer_map: ``{i: Quantizer}`` overriding ``quantizer`` for the
            ``i``-th quantized group.
        backend: fused-op backend (``"triton"``, ``"cuda"``, ``"cpu"``,
            ``"reference"``; default: automatic, or ``PARQ_KERNELS_BACKEND``).
        fused: use the fused ops for built-in quantizers and prox maps: the fused
            step (base update + quantize + prox, SPEC.md §8) where the base optimizer
            is torch's SGD / Adam / AdamW, else the fused quantize + prox op after
            ``base_optimizer.step()``; :attr:`step_paths` says which each group took.
        fuse_base_step: with ``fused``, apply torch's SGD / Adam / AdamW update inside
            the fused op. ``False`` keeps ``base_optimizer.step()`` separate (bitwise
            torch's own update for half-precision parameters, which the fused step
            computes in float32).
        check_finite: raise :class:`NonFiniteParameterError` when a quantized
            parameter is NaN/Inf at a quantization-update step.
        freeze_step: at this step (counted like ``num_steps``) hard-quantize every quantized
            parameter with fresh levels, then keep them frozen (SPEC.md §9,
            :mod:`parq.optim.freeze`); ``None``: never.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        quantizer: Quantizer,
        prox_map: ProxMap,
        warmup_steps: int = 0,
        quant_period: int = 10,
        quant_per_channel: bool = False,
        quant_shrink: bool = False,
        anneal_wd_frac: float = 0.0,
        group_quantizer_map: dict[int, Quantizer] | None = None,
        *,
        backend: str | None = None,
        fused: bool = True,
        fuse_base_step: bool = True,
        check_finite: bool = True,
        freeze_step: int | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}"
            )
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a parq Quantizer, got {type(quantizer)}")
        if not isinstance(prox_map, ProxMap):
            raise TypeError(f"prox_map must be a parq ProxMap, got {type(prox_map)}")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not (isinstance(quant_period, int) and quant_period >= 1):
            raise ValueError(f"quant_period must be an int >= 1, got {quant_period!r}")
        if not 0.0 <= anneal_wd_frac <= 1.0:
            raise ValueError(f"anneal_wd_frac must be in [0, 1], got {anneal_wd_frac}")
        freeze_step = freeze.check_freeze_step(freeze_step, warmup_steps)
        for key, qz in (group_quantizer_map or {}).items():
            if not isinstance(qz, Quantizer):
                raise TypeError(f"group_quantizer_map[{key!r}] must be a Quantizer, got {type(qz)}")

        self.base_optimizer = base_optimizer
        self.quantizer = quantizer
        self.prox_map = prox_map
        self.warmup_steps = warmup_steps
        self.quant_period = quant_period
        self.quant_per_channel = quant_per_channel
        self.quant_shrink = quant_shrink
        self.anneal_wd_frac = anneal_wd_frac
        self.group_quantizer_map = group_quantizer_map
        self.backend = routing.checked_backend(backend, self.param_groups)
        self.fused = fused
        self.fuse_base_step = fuse_base_step
        self.check_finite = check_finite
        self.freeze_step = freeze_step
        self._num_steps_unquantized = 0  # used only while no group is quantized
        self._base_kind, self._base_kind_reason = fused_step.base_kind(base_optimizer)
        self._nonfinite = NonFiniteFlags()

        # torch.optim.Optimizer bookkeeping, without copying the base's groups.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        for index, group in enumerate(self.param_groups):
            self._init_group(group, index)

    # -- torch.optim.Optimizer surface, shared with the base optimizer ---------

    # torch.amp.GradScaler must unscale the gradients itself: a fused torch base (which
    # unscales inside its own step) is not stepped for the quantized groups
    _step_supports_amp_scaling = False

    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    @property
    def state(self):
        return self.base_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.base_optimizer.defaults

    def __repr__(self) -> str:
        paths = "".join(f"\n  param_groups[{i}]: {path}" for i, path in
                        enumerate(self.step_paths))  # fmt: skip
        return (
            f"{type(self).__name__}(base_optimizer={self.base_optimizer!r}, "
            f"quantizer={self.quantizer!r}, prox_map={self.prox_map!r})"
            + (f"\nlast step:{paths}" if paths else "")
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group; one that fails validation is taken out again (no state left)."""
        self.base_optimizer.add_param_group(param_group)
        try:
            self._init_group(self.param_groups[-1], len(self.param_groups) - 1)
        except Exception:
            self.base_optimizer.param_groups.pop()
            raise

    def state_dict(self) -> dict:
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict, start_step: int | None = None) -> None:
        """Load a checkpoint (:mod:`parq.optim.checkpoint`); ``start_step`` overrides
        ``num_steps``, as in the public release."""
        self.__dict__.pop("_fused_views", None)  # fused_step's views of the old state
        self.__dict__.pop(stale_levels.ATTR, None)  # the loaded levels' setup is unknown
        checkpoint.load_state_dict(self, state_dict, start_step)

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle (parq.optim.checkpoint)
        return checkpoint.getstate(self)

    def __setstate__(self, state: dict) -> None:
        checkpoint.setstate(self, state)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks are read from the base optimizer (public release)."""
        if name.startswith("__") or "base_optimizer" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.base_optimizer, name)

    # -- quantized groups ------------------------------------------------------

    def _init_group(self, group: dict, index: int) -> None:
        bits = group_bits(group, index)
        if bits is None:
            return
        qi = sum(1 for g in self.param_groups[:index] if group_bits(g, -1) is not None)
        check_quantized_group(group, index, bits, self._quantizer_for(qi), self.quant_per_channel)
        shard_plan.check_group(group, index, bits, self._quantizer_for(qi), self.quant_per_channel)
        group.setdefault("cumu_lr", 0.0)
        group.setdefault("initial_wd", group.get("weight_decay", 0.0))

    def regularized_param_groups(self) -> Iterator[dict]:
        """The quantized parameter groups (``quant_bits < 16``), in order."""
        for index, group in enumerate(self.param_groups):
            if group_bits(group, index) is not None:
                yield group

    def _quantizer_for(self, quant_group_index: int) -> Quantizer:
        if self.group_quantizer_map:
            return self.group_quantizer_map.get(quant_group_index, self.quantizer)
        return self.quantizer

    @property
    def num_steps(self) -> int:
        """Optimizer steps taken (stored in the first quantized group)."""
        for group in self.regularized_param_groups():
            return group.setdefault("num_steps", 0)
        return self._num_steps_unquantized

    @num_steps.setter
    def num_steps(self, value: int) -> None:
        for group in self.regularized_param_groups():
            group["num_steps"] = value
            return
        self._num_steps_unquantized = value

    def _shrink_gamma(self, group: dict) -> float:
        return max(1.0, group["cumu_lr"])

    def _quantized_params(self) -> Iterator[tuple[int, dict, list[Tensor]]]:
        for index, group in enumerate(self.param_groups):
            if group_bits(group, index) is not None:
                yield index, group, [p for p in group["params"] if p.requires_grad]

    # torch's step profiling wrapper (Optimizer._patch_step_function applies it), with the
    # C++ profiler range: step_profile.py
    profile_hook_step = staticmethod(step_profile.profile_hook_step)

    # -- the step (torch.compile of a function calling it runs it eagerly: a graph break) --
    @torch.compiler.disable
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        # grad mode off, as @torch.no_grad() does, without its per-call objects (~2 us of a
        # small model's step); the closure runs with grad enabled (_step)
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            n = self.num_steps
            if freeze.is_frozen(self, n):
                return freeze.frozen_step(self, closure, n)
            if n == self.freeze_step:
                with freeze.hard_projection(self):
                    return self._step(closure, n, freezing=True)
            return self._step(closure, n)
        finally:
            torch._C._set_grad_enabled(grad)

    def _step(self, closure: Callable[[], float] | None, n: int, freezing: bool = False):
        if n < self.warmup_steps:
            loss = self.base_optimizer.step(closure)
            warm = GroupPath("base step", "warmup")
            self._paths = dict.fromkeys(range(len(self.param_groups)), warm)
            self.num_steps = n + 1
            return loss
        quantized = list(self._quantized_params())
        routes = routing.routes(self, quantized)
        fused = {index for index, (path, _) in routes.items() if path == routing.FUSED_STEP}
        # at the first quantized step, the latents of the unfused groups start as the weights
        # before the base step (held aside: Adam must see an empty state on its first step)
        first = self._weights_before_step(fused) if n == self.warmup_steps else {}
        if fused:  # the closure runs once, before any update, as in torch
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            rest = n > self.warmup_steps and len(fused) < len(quantized)
            corrections = self._restore_latents(skip=fused) if rest else {}
            self._base_step_without(fused)
        else:
            corrections = self._restore_latents() if n > self.warmup_steps else {}
            loss = self.base_optimizer.step(closure)
        for p, latent in first.items():
            self.state[p].setdefault("latent", latent)
        update = freezing or (n - self.warmup_steps) % self.quant_period == 0
        for qi, (index, group, params) in enumerate(quantized):
            group["cumu_lr"] += float(group["lr"])
            self._apply_corrections(group, params, corrections)
            quantizer = self._quantizer_for(qi)
            gamma = self._shrink_gamma(group) if self.quant_shrink else 1.0
            fresh = stale_levels.needs_update(self, index, group, params, quantizer)
            args = (index, group, params, quantizer, gamma, update or fresh, n)
            self.prox_map.begin_group(group)
            path = routes[index][0]
            if path == routing.FUSED_STEP:
                rho = fused_step.step_group(self, self._base_kind, *args)
            elif path == routing.SHARDED:  # FSDP2 / DTensor (SPEC §7)
                rho = sharding.step_group(self, *args)
            elif path == routing.FUSED_PROX:
                rho = prox_paths.fused_prox_group(self, *args)
            else:
                rho = prox_paths.generic_group(self, *args)
            if rho:
                group["inv_slope"] = rho
                if self.anneal_wd_frac > 0 and "weight_decay" in group:
                    a, wd0 = self.anneal_wd_frac, group["initial_wd"]
                    group["weight_decay"] = rho * a * wd0 + (1 - a) * wd0
        self._paths = None  # step_paths builds them from the routes, if asked
        self._routes = routes, len(self.param_groups)
        self.num_steps = n + 1
        if update:
            self._nonfinite.check(self.state)
        return loss

    @property
    def step_paths(self) -> list[GroupPath]:
        """Per parameter group, the path its last ``step()`` took and why (SPEC.md §8):
        ``"fused step"``, ``"base step + fused prox"``, ``"base step + generic prox"``,
        ``"base step + sharded prox"`` or ``"base step"``; empty before the first step."""
        paths = getattr(self, "_paths", {})
        if paths is None:
            routes, count = self._routes
            paths = {i: GroupPath(*routes.get(i, ("base step", ""))) for i in range(count)}
            self._paths = paths
        return [paths[i] for i in sorted(paths)]

    def _fused_step_reason(self, group: dict, params: list[Tensor]) -> str:
        """Why this group's base update cannot be fused ("" if it can); NM-SGD overrides."""
        return routing.fused_step_reason(self, group, params)

    def _use_fused(self, quantizer: Quantizer, params: list[Tensor]) -> bool:
        return routing.use_fused(self, quantizer, params)

    # -- non-finite values (SPEC.md §6, parq.optim.nonfinite) ---------------------

    def _note_nonfinite(self, index: int, items: list[tuple[int, Tensor]], flags: Tensor,
                        n: int) -> None:  # fmt: skip
        """Keep one op call's non-finite flags until the next level update reads them."""
        if self.check_finite:
            self._nonfinite.note(index, items, flags, n)

    def _raise_nonfinite(self, index: int, j: int, p: Tensor) -> None:
        raise split_group_error(index, j, p)

    def _weights_before_step(self, skip: set[int]) -> dict[Tensor, Tensor]:
        """Copies of the weights of the quantized groups but ``skip`` that have no latent."""
        return {p: p.detach().clone(memory_format=torch.contiguous_format)
                for index, _, params in self._quantized_params() if index not in skip
                for p in params if "latent" not in self.state.get(p, {})
                and not shard_plan.is_dtensor(p)}  # fmt: skip

    def _base_step_without(self, skip: set[int]) -> None:
        """``base_optimizer.step()`` over every group but ``skip`` (with its hooks, if any);
        torch's fused kernel called directly where that is the same (:mod:`.base_call`)."""
        groups = self.base_optimizer.param_groups
        rest = base_call.step_groups(self, [(i, g) for i, g in enumerate(groups) if i not in skip])
        if not rest and not routing.has_step_hooks(self.base_optimizer):
            return
        self.base_optimizer.param_groups = rest
        try:
            self.base_optimizer.step()
        finally:
            self.base_optimizer.param_groups = groups

    def _restore_latents(self, skip: set[int] = frozenset()) -> dict[Tensor, Tensor]:
        """``p = latent`` for every quantized parameter (but those of the groups ``skip``);
        returns NM-SGD corrections."""
        params, latents = [], []
        for index, _, group_params in self._quantized_params():
            if index in skip:
                continue
            for p in group_params:
                latent = self.state[p].get("latent")
                if latent is not None:
                    params.append(p)
                    latents.append(latent)
        corrections = self._corrections(params, latents)
        if params:  # DTensor has no _foreach_copy_ rule: copy the local shards
            torch._foreach_copy_(
                shard_plan.local_tensors(params), shard_plan.local_tensors(latents)
            )
        return corrections

    def _corrections(self, params: list[Tensor], latents: list[Tensor]) -> dict[Tensor, Tensor]:
        """NM-SGD hook: the plain optimizer keeps no corrections."""
        return {}

    def _apply_corrections(self, group: dict, params: list[Tensor], corrections: dict) -> None:
        """NM-SGD hook: the plain optimizer applies none."""

    def _layout(self, group: dict, index: int, j: int, p: Tensor) -> RowLayout:
        where = f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}): "
        return row_layout(p, group.get("quant_block_size"), self.quant_per_channel, where)

"""QuantOptimizer: quantization-aware training through the optimizer (SPEC.md §5).

Wraps any ``torch.optim`` optimizer. Parameter groups with ``quant_bits < 16``
are quantized: after each base step the full-precision weights are kept as
``state[p]["latent"]`` and the model's weights are projected toward the level
set ``state[p]["quants"]`` by the prox map.

Two paths compute the same thing:

* the **fused path** (built-in quantizers and prox maps): per parameter group,
  one ``parq_kernels::quant_prox_`` call per (device, dtype) does the latent
  copy, shrink, level computation and prox in one pass over the weights;
* the **generic path** (user ``Quantizer`` / ``ProxMap`` subclasses that
  override ``quantize`` / ``apply_``, float64 parameters, or ``fused=False``):
  ``quantizer.quantize`` and ``prox_map.apply_`` per parameter, exactly as the
  public PARQ release calls them.

Groups holding DTensor parameters (FSDP2) go to :mod:`parq.optim.sharding`, which
runs one of the two paths above on the local shards, with global statistics
where a quantization group spans ranks (SPEC.md §7).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from parq.optim import sharding
from parq.optim.layout import RowLayout, check_quantized_group, group_bits, row_layout
from parq.optim.proxmap import KernelProxMap, ProxMap
from parq.quant.quantizer import KernelQuantizer, Quantizer
from parq_kernels.ops import quant_prox_


class NonFiniteParameterError(FloatingPointError):
    """A quantized parameter holds NaN or Inf at a quantization-update step."""


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reusable(Q: Tensor | None, shape: tuple[int, ...], device: torch.device) -> bool:
    """Can a stored level tensor be overwritten in place by the fused op?"""
    return (
        Q is not None
        and Q.shape == shape
        and Q.dtype == torch.float32
        and Q.device == device
        and Q.is_contiguous()
    )


class QuantOptimizer(Optimizer):
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
        fused: use the fused op for built-in quantizers and prox maps.
        check_finite: raise :class:`NonFiniteParameterError` when a quantized
            parameter is NaN/Inf at a quantization-update step.
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
        check_finite: bool = True,
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
        self.backend = backend
        self.fused = fused
        self.check_finite = check_finite
        self._num_steps_unquantized = 0  # used only while no group is quantized

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
        return (
            f"{type(self).__name__}(base_optimizer={self.base_optimizer!r}, "
            f"quantizer={self.quantizer!r}, prox_map={self.prox_map!r})"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.base_optimizer.add_param_group(param_group)
        self._init_group(self.param_groups[-1], len(self.param_groups) - 1)

    def state_dict(self) -> dict:
        # placeholders make torch.distributed.checkpoint request latent/quants (sharding.py)
        return sharding.add_state_placeholders(self, self.base_optimizer.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint; ``quants`` stay float32 whatever the parameter dtype.

        ``latent`` / ``quants`` are kept away from the base optimizer's loader: Adam-like
        optimizers reject a parameter state without ``step`` (a quantized parameter whose
        grad was None has only these two keys).
        """
        saved = state_dict["state"]
        ours = ("latent", "quants")
        base_state = {k: {n: v for n, v in s.items() if n not in ours} for k, s in saved.items()}
        base_state = {k: s for k, s in base_state.items() if s}
        self.base_optimizer.load_state_dict({**state_dict, "state": base_state})
        # saved keys are indices (state_dict()) or names (torch.distributed.checkpoint)
        keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for key, p in zip(keys, params, strict=True):
            entry = saved.get(key, {})
            if "latent" in entry:
                self.state[p]["latent"] = entry["latent"].to(device=p.device, dtype=p.dtype)
            if "quants" in entry:
                self.state[p]["quants"] = entry["quants"].to(p.device, torch.float32)
        sharding.drop_state_placeholders(self)  # taken before quantization started

    # -- quantized groups ------------------------------------------------------

    def _init_group(self, group: dict, index: int) -> None:
        bits = group_bits(group, index)
        if bits is None:
            return
        qi = sum(1 for g in self.param_groups[:index] if group_bits(g, -1) is not None)
        check_quantized_group(group, index, bits, self._quantizer_for(qi), self.quant_per_channel)
        sharding.check_group(group, index, bits, self._quantizer_for(qi), self.quant_per_channel)
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

    # -- the step ----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        n = self.num_steps
        if n < self.warmup_steps:
            loss = self.base_optimizer.step(closure)
            self.num_steps = n + 1
            return loss
        corrections = self._restore_latents() if n > self.warmup_steps else {}
        loss = self.base_optimizer.step(closure)
        update = (n - self.warmup_steps) % self.quant_period == 0
        for qi, (index, group, params) in enumerate(self._quantized_params()):
            group["cumu_lr"] += float(group["lr"])
            self._apply_corrections(group, params, corrections)
            quantizer = self._quantizer_for(qi)
            gamma = self._shrink_gamma(group) if self.quant_shrink else 1.0
            if sharding.has_dtensor(params):  # FSDP2 / DTensor (SPEC §7)
                rho = sharding.step_group(self, index, group, params, quantizer, gamma, update, n)
            elif self._use_fused(quantizer, params):
                rho = self._fused_group(index, group, params, quantizer, gamma, update, n)
            else:
                rho = self._generic_group(index, group, params, quantizer, gamma, update, n)
            if rho:
                group["inv_slope"] = rho
                if self.anneal_wd_frac > 0 and "weight_decay" in group:
                    a, wd0 = self.anneal_wd_frac, group["initial_wd"]
                    group["weight_decay"] = rho * a * wd0 + (1 - a) * wd0
        self.num_steps = n + 1
        return loss

    def _restore_latents(self) -> dict[Tensor, Tensor]:
        """``p = latent`` for every quantized parameter; returns NM-SGD corrections."""
        params, latents = [], []
        for _, _, group_params in self._quantized_params():
            for p in group_params:
                latent = self.state[p].get("latent")
                if latent is not None:
                    params.append(p)
                    latents.append(latent)
        corrections = self._corrections(params, latents)
        if params:  # DTensor has no _foreach_copy_ rule: copy the local shards
            torch._foreach_copy_(sharding.local_tensors(params), sharding.local_tensors(latents))
        return corrections

    def _corrections(self, params: list[Tensor], latents: list[Tensor]) -> dict[Tensor, Tensor]:
        """NM-SGD hook: the plain optimizer keeps no corrections."""
        return {}

    def _apply_corrections(self, group: dict, params: list[Tensor], corrections: dict) -> None:
        """NM-SGD hook: the plain optimizer applies none."""

    def _use_fused(self, quantizer: Quantizer, params: list[Tensor]) -> bool:
        return (
            self.fused
            and isinstance(quantizer, KernelQuantizer)
            and type(quantizer).quantize is KernelQuantizer.quantize
            and type(quantizer).get_quant_size is KernelQuantizer.get_quant_size
            and isinstance(self.prox_map, KernelProxMap)
            and type(self.prox_map).apply_ is KernelProxMap.apply_
            # the op serves fp32 / bf16 / fp16 (SPEC §6); other dtypes (fp64) go generic
            and all(p.dtype in _FUSED_DTYPES for p in params)
        )

    def _layout(self, group: dict, index: int, j: int, p: Tensor) -> RowLayout:
        where = f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}): "
        return row_layout(p, group.get("quant_block_size"), self.quant_per_channel, where)

    def _raise_nonfinite(self, index: int, j: int, p: Tensor) -> None:
        raise NonFiniteParameterError(
            f"param_groups[{index}] params[{j}] (shape {tuple(p.shape)}, {p.dtype}) holds NaN or "
            "Inf after the base optimizer step; refusing to quantize it (check the loss and "
            "learning rate, or pass check_finite=False to skip this check)"
        )

    def _generic_group(
        self,
        index: int,
        group: dict,
        params: list[Tensor],
        quantizer: Quantizer,
        gamma: float,
        update: bool,
        n: int,
    ) -> float | None:
        """Per-parameter path: ``quantizer.quantize`` and ``prox_map.apply_``."""
        bits = group["quant_bits"]
        rho = None
        for j, p in enumerate(params):
            layout = self._layout(group, index, j, p)
            state = self.state[p]
            if "latent" in state:
                state["latent"].copy_(p)
            else:
                state["latent"] = p.detach().clone()
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
                if self.check_finite and not torch.isfinite(p).all():
                    self._raise_nonfinite(index, j, param)
                q, Q = quantizer.quantize(view, bits, layout.dim)
                state["quants"] = Q.to(torch.float32)
            else:
                q = None
            rho = self.prox_map.apply_(view, q, state["quants"], step_count=n, dim=layout.dim)
            if view is not p and not p.is_contiguous():  # reshape copied: write back
                p.copy_(view.reshape(p.shape))
            if p is not param:
                param.copy_(p)
        return rho

    def _fused_group(
        self,
        index: int,
        group: dict,
        params: list[Tensor],
        quantizer: Quantizer,
        gamma: float,
        update: bool,
        n: int,
    ) -> float | None:
        """All parameters of the group through ``quant_prox_``, one call per (device, dtype)."""
        if not params:
            return None
        bits = group["quant_bits"]
        kind, qargs = quantizer.kernel_spec(bits)
        K = quantizer.get_quant_size(bits)
        prox_kind, prox_arg, rho = self.prox_map.schedule(n)
        # (device, dtype, update) -> [(j, p, rows view, latent view, Q view)]
        buckets: dict[tuple, list] = {}
        for j, p in enumerate(params):
            layout = self._layout(group, index, j, p)
            shape2d = (layout.rows, layout.cols)
            state = self.state[p]
            latent = state.get("latent")
            if latent is None or not latent.is_contiguous():
                latent = torch.empty_like(p, memory_format=torch.contiguous_format)
                state["latent"] = latent
            Q = state.get("quants")
            fresh = update or Q is None  # a parameter added mid-training has no levels yet
            q_shape = (layout.rows, K) if layout.grouped else (K,)
            if fresh and not _reusable(Q, q_shape, p.device):
                Q = state["quants"] = torch.empty(q_shape, dtype=torch.float32, device=p.device)
            rows = p.view(shape2d) if p.is_contiguous() else p.contiguous().view(shape2d)
            buckets.setdefault((p.device, p.dtype, fresh), []).append(
                (j, p, rows, latent.view(shape2d), Q.view(-1, K))
            )
        for (device, _dtype, fresh), items in buckets.items():
            flags = torch.zeros(len(items), dtype=torch.int32, device=device)
            quant_prox_(
                [it[2] for it in items],
                [it[3] for it in items],
                [it[4] for it in items],
                flags,
                int(kind),
                bits,
                list(qargs),
                quantizer.center,
                fresh,
                int(prox_kind),
                float(prox_arg),
                float(gamma),
                self.backend or "",
            )
            for _, p, rows, _, _ in items:
                if not p.is_contiguous():
                    p.copy_(rows.view(p.shape))
            if fresh and self.check_finite and bool(flags.any()):
                bad = int(flags.nonzero()[0, 0])
                j, p = items[bad][0], items[bad][1]
                self._raise_nonfinite(index, j, p)
        return rho

    # -- torchao interop (torchao.prototype.parq's surface; parq.export) ---------

    def get_filter_fns(self, model: torch.nn.Module) -> Iterator[Callable[..., bool]]:
        """One ``filter_fn(module, *args)`` per quantized group, in order: true for a
        module owning one of the group's parameters (``torchao.quantization.quantize_``)."""
        from parq.export.torchao_convert import get_filter_fns

        return get_filter_fns(self, model)

    def torchao_convert(
        self, model: torch.nn.Module, weight_only: bool = False, embed_weight_only: bool = False
    ) -> None:
        """Convert ``model`` in place to torchao's quantized tensors, as torchao's PARQ
        does (needs ``torchao``: ``pip install "parq[torchao]"``); see
        :mod:`parq.export.torchao_convert`."""
        from parq.export.torchao_convert import torchao_convert

        torchao_convert(self, model, weight_only=weight_only, embed_weight_only=embed_weight_only)

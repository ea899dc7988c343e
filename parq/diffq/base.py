"""``BaseQuantizer``: what every DiffQ-compatible quantizer shares (SPEC.md §11).

* Which parameters: ``numel > min_size * 2**20 // 4`` and no ``fnmatch`` pattern of
  ``exclude`` matching the full name (``"layer.0.weight"``) or the bare name
  (``"weight"``); with ``detect_bound=True`` a parameter reachable from several modules
  (tied weights) is handled once.
* Hooks on the model: a forward pre-hook computes the weights every owning module sees
  (noisy / quantized, all parameters at once) and places them on the modules as instance
  attributes, which shadow the registered parameters; a forward hook removes them. The
  user's model code is unchanged and ``parameters()`` / ``state_dict()`` keep the latent
  weights. Calling a submodule on its own uses the latent weights.
* Sizes (MB = ``2**23`` bits), the optimizer set-up, and the quantized state.
"""

from __future__ import annotations

import fnmatch
import io
import math
import numbers
import zlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class QParam:
    """A quantized parameter: its full name, the tensor, every ``(module, attr)`` that
    holds it, and the quantizer's own tensors (``logit``: DiffQ's logits, LSQ's step)."""

    name: str
    param: nn.Parameter
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    logit: nn.Parameter | None = None


def _check_float(name: str, value, low: float | None = None) -> float:
    """``float(value)`` for a real number (numpy scalars and 1-element tensors too), else
    ``TypeError``; ``ValueError`` for NaN / Inf and below ``low``."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if low is not None and not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    """``int(value)`` for an integer in ``[low, high]`` (numpy integers too), else
    ``ValueError`` naming ``name``."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return int(value)


class BaseQuantizer:
    """Base of :class:`DiffQuantizer`, :class:`UniformQuantizer` and :class:`LSQ`."""

    needs_optimizer = False  # a training forward raises until setup_optimizer / no_optimizer

    def __init__(
        self,
        model: nn.Module,
        min_size: float = 0.01,
        float16: bool = False,
        exclude: list[str] | tuple[str, ...] = (),
        detect_bound: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.min_size = _check_float("min_size", min_size, 0.0)
        if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
            raise TypeError("exclude must be a list of fnmatch patterns (strings)")
        self.model = model
        self.float16 = bool(float16)
        self.exclude = list(exclude)
        self.detect_bound = bool(detect_bound)
        self.opt: torch.optim.Optimizer | None = None
        self._optimizer_setup = False
        self._qparams: list[QParam] = []
        self._others: list[tuple[str, nn.Parameter]] = []
        self._placed: list[tuple[nn.Module, str]] = []
        self._select()
        self._pre_handle = model.register_forward_pre_hook(self._forward_pre_hook)
        self._post_handle = model.register_forward_hook(self._forward_hook, always_call=True)

    # -- which parameters ------------------------------------------------------------
    def _quantizable(self, full: str, bare: str, p: Tensor) -> bool:
        if p.numel() <= self.min_size * 2**20 // 4:
            return False
        return not any(fnmatch.fnmatch(full, pat) or fnmatch.fnmatch(bare, pat)
                       for pat in self.exclude)  # fmt: skip

    def _select(self) -> None:
        seen: dict[int, QParam | None] = {}
        for mod_name, module in self.model.named_modules(remove_duplicate=False):
            for bare, p in list(module._parameters.items()):
                if p is None:
                    continue
                full = f"{mod_name}.{bare}" if mod_name else bare
                if self.detect_bound and id(p) in seen:
                    qp = seen[id(p)]
                    if qp is not None and (module, bare) not in qp.owners:
                        qp.owners.append((module, bare))
                    continue
                if self._quantizable(full, bare, p):
                    qp = QParam(full, p, [(module, bare)])
                    self._qparams.append(qp)
                    seen[id(p)] = qp
                else:
                    self._others.append((full, p))
                    seen[id(p)] = None

    def _register(self, qp: QParam, suffix: str, value: Tensor) -> nn.Parameter:
        """Register ``value`` as ``<name><suffix>`` on the first owner of ``qp`` (a
        parameter of that name and shape already there is kept, with its value)."""
        module, bare = qp.owners[0]
        param = module._parameters.get(bare + suffix)
        if param is None or param.shape != value.shape:
            param = nn.Parameter(value.to(qp.param.device))
            module.register_parameter(bare + suffix, param)
        qp.logit = param
        return param

    # -- hooks ---------------------------------------------------------------------
    def _forward_pre_hook(self, module: nn.Module, inputs) -> None:
        if not self._qparams:
            return
        if self.model.training:
            if self.needs_optimizer and not self._optimizer_setup:
                raise RuntimeError(f"{type(self).__name__}: call setup_optimizer(optimizer) or "
                                   "no_optimizer() before training")  # fmt: skip
            weights = self._train_weights()
        else:
            with torch.no_grad():
                weights = self._eval_weights()
        if weights is None:
            return
        for qp, w in zip(self._qparams, weights, strict=True):
            for owner, attr in qp.owners:
                owner.__dict__[attr] = w
                self._placed.append((owner, attr))

    def _forward_hook(self, module: nn.Module, inputs, output) -> None:
        for owner, attr in self._placed:
            owner.__dict__.pop(attr, None)
        self._placed.clear()

    def _train_weights(self) -> list[Tensor] | None:
        """The weights of a training forward (``None``: the latent ones)."""
        raise NotImplementedError

    def _eval_weights(self) -> list[Tensor]:
        """The true quantized weights (one per quantized parameter)."""
        raise NotImplementedError

    def detach(self) -> None:
        """Remove the hooks: the model runs on its latent weights again."""
        self._pre_handle.remove()
        self._post_handle.remove()
        self._forward_hook(self.model, (), None)

    # -- optimizer -----------------------------------------------------------------
    def _extra_params(self) -> list[nn.Parameter]:
        return [qp.logit for qp in self._qparams if qp.logit is not None]

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, lr: float = 1e-3, **kwargs) -> None:
        """Move the quantizer's own parameters (logits, steps) out of the groups of
        ``optimizer`` into a new group with ``lr`` and ``weight_decay=0`` (``kwargs`` go
        into that group too)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")  # fmt: skip
        lr = _check_float("lr", lr, 0.0)
        if self._optimizer_setup:
            raise RuntimeError("setup_optimizer / no_optimizer was already called")
        extra = self._extra_params()
        ids = {id(p) for p in extra}
        for group in optimizer.param_groups:
            group["params"][:] = [p for p in group["params"] if id(p) not in ids]
        if extra:
            optimizer.add_param_group({"params": extra, "lr": lr, "weight_decay": 0, **kwargs})
        self.opt = optimizer
        self._optimizer_setup = True

    def no_optimizer(self) -> None:
        """Train without an optimizer for the quantizer's parameters (they stay fixed
        unless the user optimizes them)."""
        self.opt = None
        self._optimizer_setup = True

    # -- sizes ---------------------------------------------------------------------
    def _qparam_size(self, qp: QParam, exact: bool) -> Tensor:
        """Bits of one quantized parameter (differentiable when not ``exact``)."""
        raise NotImplementedError

    def model_size(self, exact: bool = False) -> Tensor:
        """The model size in MB (``2**23`` bits), differentiable unless ``exact``."""
        per = 16 if self.float16 else 32
        device = self._qparams[0].param.device if self._qparams else None
        total = torch.tensor(float(sum(per * p.numel() for _, p in self._others)), device=device)
        for qp in self._qparams:
            total = total + self._qparam_size(qp, exact).to(total.device)
        return total / 2**23

    def true_model_size(self) -> float:
        """``model_size(exact=True)`` as a float (MB)."""
        return float(self.model_size(exact=True).detach())

    # -- quantized state -------------------------------------------------------------
    def _init_kwargs(self) -> dict:
        return {"min_size": self.min_size, "float16": self.float16, "exclude": self.exclude,
                "detect_bound": self.detect_bound}  # fmt: skip

    def _quantized_entries(self, packed: bool) -> list[dict]:
        raise NotImplementedError

    def _restore_entries(self, entries: list[dict]) -> None:
        raise NotImplementedError

    def get_quantized_state(self, packed: bool = True) -> dict:
        """The quantized model as a dict of tensors: per quantized parameter its integer
        levels (bit-packed with the §10 ops when ``packed``) and what dequantizes them,
        the other parameters (float16 when ``float16``), and how to rebuild the quantizer."""
        others = [p.detach().half() if self.float16 else p.detach().clone()
                  for _, p in self._others]  # fmt: skip
        return {
            "format": "parq.diffq",
            "version": 1,
            "packed": bool(packed),
            "quantized": self._quantized_entries(bool(packed)),
            "others": others,
            "meta": {"klass": type(self).__name__, "init_kwargs": self._init_kwargs()},
        }

    def restore_quantized_state(self, state: dict) -> None:
        """Write the weights held by ``state`` (from :meth:`get_quantized_state`) into
        the model."""
        if not isinstance(state, dict) or "quantized" not in state or "others" not in state:
            raise ValueError("state must be a dict from get_quantized_state()")
        if "meta" in state and "format" not in state:  # diffq_files.is_diffq_state
            raise ValueError("state was written by the public diffq package: restore it with "
                             "parq.diffq.restore_quantized_state(model, state)")  # fmt: skip
        if len(state["quantized"]) != len(self._qparams) or len(state["others"]) != len(
            self._others
        ):
            raise ValueError(f"state holds {len(state['quantized'])} quantized and "
                             f"{len(state['others'])} other parameters, the model "
                             f"{len(self._qparams)} and {len(self._others)}")  # fmt: skip
        with torch.no_grad():
            for (name, p), value in zip(self._others, state["others"], strict=True):
                if value.shape != p.shape:
                    raise ValueError(f"state: {name} has shape {tuple(value.shape)}, the "
                                     f"model {tuple(p.shape)}")  # fmt: skip
            self._restore_entries(state["quantized"])
            for (_, p), value in zip(self._others, state["others"], strict=True):
                p.copy_(value)

    def _serialized(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.get_quantized_state(packed=True), buf)
        return buf.getvalue()

    def packed_model_size(self) -> float:
        """Size of the serialized packed state (``torch.save``), in MB."""
        return len(self._serialized()) / 2**20

    def compressed_model_size(self, compress_level: int = -1, num_workers: int = 8) -> float:
        """zlib size of the serialized packed state, in MB (``num_workers`` is accepted for
        the public signature; the state is compressed in one piece)."""
        return len(zlib.compress(self._serialized(), compress_level)) / 2**20

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self._qparams)} quantized parameters, "
                f"{len(self._others)} others)")  # fmt: skip

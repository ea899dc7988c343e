"""Range observers for fake quantization (SPEC.md §12).

An observer records the range of the tensors it is shown and reports ``(min, max)``:

* ``observe_batch(x)``: record the range of ``x`` (no gradient);
* ``get_ranges() -> (min, max)``: float32 tensors, 0-d (per tensor) or ``(C,)`` with
  ``per_channel=True`` (one range per slice ``x[c]`` along axis 0, e.g. per output
  channel of a ``(C_out, C_in, kh, kw)`` weight); reading before any observation raises
  :class:`ObserverNotReadyError`;
* ``force_ranges(min, max)``: set the range by hand (numbers or tensors).

:class:`BatchMinMax` reports the range of the last tensor observed;
:class:`ExpAvgMinMax` an exponential moving average of the batch ranges, zero-initialised
and bias-corrected: ``r_t = m r_{t-1} + (1 - m) x_t``, reported as ``r_t / (1 - m^t)``.
The correction ``c_t = 1 - m^t`` is kept as the same running average of ones
(``c_t = m c_{t-1} + (1 - m)``), so ``force_ranges`` sets ``r = value, c = 1`` and later
observations continue the average from the forced range.
A batch whose range is not finite (a NaN or an Inf anywhere in ``x``, e.g. the forward of
an fp16 step that the GradScaler then skips) is skipped by :class:`ExpAvgMinMax`: the
average and its correction stay as they were (per channel, the whole batch is skipped), so
one bad batch cannot poison the range for good; until a finite batch has been observed the
range reads ``[0, 0]``. The skip is a ``torch.where`` on device, with no host sync.
:class:`BatchMinMax` keeps no history: it reports the bad batch's range and recovers at the
next one.

The ranges are buffers (saved in ``state_dict``; a state dict of any number of channels
loads). Reductions are one ``torch.aminmax`` pass, in float32; updates are in place
after the first observation, so a compiled model does not recompile per step.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn


class ObserverNotReadyError(RuntimeError):
    """``get_ranges()`` was called before any ``observe_batch()`` / ``force_ranges()``."""


def batch_range(x: Tensor, per_channel: bool) -> tuple[Tensor, Tensor]:
    """``(min, max)`` of ``x`` in float32: 0-d, or ``(x.size(0),)`` per channel (axis 0)."""
    if x.numel() == 0:
        raise ValueError(f"observe_batch: x is empty (shape {tuple(x.shape)})")
    x = x.detach()
    if per_channel:
        if x.dim() == 0:
            raise ValueError("observe_batch: a per-channel observer needs x.dim() >= 1, got 0-d")
        mn, mx = torch.aminmax(x.reshape(x.size(0), -1), dim=1)
    else:
        mn, mx = torch.aminmax(x)
    return mn.float(), mx.float()


class Observer(nn.Module):
    """Base class: keeps ``per_channel`` and the readiness flag; subclasses implement
    :meth:`observe_batch`, :meth:`_ranges` and :meth:`_force`."""

    _range_buffers: tuple[str, ...] = ()

    def __init__(self, per_channel: bool = False) -> None:
        super().__init__()
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {type(per_channel).__name__}")
        self.per_channel = per_channel
        self._ready = False  # a Python flag: flips once, so a compiled model recompiles once

    @property
    def ready(self) -> bool:
        """Whether ranges can be read (something was observed, forced or loaded)."""
        return self._ready

    def observe_batch(self, x: Tensor) -> None:
        raise NotImplementedError

    def _ranges(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _force(self, mn: Tensor, mx: Tensor) -> None:
        raise NotImplementedError

    def get_ranges(self) -> tuple[Tensor, Tensor]:
        """``(min, max)``, float32, 0-d or ``(C,)`` (module doc)."""
        if not self._ready:
            raise ObserverNotReadyError(
                f"{type(self).__name__}.get_ranges() before any observe_batch() or "
                "force_ranges(): run a calibration or quantization-aware training forward "
                "(a state that observes) or force the ranges first"
            )
        return self._ranges()

    def force_ranges(self, min: float | Tensor, max: float | Tensor) -> None:  # noqa: A002
        """Set the reported range to ``(min, max)`` (numbers, 0-d or ``(C,)`` tensors)."""
        device = next((b.device for b in self.buffers()), torch.device("cpu"))
        vals = []
        for name, v in (("min", min), ("max", max)):
            if not isinstance(v, Tensor):
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"force_ranges: {name} must be a number or a tensor, got "
                                    f"{type(v).__name__}")  # fmt: skip
                v = torch.tensor(float(v), device=device)
            vals.append(v.detach().to(device=device, dtype=torch.float32))
        mn, mx = torch.broadcast_tensors(*vals)
        if not bool(torch.isfinite(mn).all() and torch.isfinite(mx).all()):
            raise ValueError("force_ranges: min and max must be finite")
        if bool((mn > mx).any()):
            raise ValueError("force_ranges: needs min <= max")
        if mn.dim() > 1 or (mn.dim() == 1 and not self.per_channel):
            raise ValueError(
                f"force_ranges: a {'per-channel' if self.per_channel else 'per-tensor'} "
                f"observer takes {'0-d or (C,)' if self.per_channel else '0-d'} ranges, "
                f"got shape {tuple(mn.shape)}"
            )
        self._force(mn.clone(), mx.clone())
        self._ready = True

    def _set(self, name: str, value: Tensor) -> None:
        """Write buffer ``name``: in place when the shape matches, else replace it."""
        buf = getattr(self, name)
        if buf.shape == value.shape and buf.device == value.device:
            buf.copy_(value)
        else:
            setattr(self, name, value.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._range_buffers:  # ranges of any shape load (channels vary)
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = self._loaded_ready()

    def _loaded_ready(self) -> bool:
        return all(getattr(self, n).numel() > 0 for n in self._range_buffers)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}"


class BatchMinMax(Observer):
    """Reports the min / max of the last tensor observed (per tensor or per channel)."""

    _range_buffers = ("min_val", "max_val")

    def __init__(self, per_channel: bool = False) -> None:
        super().__init__(per_channel)
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @torch.no_grad()
    def observe_batch(self, x: Tensor) -> None:
        mn, mx = batch_range(x, self.per_channel)
        self._set("min_val", mn)
        self._set("max_val", mx)
        self._ready = True

    def _ranges(self) -> tuple[Tensor, Tensor]:
        return self.min_val, self.max_val

    def _force(self, mn: Tensor, mx: Tensor) -> None:
        self._set("min_val", mn)
        self._set("max_val", mx)


class ExpAvgMinMax(Observer):
    """Bias-corrected exponential moving average of the batch min / max (module doc).

    ``momentum`` ``m`` in ``[0, 1)``: the weight of the past (``m = 0`` is
    :class:`BatchMinMax`). Per channel, every batch must have the same number of
    channels."""

    _range_buffers = ("ema_min", "ema_max", "correction")

    def __init__(self, momentum: float = 0.9, per_channel: bool = False) -> None:
        super().__init__(per_channel)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
            raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("ema_min", torch.empty(0))
        self.register_buffer("ema_max", torch.empty(0))
        self.register_buffer("correction", torch.empty(0))  # 1 - m^t

    @torch.no_grad()
    def observe_batch(self, x: Tensor) -> None:
        mn, mx = batch_range(x, self.per_channel)
        m = self.momentum
        if not self._ready:  # zero-initialised average
            for name, like in (("ema_min", mn), ("ema_max", mx)):
                self._set(name, torch.zeros_like(like))
            self._set("correction", torch.zeros((), device=mn.device))
        elif self.ema_min.shape != mn.shape:
            if self.ema_min.dim() != 0:
                raise ValueError(
                    f"ExpAvgMinMax(per_channel=True) observed {self.ema_min.numel()} "
                    f"channels before, got {mn.numel()}"
                )
            for name in ("ema_min", "ema_max"):  # a forced 0-d range, per channel from now on
                self._set(name, getattr(self, name).expand_as(mn))
        finite = torch.isfinite(mn).all() & torch.isfinite(mx).all()  # else skip (module doc)
        for name, stat in (("ema_min", mn), ("ema_max", mx), ("correction", None)):
            buf = getattr(self, name)
            new = buf * m + ((1.0 - m) if stat is None else stat * (1.0 - m))
            buf.copy_(torch.where(finite, new, buf))
        self._ready = True

    def _ranges(self) -> tuple[Tensor, Tensor]:
        c = self.correction.clamp_min(torch.finfo(torch.float32).tiny)  # 0 until a finite batch
        return self.ema_min / c, self.ema_max / c

    def _force(self, mn: Tensor, mx: Tensor) -> None:
        self._set("ema_min", mn)
        self._set("ema_max", mx)
        self._set("correction", torch.ones((), device=mn.device))

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, per_channel={self.per_channel}"


__all__ = ["Observer", "BatchMinMax", "ExpAvgMinMax", "ObserverNotReadyError", "batch_range"]

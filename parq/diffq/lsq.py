"""``LSQ``: learned step size quantization (Esser et al., 2020), SPEC.md §11.

One learned step ``s`` per tensor, registered as ``<name><suffix>`` and initialised to
``2 * mean|w| / sqrt(2^(b-1))``, at least float32's ``tiny`` (an all-zero weight would
give ``0 / 0`` in ``w / s``); its gradient is scaled by ``g = 1 / sqrt(n * (2^(b-1) -
1))``; ``w_q = round_ste(clamp(w / s, -2^(b-1), 2^(b-1) - 1)) * s`` in training and eval.
Size: ``bits * n + 32`` per parameter (the levels and one float32 step). The work is a
handful of elementwise torch ops per parameter (no fused op).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from parq.diffq.base import BaseQuantizer, QParam, _check_int
from parq.diffq.state import pack_levels, restore_entries
from parq_kernels.reference_diffq import MAX_QUANT_BITS


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """``x`` in the forward, its gradient multiplied by ``scale``."""
    y = x * scale
    return (x - y).detach() + y


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` with the identity gradient."""
    return (x.round() - x).detach() + x


class LSQ(BaseQuantizer):
    """Learned step size quantization to ``bits`` (integer, 2..15) bits."""

    needs_optimizer = True

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        min_size: float = 0.01,
        float16: bool = False,
        suffix: str = "_lsq",
        exclude: list[str] | tuple[str, ...] = (),
        detect_bound: bool = True,
    ) -> None:
        bits = _check_int("bits", bits, 2, MAX_QUANT_BITS)
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"suffix must be a non-empty string, got {suffix!r}")
        self.bits, self.suffix = bits, suffix
        super().__init__(model, min_size, float16, exclude, detect_bound)
        for qp in self._qparams:
            w = qp.param.detach().float()
            step = 2 * w.abs().mean() / math.sqrt(2 ** (bits - 1))
            step = step.clamp_min(torch.finfo(torch.float32).tiny)  # all-zero w: 0 / 0
            self._register(qp, suffix, step.reshape(1))

    def _init_kwargs(self) -> dict:
        return super()._init_kwargs() | {"bits": self.bits, "suffix": self.suffix}

    @property
    def _qmin_qmax(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    def _levels(self, qp: QParam, step: Tensor) -> Tensor:
        lo, hi = self._qmin_qmax
        return round_ste(torch.clamp(qp.param / step, lo, hi))

    def _quantize(self, qp: QParam) -> Tensor:
        g = 1 / math.sqrt(max(1, qp.param.numel()) * self._qmin_qmax[1])
        step = grad_scale(qp.logit, g)
        return (self._levels(qp, step) * step).to(qp.param.dtype)

    def _train_weights(self) -> list[Tensor]:
        return [self._quantize(qp) for qp in self._qparams]

    def _eval_weights(self) -> list[Tensor]:
        return [self._quantize(qp) for qp in self._qparams]

    def _qparam_size(self, qp: QParam, exact: bool) -> Tensor:
        return torch.tensor(self.bits * qp.param.numel() + 32.0)

    def _quantized_entries(self, packed: bool) -> list[dict]:
        entries = []
        with torch.no_grad():
            for qp in self._qparams:
                level = self._levels(qp, qp.logit) - self._qmin_qmax[0]
                entries.append({"shape": list(qp.param.shape), "dtype": str(qp.param.dtype),
                                "group_size": max(1, qp.param.numel()),
                                "bits": torch.tensor([self.bits], dtype=torch.uint8),
                                "step": qp.logit.detach().float().reshape(()).clone().cpu(),
                                "levels": level.reshape(-1).to(torch.int16).cpu()})  # fmt: skip
        if packed:
            pack_levels(entries)
        return entries

    def _restore_entries(self, entries: list[dict]) -> None:
        restore_entries(self._qparams, entries)

"""``UniformQuantizer``: fixed-bit per-tensor min-max quantization (SPEC.md §11).

Levels ``mn + k / (2^b - 1) * (mx - mn)``, ``k = 0..2^b - 1``, per tensor; eval uses the
quantized weights, training the latent ones, or (``qat=True``) the quantized ones with
a straight-through gradient. The per-element work is the fused ``diffq_quantize_`` op
with one group per tensor and its bits pinned to ``b`` (``extra_bits = b - 1`` over a
logit whose bits are exactly ``min_bits = 1``). Size: ``bits * n + 64`` per parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from parq.diffq.base import BaseQuantizer, QParam, _check_float
from parq.diffq.functions import GroupConfig, StraightThrough, true_quantize
from parq.diffq.state import minmax_entry, pack_levels, restore_entries
from parq_kernels.reference_diffq import MAX_QUANT_BITS, PARAM_BITS

_PINNED_LOGIT = -1e4  # sigmoid gives exactly 0 in float32: the bits are min_bits


class UniformQuantizer(BaseQuantizer):
    """Per-tensor min-max quantization to ``bits`` bits (``round(bits)`` levels bits,
    1..15), with the arguments of the public ``diffq`` package."""

    def __init__(
        self,
        model: nn.Module,
        bits: float = 8.0,
        min_size: float = 0.01,
        float16: bool = False,
        qat: bool = False,
        exclude: list[str] | tuple[str, ...] = (),
        detect_bound: bool = True,
    ) -> None:
        bits = _check_float("bits", bits, 1.0)
        if bits > MAX_QUANT_BITS:
            raise ValueError(f"bits must be in [1, {MAX_QUANT_BITS}], got {bits}")
        self.bits, self.qat = bits, bool(qat)
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def _init_kwargs(self) -> dict:
        return super()._init_kwargs() | {"bits": self.bits, "qat": self.qat}

    def _quantize(self, with_levels: bool = False) -> tuple[list[Tensor], list[Tensor], Tensor]:
        weights = [qp.param for qp in self._qparams]
        logits = [torch.full((1,), _PINNED_LOGIT, device=w.device) for w in weights]
        cfg = GroupConfig(tuple(max(1, w.numel()) for w in weights), 1.0, 2.0, PARAM_BITS,
                          float(round(self.bits)) - 1.0)  # fmt: skip
        return true_quantize(weights, logits, cfg, with_levels)

    def _train_weights(self) -> list[Tensor] | None:
        if not self.qat:
            return None
        with torch.no_grad():
            quantized = self._quantize()[0]
        return list(StraightThrough.apply(quantized, *[qp.param for qp in self._qparams]))

    def _eval_weights(self) -> list[Tensor]:
        return self._quantize()[0]

    def _qparam_size(self, qp: QParam, exact: bool) -> Tensor:
        return torch.tensor(self.bits * qp.param.numel() + 64.0)

    def _quantized_entries(self, packed: bool) -> list[dict]:
        if not self._qparams:
            return []
        _, levels, minmax = self._quantize(with_levels=True)
        entries = []
        for qp, lv, (mn, mx) in zip(self._qparams, levels, minmax, strict=True):
            bits = torch.tensor([round(self.bits)], dtype=torch.uint8)
            entries.append(minmax_entry(qp.param, max(1, qp.param.numel()), bits, mn, mx, lv))
        if packed:
            pack_levels(entries)
        return entries

    def _restore_entries(self, entries: list[dict]) -> None:
        restore_entries(self._qparams, entries)

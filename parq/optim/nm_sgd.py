"""NM-SGD: QuantOptimizer with a fixed shrink and latent corrections (SPEC.md §5)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from parq.optim.proxmap import ProxMap
from parq.optim.quantopt import QuantOptimizer
from parq.quant.quantizer import Quantizer


class NMSGDOptimizer(QuantOptimizer):
    """QuantOptimizer whose shrink divisor is ``nm_gamma`` and which feeds the
    last projection's error back: after the base step,
    ``p -= (lr / nm_gamma) * (latent - p_projected)``.

    Positional arguments as in the public release (``nm_gamma`` is the 9th);
    ``group_quantizer_map`` and the other :class:`QuantOptimizer` extras are
    keyword-only.
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
        nm_gamma: float = 0.0,
        *,
        group_quantizer_map: dict[int, Quantizer] | None = None,
        **kwargs,
    ) -> None:
        if not nm_gamma > 0:
            raise ValueError(f"NMSGDOptimizer needs nm_gamma > 0, got {nm_gamma}")
        self.nm_gamma = nm_gamma
        super().__init__(
            base_optimizer, quantizer, prox_map, warmup_steps, quant_period,
            quant_per_channel, quant_shrink, anneal_wd_frac, group_quantizer_map, **kwargs,
        )  # fmt: skip

    def _shrink_gamma(self, group: dict) -> float:
        return self.nm_gamma

    def _fused_step_reason(self, group: dict, params: list[Tensor]) -> str:
        # the correction needs the projected weights of the last step, which the fused
        # step overwrites before reading: NM-SGD runs the base step, then the fused prox
        return "NM-SGD latent corrections"

    def _corrections(self, params: list[Tensor], latents: list[Tensor]) -> dict[Tensor, Tensor]:
        if not params:
            return {}
        return dict(zip(params, torch._foreach_sub(latents, params), strict=True))

    def _apply_corrections(self, group: dict, params: list[Tensor], corrections: dict) -> None:
        todo = [p for p in params if p in corrections]
        if todo:
            scale = float(group["lr"]) / self.nm_gamma
            torch._foreach_sub_(todo, torch._foreach_mul([corrections[p] for p in todo], scale))

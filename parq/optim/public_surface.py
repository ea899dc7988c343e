"""The public releases' methods of ``QuantOptimizer`` beyond ``torch.optim``'s surface.

The latent helpers of the public PARQ release (``restore_latent_params``,
``save_latent_params``, ``quantize_``) and ``torchao.prototype.parq``'s interop
(``get_filter_fns``, ``torchao_convert``: :mod:`parq.optim.torchao_convert`), as a
mixin of :class:`parq.optim.QuantOptimizer`, which provides ``state`` and
``_quantized_params``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from parq.optim import shard_plan
from parq.optim import torchao_convert as torchao_conversion
from parq.quant.quantizer import Quantizer


class PublicSurface:
    """Mixin: the public releases' helpers (module doc)."""

    @torch.no_grad()
    def restore_latent_params(self) -> None:
        """``p = latent`` for every quantized parameter with ``requires_grad`` (e.g. to
        evaluate or save the full-precision model); ``step()`` projects them again."""
        for _, _, params in self._quantized_params():
            for p in params:
                latent = self.state[p].get("latent") if p in self.state else None
                if latent is not None:
                    shard_plan.local_tensors([p])[0].copy_(shard_plan.local_tensors([latent])[0])

    @torch.no_grad()
    def save_latent_params(self) -> None:
        """``latent = p`` for every quantized parameter with ``requires_grad``."""
        for _, _, params in self._quantized_params():
            for p in params:
                state = self.state[p]
                latent = state.get("latent")
                if latent is None or latent.shape != p.shape or latent.dtype != p.dtype:
                    state["latent"] = p.detach().clone(memory_format=torch.contiguous_format)
                else:
                    shard_plan.local_tensors([latent])[0].copy_(shard_plan.local_tensors([p])[0])

    @staticmethod
    def quantize_(
        p: Tensor, quants: Tensor, quantizer: Quantizer, b: int, dim: int | None = None
    ) -> Tensor:
        """``(q, Q) = quantizer.quantize(p, b, dim)``; copies ``Q`` into ``quants``; returns
        ``q`` (the public release's helper)."""
        q, Q = quantizer.quantize(p, b, dim=dim)
        quants.copy_(Q)
        return q

    # torchao interop (torchao.prototype.parq's surface; parq.optim.torchao_convert)

    def get_filter_fns(self, model: torch.nn.Module) -> Iterator[Callable[..., bool]]:
        """One ``filter_fn(module, *args)`` per quantized group, in order: true for a
        module owning one of the group's parameters (``torchao.quantization.quantize_``)."""
        return torchao_conversion.get_filter_fns(self, model)

    def torchao_convert(
        self, model: torch.nn.Module, weight_only: bool = False, embed_weight_only: bool = False
    ) -> None:
        """Convert ``model`` in place to torchao's quantized tensors, as torchao's PARQ
        does (needs ``torchao``: ``pip install "torchao==0.18.0"``); see
        :mod:`parq.optim.torchao_convert`."""
        torchao_conversion.torchao_convert(
            self, model, weight_only=weight_only, embed_weight_only=embed_weight_only
        )

"""BinaryConnect: hard-quantized weights over clipped latent weights (SPEC.md §9)."""

from __future__ import annotations

from parq.optim.proxmap import KernelProxMap
from parq_kernels.ops import ProxKind


class ProxBinaryConnect(KernelProxMap):
    """``p = hard(x)``, and the latent is clipped to its row's level range,
    ``latent = clamp(latent, Q_0, Q_{K-1})``, after every base update (BinaryConnect's
    clipped latent weights, for any quantizer and bit width). With ``quant_shrink`` the
    latent is unshrunk and its range is ``gamma [Q_0, Q_{K-1}]``.

    :meth:`apply_` alone (outside :class:`~parq.optim.QuantOptimizer`) only projects
    ``p``: the latent lives in the optimizer, whose every path applies the clamp
    (:attr:`clamps_latent`).
    """

    #: The optimizer clamps the latents of a map with this flag (the generic path too).
    clamps_latent = True

    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        return ProxKind.BINARYCONNECT, 0.0, None

    def __repr__(self) -> str:
        return "ProxBinaryConnect()"

"""The ``ProxMap`` extension point, the built-ins' shared machinery, and hard quantization."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from parq.quant.quantizer import from_rows, rows_view
from parq_kernels import reference
from parq_kernels.ops import ProxKind

TINY = torch.finfo(torch.float32).tiny


class ProxMap(ABC):
    """Projects weights toward the quantization levels, in place.

    ``apply_(p, q, Q, step_count, dim)`` receives the quantizer's output ``q``
    on quantization-update steps (``None`` otherwise) and the level set ``Q``
    (``(K,)`` for ``dim=None``, else ``(groups, K)``). It may return a float
    (ProxPARQ returns the inverse slope). Subclass it for a new map; the
    optimizer then calls it per parameter (the generic path).
    """

    @abstractmethod
    def apply_(
        self, p: Tensor, q: Tensor | None, Q: Tensor, step_count: int, dim: int | None = None
    ) -> float | None:
        """Modify ``p`` in place."""

    def begin_group(self, group: dict) -> None:  # noqa: B027 (an optional hook)
        """Called by the optimizer before it projects a parameter group (``group`` is its
        ``param_groups`` entry); maps whose schedule depends on the group (ProxQuant's
        lr scaling) read it here. No-op by default."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class KernelProxMap(ProxMap):
    """A built-in map: a host-side ``schedule`` plus the reference/fused math."""

    @abstractmethod
    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        """``(kind, arg, returned)`` for this step: the fused op's ``prox_kind``
        and ``prox_arg``, and what :meth:`apply_` returns."""

    def apply_(
        self, p: Tensor, q: Tensor | None, Q: Tensor, step_count: int, dim: int | None = None
    ) -> float | None:
        kind, arg, returned = self.schedule(step_count)
        x = rows_view(p, dim)
        Q_rows = Q.detach().float().reshape(-1, Q.size(-1))  # (rows, K); rows may be 0
        q_rows = rows_view(q, dim) if q is not None else None
        y = reference.apply_prox(x, q_rows, Q_rows, kind, arg)
        with torch.no_grad():
            p.copy_(from_rows(y, p, dim))
        return returned


class AnnealedProxMap(KernelProxMap):
    """A map annealed from ``anneal_start`` to ``anneal_end`` (in optimizer steps)."""

    def __init__(self, anneal_start: int, anneal_end: int) -> None:
        if not anneal_start < anneal_end:
            raise ValueError(
                f"{type(self).__name__} needs anneal_start < anneal_end, "
                f"got anneal_start={anneal_start}, anneal_end={anneal_end}"
            )
        self.anneal_start = anneal_start
        self.anneal_end = anneal_end

    def progress(self, step_count: int) -> float:
        """``f = (t - t1) / (t2 - t1)``."""
        return (step_count - self.anneal_start) / (self.anneal_end - self.anneal_start)


class ProxHardQuant(KernelProxMap):
    """``p = hard(p)``: the quantizer's ``q``, or the nearest level of ``Q``."""

    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        return ProxKind.HARD, 0.0, None

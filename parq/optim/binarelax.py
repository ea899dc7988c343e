"""BinaryRelax: a convex combination of p and hard(p), annealed to hard."""

from __future__ import annotations

from parq.optim.proxmap import AnnealedProxMap
from parq_kernels.ops import ProxKind


class ProxBinaryRelax(AnnealedProxMap):
    """``p = (1 - theta) p + theta hard(p)`` with ``theta = (t - t1) / (t2 - t1)``;
    unchanged before ``anneal_start``, hard from ``anneal_end`` on."""

    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        if step_count < self.anneal_start:
            return ProxKind.NONE, 0.0, None
        if step_count >= self.anneal_end:
            return ProxKind.HARD, 0.0, None
        return ProxKind.RELAX, self.progress(step_count), None

"""PARQ: piecewise-affine regularized quantization (SPEC.md §4)."""

from __future__ import annotations

import math

from parq.optim.proxmap import TINY, AnnealedProxMap
from parq_kernels.ops import ProxKind


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _mirror_sigmoid_at(f: float, steepness: float, center: float) -> float:
    """``g(f)`` for progress ``f`` in [0, 1]: 1 at ``f = 0``, 0 at ``f = 1``, steepest at
    ``f = center`` (SPEC.md §4).

    (fix) Normalized for every ``center``; the public release only for 0.5.
    """
    s, c = steepness, center
    low = _sigmoid(-s * (1 - c))
    return (_sigmoid(-s * (f - c)) - low) / (_sigmoid(s * c) - low)


def normalized_mirror_sigmoid(t: float, t1: float, t2: float, s: float, c: float) -> float:
    """The public release's schedule: decreases from 1 at step ``t1`` to 0 at ``t2``.

    ``f = (t - t1) / (t2 - t1)`` is the progress, ``s`` the steepness (almost linear
    for ``s < 1``), ``c`` the progress where it is steepest. Equals the public
    function wherever that one is defined for ``c = 0.5``; (fix) normalized for
    every ``c`` (SPEC.md §4). Needs ``t1 < t2`` and ``t1 <= t <= t2``.
    """
    if not t1 < t2:
        raise ValueError(f"normalized_mirror_sigmoid needs t1 < t2, got t1={t1}, t2={t2}")
    if not t1 <= t <= t2:
        raise ValueError(f"normalized_mirror_sigmoid needs t1 <= t <= t2, got t={t}, [{t1}, {t2}]")
    return _mirror_sigmoid_at((t - t1) / (t2 - t1), s, c)


class ProxPARQ(AnnealedProxMap):
    """Piecewise-affine prox with inverse slope ``rho`` annealed from 1 to 0.

    In each interval ``[lo, hi]`` of ``Q``: ``p = clamp(c + (p - c) / rho, lo, hi)``
    with ``c = (lo + hi) / 2``. :meth:`apply_` returns ``rho`` (1 before
    ``anneal_start``, 0 from ``anneal_end`` on, where ``p`` is hard-quantized).
    """

    def __init__(
        self, anneal_start: int, anneal_end: int, steepness: float = 10, anneal_center: float = 0.5
    ) -> None:
        super().__init__(anneal_start, anneal_end)
        if not steepness > 0:
            raise ValueError(f"ProxPARQ needs steepness > 0, got {steepness}")
        if not 0 <= anneal_center <= 1:
            raise ValueError(f"ProxPARQ needs anneal_center in [0, 1], got {anneal_center}")
        self.steepness = steepness
        self.anneal_center = anneal_center

    def inv_slope(self, step_count: int) -> float:
        """``rho`` for this step."""
        if step_count < self.anneal_start:
            return 1.0
        if step_count >= self.anneal_end:
            return 0.0
        g = _mirror_sigmoid_at(self.progress(step_count), self.steepness, self.anneal_center)
        return max(TINY, g)

    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        rho = self.inv_slope(step_count)
        if step_count < self.anneal_start:
            return ProxKind.NONE, 1.0, rho
        if step_count >= self.anneal_end:
            return ProxKind.HARD, 0.0, rho
        return ProxKind.PARQ, rho, rho

"""Soft quantization: a sigmoid staircase whose temperature rises to hard."""

from __future__ import annotations

from parq.optim.proxmap import AnnealedProxMap
from parq_kernels.ops import ProxKind


class ProxSoftQuant(AnnealedProxMap):
    """Within each interval ``[lo, hi]`` of ``Q``, ``p`` follows a sigmoid of
    temperature ``T = t_start + f**t_power * (t_end - t_start)``; unchanged
    before ``anneal_start``, hard from ``anneal_end`` on (SPEC.md §4)."""

    def __init__(
        self,
        anneal_start: int,
        anneal_end: int,
        t_start: float = 1.0,
        t_end: float = 1e3,
        t_power: float = 1,
    ) -> None:
        super().__init__(anneal_start, anneal_end)
        if not (0 < t_start < t_end):
            raise ValueError(
                f"ProxSoftQuant needs 0 < t_start < t_end, got t_start={t_start}, t_end={t_end}"
            )
        if not t_power > 0:
            raise ValueError(f"ProxSoftQuant needs t_power > 0, got {t_power}")
        self.t_start = t_start
        self.t_end = t_end
        self.t_power = t_power

    def temperature(self, step_count: int) -> float:
        f = self.progress(step_count)
        return self.t_start + f**self.t_power * (self.t_end - self.t_start)

    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        if step_count < self.anneal_start:
            return ProxKind.NONE, 0.0, None
        if step_count >= self.anneal_end:
            return ProxKind.HARD, 0.0, None
        return ProxKind.SOFT, self.temperature(step_count), None

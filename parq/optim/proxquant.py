"""ProxQuant: the proximal step of a W-shaped (l1) or quadratic (l2) regularizer whose
minima are the quantization levels (SPEC.md §9)."""

from __future__ import annotations

import math
from numbers import Integral, Real

from parq.optim.proxmap import KernelProxMap
from parq_kernels.ops import ProxKind

PENALTIES = {"l1": ProxKind.PROXQUANT_L1, "l2": ProxKind.PROXQUANT_L2}


class ProxQuant(KernelProxMap):
    """Proximal step of ``lam_t * R(x)`` toward the levels, with ``h = hard(x)``:

    * ``penalty="l1"``: ``p = h + sgn(x - h) max(|x - h| - lam_t, 0)``;
    * ``penalty="l2"``: ``p = (x + lam_t h) / (1 + lam_t)``.

    ``lam_t = 0`` for ``t < anneal_start``, else
    ``reg_rate * floor((t - anneal_start) / steps_per_epoch)``, times the group's current
    ``lr`` when ``lr_scaled`` (a proximal step of size lr: the optimizer tells the map the
    group it is projecting through :meth:`begin_group`; outside an optimizer lr is 1).
    From ``anneal_end`` on (when given), ``p = hard(x)``. ``lam_t`` is a host-side scalar.
    """

    def __init__(
        self,
        reg_rate: float,
        anneal_start: int = 0,
        anneal_end: int | None = None,
        steps_per_epoch: int = 1,
        penalty: str = "l1",
        lr_scaled: bool = True,
    ) -> None:
        if not (isinstance(reg_rate, Real) and math.isfinite(reg_rate) and reg_rate >= 0):
            raise ValueError(f"ProxQuant needs a finite reg_rate >= 0, got {reg_rate!r}")
        if not isinstance(anneal_start, Integral):
            raise ValueError(f"ProxQuant needs an int anneal_start, got {anneal_start!r}")
        if anneal_end is not None and not (
            isinstance(anneal_end, Integral) and anneal_end > anneal_start
        ):
            raise ValueError(
                f"ProxQuant needs anneal_end None or an int > anneal_start, got "
                f"anneal_start={anneal_start!r}, anneal_end={anneal_end!r}"
            )
        if not (isinstance(steps_per_epoch, Integral) and steps_per_epoch >= 1):
            raise ValueError(
                f"ProxQuant needs an int steps_per_epoch >= 1, got {steps_per_epoch!r}"
            )
        if penalty not in PENALTIES:
            raise ValueError(f"ProxQuant penalty must be 'l1' or 'l2', got {penalty!r}")
        self.reg_rate = float(reg_rate)
        self.anneal_start = int(anneal_start)
        self.anneal_end = None if anneal_end is None else int(anneal_end)
        self.steps_per_epoch = int(steps_per_epoch)
        self.penalty = penalty
        self.lr_scaled = bool(lr_scaled)
        self._lr = 1.0

    def begin_group(self, group: dict) -> None:
        """Remember the group's current ``lr`` (read at every step: schedulers work)."""
        self._lr = float(group.get("lr", 1.0))

    def reg_strength(self, step_count: int) -> float:
        """``lam_t`` for this step (with the lr of the last :meth:`begin_group`)."""
        if step_count < self.anneal_start:
            return 0.0
        epochs = (step_count - self.anneal_start) // self.steps_per_epoch
        lam = self.reg_rate * epochs
        return lam * self._lr if self.lr_scaled else lam

    def schedule(self, step_count: int) -> tuple[ProxKind, float, float | None]:
        if self.anneal_end is not None and step_count >= self.anneal_end:
            return ProxKind.HARD, 0.0, None
        lam = self.reg_strength(step_count)
        if lam == 0.0:  # the prox of the zero regularizer: p unchanged (exactly)
            return ProxKind.NONE, 0.0, None
        return PENALTIES[self.penalty], lam, None

    def __repr__(self) -> str:
        return (
            f"ProxQuant(reg_rate={self.reg_rate!r}, anneal_start={self.anneal_start!r}, "
            f"anneal_end={self.anneal_end!r}, steps_per_epoch={self.steps_per_epoch!r}, "
            f"penalty={self.penalty!r}, lr_scaled={self.lr_scaled!r})"
        )

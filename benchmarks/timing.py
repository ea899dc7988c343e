"""Repeat-and-summarize timing: median and spread of one callable.

Every benchmark in this package times one call at a time (``time.perf_counter``
around the call, with a device synchronize on both sides for CUDA), after a few
untimed warm-up calls, and summarizes the repeats by their median, quartiles
and extremes. Variants that are compared with each other are timed round-robin
(:func:`measure_interleaved`), so that a busy, shared machine skews them alike.
A ``setup`` callable (untimed) runs before every call, so an in-place op can be
reset to the same input each time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed calls."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def summarize(samples: list[float]) -> Timing:
    """Median, quartiles (inclusive method) and extremes of ``samples`` (seconds)."""
    if not samples:
        raise ValueError("summarize needs at least one sample")
    s = sorted(samples)
    if len(s) == 1:
        q1 = q3 = s[0]
    else:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    return Timing(statistics.median(s), q1, q3, s[0], s[-1], len(s))


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    setup: Callable[[], object] | None = None,
) -> Timing:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
    sync = synchronizer(device)
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return summarize(samples)


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 10,
    warmup: int = 2,
    setup: Callable[[], object] | None = None,
) -> dict[str, Timing]:
    """Time several callables round-robin (one call of each per repeat), so that a
    change of machine load during the run affects all of them alike. Each round starts
    one callable later than the one before (rotation), so that no callable always runs
    right after the same other one (whose dirty cache lines it would pay to write back)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats=} {warmup=}")
    sync = synchronizer(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = fns[name]
            if setup is not None:
                setup()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return {name: summarize(s) for name, s in samples.items()}

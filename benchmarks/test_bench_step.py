"""pytest-benchmark view of the issue-4 ``QuantOptimizer.step()`` cases (``step_bench.py``).

8 x Linear(1024, 1024), 2-bit weights, quantization update every step; variants:
the base optimizer alone, the generic (``fused=False``) path, and the fused path
on each available backend. Run with ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import environment, step_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ["base", "generic"] + [f"fused:{b}" for b in environment.benchmark_backends(DEVICE)[0]]
PARAMS = [
    pytest.param(case, variant, id=f"{case.name}-{variant}")
    for case in step_bench.issue4_cases()
    for variant in VARIANTS
]


@pytest.mark.parametrize("case, variant", PARAMS)
def test_step(benchmark, case, variant):
    opt = step_bench.build(case, DEVICE, variant)
    sync = (lambda: torch.cuda.synchronize(DEVICE)) if DEVICE.type == "cuda" else (lambda: None)

    def run():
        opt.step()
        sync()

    nbytes = case.bytes_base if variant == "base" else case.bytes_qat
    benchmark.extra_info.update(bytes=nbytes, numel=case.numel, variant=variant)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    p = opt.param_groups[0]["params"][0]
    assert torch.isfinite(p).all()
    if variant != "base":  # PARQ and hard maps keep every weight within its group's levels
        Q = opt.state[p]["quants"]
        rows = p.detach().float().reshape(Q.size(0) if Q.dim() == 2 else 1, -1)
        Q = Q.reshape(rows.size(0), -1)
        assert Q.size(1) == 4
        assert (rows >= Q[:, :1] - 1e-6).all() and (rows <= Q[:, -1:] + 1e-6).all()

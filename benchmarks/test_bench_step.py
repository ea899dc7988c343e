"""pytest-benchmark view of the headline ``QuantOptimizer.step()`` cases (``step_bench.py``).

8 x Linear(1024, 1024), 2-bit weights (the issue-4 cases, the hard phase, bf16) and 3 / 4
bits, and the headline's model sets in their quick sizes (ResNet-20, ViT-B/16 blocks,
Llama-style blocks, the 4-bit recipe); one timed call = one ``quant_period`` of steps;
variants as in ``step_bench.variants`` (the base optimizer alone, torch's fused base step,
the generic path, the base step + fused prox, the fused step). Run with
``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import environment, step_bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = environment.benchmark_backends(DEVICE)[0]
PARAMS = [
    pytest.param(case, variant, id=f"{case.name}-{variant}")
    for case in step_bench.issue4_cases()
    + step_bench.headline_model_cases(quick=True)
    + step_bench.low_bit_cases()
    + step_bench.hard_phase_cases()
    + step_bench.bf16_cases()
    for variant in step_bench.variants(case, BACKENDS, fused_reference=False)
    if variant != step_bench.STREAM
]


@pytest.mark.parametrize("case, variant", PARAMS)
def test_step(benchmark, case, variant):
    period = step_bench.build(case, DEVICE, variant)
    opt = period.optimizer
    sync = (lambda: torch.cuda.synchronize(DEVICE)) if DEVICE.type == "cuda" else (lambda: None)

    def run():
        period()
        sync()

    benchmark.extra_info.update(bytes=case.bytes(variant), numel=case.numel, variant=variant)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    p = opt.param_groups[0]["params"][0]
    assert torch.isfinite(p).all()
    if not variant.startswith(
        "base"
    ):  # PARQ and hard maps keep every weight within its group's levels
        Q = opt.state[p]["quants"]
        rows = p.detach().float().reshape(Q.size(0) if Q.dim() == 2 else 1, -1)
        Q = Q.reshape(rows.size(0), -1).float()
        assert Q.size(1) == step_bench.QUANTIZERS[case.quantizer]().get_quant_size(case.bits)
        tol = 1e-6 if case.dtype == torch.float32 else 2**-7 * Q.abs().max().item()  # bf16 ulp
        assert (rows >= Q[:, :1] - tol).all() and (rows <= Q[:, -1:] + tol).all()

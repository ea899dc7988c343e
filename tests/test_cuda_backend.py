"""The CUDA kernels of ``parq_kernels._C`` against the reference (SPEC.md §6).

Skipped without a CUDA GPU or without an extension built with CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import (
    DTYPES,
    PROX_CONFIGS,
    QUANT_CONFIGS,
    assert_matches_reference,
    make_rows,
    run_op,
)

from parq_kernels import backends
from parq_kernels.ops import QuantKind

_IMPL, _WHY = backends._load("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _IMPL is None,
    reason=f"no CUDA GPU, or CUDA kernels unavailable: {_WHY or 'no GPU'}",
)

# optimal LSBQ with b in {0, 2} needs a per-row sort: the CUDA kernels reject it
CUDA_QUANT_CONFIGS = [
    qc for qc in QUANT_CONFIGS if not (qc.kind == QuantKind.LSBQ_OPTIMAL and qc.bits != 1)
]
PC = {pc.name: pc for pc in PROX_CONFIGS}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qc", CUDA_QUANT_CONFIGS, ids=lambda c: c.name)
def test_cuda_grid_matches_reference(qc, dtype):
    params = make_rows([(3, 1), (2, 7), (5, 33), (2, 1023), (1, 4097), (0, 4), (2, 0)],
                       dtype=dtype, device="cuda", seed=3, zero_row=True)  # fmt: skip
    for pc in PROX_CONFIGS:
        assert_matches_reference("cuda", params, qc, pc, update=True)
        assert_matches_reference("cuda", params, qc, pc, update=False, gamma=1.7)


def test_cuda_nonfinite_flag_and_determinism():
    params = make_rows([(3, 8), (2, 100_000), (1, 5)], device="cuda", seed=6)
    params[1][1, 77] = float("nan")
    qc = CUDA_QUANT_CONFIGS[1]
    a = run_op("cuda", params, qc, PC["parq-rho0.3"], update=True)
    b = run_op("cuda", params, qc, PC["parq-rho0.3"], update=True)
    assert a.flags.tolist() == [0, 1, 0]
    for x, y in zip(a.params + a.quants, b.params + b.quants, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_cuda_rejects_optimal_lsbq_with_a_clear_error():
    qc = next(q for q in QUANT_CONFIGS if q.kind == QuantKind.LSBQ_OPTIMAL and q.bits == 2)
    with pytest.raises(RuntimeError, match="optimal LSBQ"):
        run_op("cuda", make_rows([(2, 8)], device="cuda"), qc, PC["hard"])

"""Threshold ternary (SPEC.md §9) in the fused op, by hand, on every backend.

The grids of the backend tests compare each backend with the reference on random
rows (tests/kernel_harness.py). Here the inputs are chosen so that the answer is
known exactly: the ties ``x == D`` and ``x == -D``, a side with no element, both
sides empty (``a = max(D, tiny)``), all-zero rows (``D = 0``: every element is on
both sides), empty rows, and rows long enough for the chunked and row-parallel
paths, on which integer data keep every sum exact, so that every backend must give
these levels bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import ProxConfig, QuantConfig, run_op

from parq_kernels import backends
from parq_kernels.ops import ProxKind, QuantKind
from parq_kernels.triton import plan

TINY = torch.finfo(torch.float32).tiny
HARD = ProxConfig("hard", ProxKind.HARD)


def _device(name: str) -> str:
    return "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"


def _usable(name: str) -> str:
    device = _device(name)
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    return backends.availability(device)[name]


BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(bool(_usable(b)), reason=_usable(b) or "ok"))
    for b in ("reference", "cpu", "triton", "cuda")
]


def _thr(factor: float, method: str) -> QuantConfig:
    qargs = (factor, 1.0 if method == "max" else 0.0)
    return QuantConfig(f"thr-{method}-{factor}", QuantKind.TERNARY_THRESHOLD, 0, qargs)


def _run(backend: str, rows: list[list[float]] | torch.Tensor, qc: QuantConfig):
    x = torch.as_tensor(rows, dtype=torch.float32).to(_device(backend))
    out = run_op(backend, [x], qc, HARD, update=True)
    assert not out.flags.any()
    return out.params[0].cpu(), out.quants[0].cpu()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_their_side(backend):
    # max|x| = 4, D = 0.25 * 4 = 1 exactly: 1 >= D and -1 <= -D, so both ties count
    q, Q = _run(backend, [[4.0, -2.0, 1.0, -1.0, 0.5, -0.5]], _thr(0.25, "max"))
    assert Q.tolist() == [[-1.5, 0.0, 2.5]]
    assert q.tolist() == [[2.5, -1.5, 2.5, -1.5, 0.0, 0.0]]
    # the same by mean|x| = 9 / 6 = 1.5 and a factor 2/3 of it (D rounds to 1 in float32)
    q, Q = _run(backend, [[4.0, -2.0, 1.0, -1.0, 0.5, -0.5]], _thr(2.0 / 3.0, "mean"))
    assert Q.tolist() == [[-1.5, 0.0, 2.5]] and q[0, 2] == 2.5 and q[0, 3] == -1.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_side_takes_the_other_sides_value(backend):
    # D = 0.7 * 1.525 = 1.0675: one side {2, 3} (mean 2.5), the other side empty
    rows = [[1.0, 2.0, 0.1, 3.0], [-1.0, -2.0, -0.1, -3.0]]
    q, Q = _run(backend, rows, _thr(0.7, "mean"))
    assert Q.tolist() == [[-2.5, 0.0, 2.5], [-2.5, 0.0, 2.5]]
    assert q.tolist() == [[0.0, 2.5, 0.0, 2.5], [0.0, -2.5, 0.0, -2.5]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_sides_empty_give_max_d_tiny(backend):
    # a factor above n puts D = 5 * mean|x| above every |x|: Q = [-D, 0, D], q = 0
    q, Q = _run(backend, [[0.5, -0.5, 0.25, -0.25]], _thr(5.0, "mean"))
    assert Q.tolist() == [[-1.875, 0.0, 1.875]] and q.tolist() == [[0.0] * 4]
    q, Q = _run(backend, [[0.5, -0.5, 0.25, -0.25]], _thr(2.0, "max"))  # D = 1
    assert Q.tolist() == [[-1.0, 0.0, 1.0]] and q.tolist() == [[0.0] * 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_empty_rows(backend):
    # all zeros: D = 0, every element is >= D and <= -D: both sides hold them, a = 0
    q, Q = _run(backend, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], _thr(0.7, "mean"))
    assert Q.abs().tolist() == [[0.0] * 3] * 2 and q.tolist() == [[0.0] * 3] * 2
    # no elements: D = 0, both sides empty, a = max(0, tiny) = tiny
    _, Q = _run(backend, torch.zeros(2, 0), _thr(0.7, "max"))
    assert Q.tolist() == [[-TINY, 0.0, TINY]] * 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["mean", "max"])
def test_long_rows_exact(backend, method, monkeypatch):
    """Rows cut into chunks (CPU: 4096-element chunks, row-parallel over a 100k row;
    Triton: 16-column chunks under a small MAX_BLOCK) still give the exact levels:
    integer data, so every partial sum is exact. D = 1 (max 4 * 0.25, mean 2 * 0.5)."""
    cols = 160 if backend == "triton" and not torch.cuda.is_available() else 100_000
    if backend == "triton":
        monkeypatch.setattr(plan, "MAX_BLOCK", 16)
        monkeypatch.setattr(plan, "TILE", 64)
        monkeypatch.setattr(plan, "INTERPRET_TILE", 64)
    pattern = torch.tensor([4.0, -2.0, 1.0, -1.0, 0.0, 0.0, 0.5, -0.5] * 2)
    x = pattern.repeat(cols // 16).view(1, -1)
    x = torch.cat([x, -x])  # the mirror row swaps the sides
    qc = _thr(0.25, "max") if method == "max" else _thr(1.0, "mean")  # mean|x| = 1.125
    q, Q = _run(backend, x, qc)
    if method == "max":
        assert Q.tolist() == [[-1.5, 0.0, 2.5], [-2.5, 0.0, 1.5]]
    else:  # D = 1.125: pos {4}, neg {-2}
        assert Q.tolist() == [[-2.0, 0.0, 4.0], [-4.0, 0.0, 2.0]]
    assert bool((q.unsqueeze(-1) == Q.unsqueeze(1)).any(-1).all())


def test_bad_qargs_name_the_argument():
    if _usable("cpu"):
        pytest.skip(_usable("cpu"))
    x = torch.ones(2, 3)
    for qargs, match in (([0.7], "qargs of TERNARY_THRESHOLD"), ([0.0, 0.0], "delta_factor"),
                         ([0.7, 2.0], "delta method")):  # fmt: skip
        with pytest.raises(RuntimeError, match=match):
            torch.ops.parq_kernels_C.quant_prox_(
                [x.clone()], [torch.empty_like(x)], [torch.empty(2, 3)],
                torch.zeros(1, dtype=torch.int32), int(QuantKind.TERNARY_THRESHOLD), 0,
                qargs, False, True, int(ProxKind.HARD), 0.0, 1.0,
            )  # fmt: skip

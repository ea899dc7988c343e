"""The CPU fused step projects onto 8 and 16 levels (3 and 4 bits) by a binary search with
in-register lookups on AVX2 / AVX-512 and by a count with a table read per lane on the
x86-64 baseline and NEON (csrc/cpu/level_search.h), onto 2 to 4 levels by chains of
selects (project_levels.h). All must give SPEC §4's values bit for bit, ties included:
HARD maps x to ``Q[#{j : M_j < x}]`` (a value on a midpoint goes to the lower level), PARQ
clamps between the largest level below x and the smallest one not below it. The expected
values here are computed from those definitions in float32 torch ops, for rows made of the
levels, the midpoints and their float neighbours, so every tie and every interval edge is
hit.
Unsorted levels (outside SPEC, kept where a state holds them) take the chains: the vector
body must then agree with the per-element code at the same values."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import QUANT_CONFIGS, placed
from step_harness import OC

from parq_kernels import backends
from parq_kernels.kinds import ProxKind

_WHY = backends.availability("cpu")["cpu"]  # "" when the extension is built
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
_QC_NAMES = {2: "unif-b1", 3: "ternary-unif", 4: "unif-b2", 8: "unif-b3-center", 16: "lsbq-b4"}
QC = {K: next(c for c in QUANT_CONFIGS if c.name == name) for K, name in _QC_NAMES.items()}
RHO = 0.3


def _levels(K: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(K)
    Q = (torch.randn(K, generator=g) * 0.5).sort().values
    if kind == "repeated":  # equal neighbours: a zero-width interval, a midpoint on a level
        Q[1::3] = Q[0::3][: Q[1::3].numel()]
        Q = Q.sort().values
    elif kind == "one-value":  # an all-zero row's levels
        Q = torch.zeros(K)
    return Q


def _values(Q: torch.Tensor) -> torch.Tensor:
    """The levels, the midpoints, their float neighbours, and values outside the range."""
    M = (Q[:-1] + Q[1:]) / 2
    edges = torch.cat([Q, M])
    up = torch.nextafter(edges, torch.tensor(float("inf")))
    down = torch.nextafter(edges, torch.tensor(float("-inf")))
    g = torch.Generator().manual_seed(1)
    span = float(Q[-1] - Q[0]) + 1.0
    outside = torch.tensor([Q[0] - span, Q[-1] + span, 0.0, -0.0, 3e38, -3e38])
    inside = Q[0] + torch.rand(64, generator=g) * (Q[-1] - Q[0])
    return torch.cat([edges, up, down, outside, inside])


def _hard(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    M = (Q[:-1] + Q[1:]) / 2
    return Q[(M[None, :] < x[:, None]).sum(1)]


def _parq(x: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    below = Q[None, :] < x[:, None]
    n = below.sum(1)
    lo = Q[(n - 1).clamp(min=0)]
    hi = Q[n.clamp(max=Q.numel() - 1)]
    mid = (lo + hi) * 0.5
    inv_rho = torch.tensor(1.0 / RHO, dtype=torch.float32)
    return torch.minimum(torch.maximum(mid + (x - mid) * inv_rho, lo), hi)


def _step(x: torch.Tensor, Q: torch.Tensor, qc, prox: ProxKind) -> torch.Tensor:
    """p after one non-update fused SGD step with a zero gradient (the latent stays x):
    a (1, n) row one element past a 64-byte boundary, so that its head and tail take the
    per-element code and the rest the vector body."""
    n = x.numel()
    params = placed(torch.full_like(x, float("nan")).view(1, n), True)
    lat, grad = placed(x.view(1, n), True), placed(torch.zeros_like(x).view(1, n), True)
    flags = torch.zeros(1, dtype=torch.int32)
    oc = OC["sgd"]
    quants = [Q.view(1, -1).clone()]
    backends.get_impl("cpu", "fused_step_")(
        [params], [lat], [grad], [], [], [], quants, flags, int(oc.kind), oc.hparams,
        int(qc.kind), qc.bits, qc.qargs, qc.center, False, int(prox), RHO, 1.0)  # fmt: skip
    assert int(flags[0]) == 0
    assert torch.equal(lat.view(-1), x)
    return params.view(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prox", [ProxKind.HARD, ProxKind.PARQ], ids=lambda p: p.name)
@pytest.mark.parametrize("kind", ["distinct", "repeated", "one-value"])
@pytest.mark.parametrize("K", [2, 3, 4, 8, 16])
def test_projection_matches_spec_at_every_tie(K, kind, prox, dtype):
    Q = _levels(K, kind)
    if dtype != torch.float32:  # the levels and values as the dtype holds them
        Q = Q.to(dtype).float()
    x = _values(Q).to(dtype)
    x = torch.cat([x, x.flip(0), x.roll(5)])  # each value at several positions
    want = (_hard if prox == ProxKind.HARD else _parq)(x.float(), Q).to(dtype)
    got = _step(x, Q, QC[K], prox)
    bad = (got != want).nonzero().flatten()
    assert bad.numel() == 0, (
        f"{bad.numel()} values differ, e.g. x={x[bad[:4]].tolist()} got {got[bad[:4]].tolist()}"
        f" want {want[bad[:4]].tolist()}"
    )


@pytest.mark.parametrize("prox", [ProxKind.HARD, ProxKind.PARQ], ids=lambda p: p.name)
@pytest.mark.parametrize("K", [4, 8, 16])
def test_unsorted_levels_same_values_in_vector_and_scalar_code(K, prox):
    Q = _levels(K, "distinct")
    Q = torch.cat([Q[K // 2 :], Q[: K // 2]])  # noqa: E203  (rotated: not sorted)
    period = _values(Q.sort().values)[:47]
    x = period.repeat(8)
    got = _step(x, Q, QC[K], prox).view(8, -1)
    assert torch.equal(got, got[:1].expand_as(got)), "vector body and per-element code differ"

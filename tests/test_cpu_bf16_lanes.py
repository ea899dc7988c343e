"""bf16 at the edge of its range in the fused step's bf16 loops (csrc/cpu/step_bf16.h).

On AVX2 / AVX-512 the fused step rounds bf16 without c10's NaN case, after checking a
block of elements at once on their absolute bits. These tests put new latents exactly
where that check decides: a value that rounds to bf16's largest finite value (kept), the
tie halfway to the next power of two (rounds to infinity: rejected, the element keeps its
old latent and state and its parameter is flagged), values beyond it, and a NaN, at
positions across a vector block (head, middle, last lane), for the non-update loop and
the first pass of update steps. Every level this CPU runs must give the baseline level's
bits (the baseline level converts through c10), and the values must be the ones stated.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS, UNIF, QuantConfig
from step_harness import OptimConfig, run_step

from parq_kernels import backends
from parq_kernels.kinds import OptimKind, QuantKind

_WHY = backends.availability("cpu")["cpu"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")

BF16_MAX = torch.finfo(torch.bfloat16).max  # 0x7F7F: 2^127 * (1 + 127/128)
# lr 0.5, so that the update lr * g is exact: plain SGD and SGD with momentum 0.5 (whose
# buffer, 0.5 * 0 + g, is as large as the gradient)
SGD = OptimConfig("sgd-half", OptimKind.SGD, (0.5, 0.0, 0.0, 0.0, 0, 0, 0))
SGD_MOM = OptimConfig("sgd-mom-half", OptimKind.SGD, (0.5, 0.5, 0.0, 0.0, 0, 0, 0))
QC = {c.name: c for c in QUANT_CONFIGS}["unif-b2"]
PC = {c.name: c for c in PROX_CONFIGS}


def _edge_case(cols: int = 70):
    """A row of moderate values with edge elements; their gradients and what must happen."""
    g = torch.Generator().manual_seed(7)
    lat = (torch.randn(2, cols, generator=g) * 0.5).to(torch.bfloat16)
    grad = (torch.randn(2, cols, generator=g) * 0.1).to(torch.bfloat16)
    half_gap = 2.0**119  # half of bf16's last gap (2^120) at the top of its range
    # (column, gradient): w = BF16_MAX - 0.5 * g
    edges = {
        0: -0.99 * 2 * half_gap,  # below the tie: rounds down to BF16_MAX, accepted
        15: -2 * half_gap,  # exactly the tie: rounds to inf, rejected
        17: -4 * half_gap,  # beyond: inf, rejected
        31: float("nan"),  # NaN: rejected
        33: -1.5 * 2 * half_gap,  # above the tie: inf, rejected
        50: -0.99 * 2 * half_gap,  # as column 0, in a block with nothing rejected
    }
    for c, gv in edges.items():
        lat[0, c] = BF16_MAX
        grad[0, c] = gv
    return lat, grad, edges


@pytest.mark.parametrize("update", [False, True], ids=["step", "update"])
@pytest.mark.parametrize("oc", [SGD, SGD_MOM], ids=lambda c: c.name)
@pytest.mark.parametrize("pname", ["hard", "parq-rho0.3"])
def test_bf16_edge_of_range(update, oc, pname):
    lat, grad, edges = _edge_case()
    bufs = [[torch.zeros_like(lat)] if oc.nbufs else [], [], []]
    quants = None if update else [torch.tensor([[-1.0, -1 / 3, 1 / 3, 1.0]] * 2)]
    pc = PC[pname]
    with backends.forced_cpu_level("default"):
        base = run_step("cpu", [lat], [grad], bufs, oc, QC, pc, update, 1.0, quants)
    accepted = (0, 50)
    kept = [c for c in edges if c not in accepted]
    new = base.latents[0][0]
    for c in accepted:  # rounded down to BF16_MAX
        assert new[c].item() == BF16_MAX, c
    for c in kept:  # rejected: the old latent and state
        assert new[c].item() == BF16_MAX, c
        if oc.nbufs:
            assert base.bufs[0][0][0, c].item() == 0.0, c
    if oc.nbufs:  # the accepted new buffer
        assert base.bufs[0][0][0, 50].item() == float(grad[0, 50])
    assert base.flags.tolist() == [1]
    assert bool(base.latents[0].isfinite().all())
    # the other elements took the plain update, as stored in bf16
    rest = torch.ones_like(lat, dtype=torch.bool)
    rest[0, list(edges)] = False
    want = (lat.float() - 0.5 * grad.float()).to(torch.bfloat16)
    assert torch.equal(base.latents[0][rest], want[rest])
    for level in backends.cpu_levels():
        with backends.forced_cpu_level(level):
            out = run_step("cpu", [lat], [grad], bufs, oc, QC, pc, update, 1.0, quants)
        assert torch.equal(out.flags, base.flags), level
        assert torch.equal(out.latents[0], base.latents[0]), level
        assert torch.equal(out.params[0], base.params[0]), level
        if oc.nbufs:
            assert torch.equal(out.bufs[0][0], base.bufs[0][0]), level
        assert torch.equal(out.quants[0], base.quants[0]), level


def test_bf16_non_finite_levels_take_the_general_loop():
    """Stored levels that are not finite (the fast loop's precondition fails): every level
    still gives the baseline level's bits."""
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    grad = (torch.randn(3, 64, generator=g) * 0.1).to(torch.bfloat16)
    quants = [torch.tensor([[-1.0, -0.5, 0.5, float("inf")], [-1.0, -0.5, 0.5, 1.0],
                            [float("nan"), -0.5, 0.5, 1.0]])]  # fmt: skip
    args = ([lat], [grad], [[], [], []], SGD, QC, PC["hard"], False, 1.0, quants)
    with backends.forced_cpu_level("default"):
        base = run_step("cpu", *args)
    for level in backends.cpu_levels():
        with backends.forced_cpu_level(level):
            out = run_step("cpu", *args)
        same = (out.params[0] == base.params[0]) | (out.params[0].isnan() & base.params[0].isnan())
        assert bool(same.all()), level
        assert torch.equal(out.latents[0], base.latents[0]), level


def _around(values: torch.Tensor) -> torch.Tensor:
    """Each value rounded to bf16 and its bf16 neighbours, both signs of zero."""
    b = values.to(torch.bfloat16).view(torch.int16).int()
    key = torch.where(b >= 0, b, -32768 - b)  # ordered as the values
    keys = torch.cat([key - 1, key, key + 1])
    near = torch.where(keys >= 0, keys, -32768 - keys).short().view(torch.bfloat16)
    zeros = torch.tensor([0.0, -0.0], dtype=torch.bfloat16)
    return torch.cat([near, zeros, torch.tensor([3.0, -3.0, 1e30, -1e30], dtype=torch.bfloat16)])


@pytest.mark.parametrize(
    "levels",
    [[-1.5, -0.5, 0.5, 1.5],  # midpoints -1, 0, 1: bf16 values, x lands on them
     [-1.0, -1 / 3, 1 / 3, 1.0],  # midpoints +-2/3 between two bf16 values
     [(k - 7.5) / 8 for k in range(16)],  # 4 bits, midpoints on the bf16 grid
     [(k - 7.5) / 7.3 for k in range(16)],  # 4 bits, midpoints off it
     [-2.0, -2.0, 0.25, 0.25, 0.25, 1.0, 1.0, 3.0],  # 3 bits with equal levels
     [-3.0, -3.0, -3.0, -1.25, -1.25, -0.3, 0.0, 0.0, 0.0, 0.0, 0.1, 0.7, 0.7, 2.0, 2.0, 5.0]],
    ids=["b2-exact", "b2-thirds", "b4-exact", "b4-off", "b3-ties", "b4-ties"],
)  # fmt: skip
def test_bf16_hard_ties_and_neighbours_of_midpoints(levels):
    """HARD on bf16 maps in 16-bit lanes (HardBf16): x exactly on a midpoint goes to the
    lower level (M_j < x is strict), its bf16 neighbours to either side, zeros of both
    signs, values outside the levels; p equals bf16(Q_c), c = #{j : M_j < x}, computed
    here in float32, and the baseline level's bits."""
    Q = torch.tensor(levels, dtype=torch.float32)
    M = (Q[:-1] + Q[1:]) / 2
    x = _around(M)
    cols = 16 * ((x.numel() + 15) // 16) + 16  # whole vector blocks and a tail
    lat = x.repeat(cols // x.numel() + 1)[:cols].reshape(1, cols).repeat(2, 1)
    grad = torch.zeros_like(lat)
    xf = lat.float()
    want = Q[(M.view(1, 1, -1) < xf.unsqueeze(-1)).sum(-1)].to(torch.bfloat16)
    bits = {4: 2, 8: 3, 16: 4}[len(levels)]
    qc = QuantConfig(f"unif-b{bits}", QuantKind.UNIFORM, bits, UNIF)
    quants = [Q.repeat(2, 1)]
    args = ([lat], [grad], [[], [], []], SGD, qc, PC["hard"], False, 1.0, quants)
    with backends.forced_cpu_level("default"):
        base = run_step("cpu", *args)
    assert torch.equal(base.latents[0], lat)
    assert torch.equal(base.params[0].view(torch.int16), want.view(torch.int16))
    for level in backends.cpu_levels():
        with backends.forced_cpu_level(level):
            out = run_step("cpu", *args)
        assert torch.equal(out.params[0].view(torch.int16), want.view(torch.int16)), level

"""Proximal maps and their schedules (SPEC.md §4), on hand-checkable inputs."""

from __future__ import annotations

import math

import pytest
import torch
from foundation_models import one_thread, reference_backend  # noqa: F401

from parq.optim import ProxBinaryRelax, ProxHardQuant, ProxPARQ, ProxSoftQuant
from parq.optim.parq import normalized_mirror_sigmoid

Q = torch.tensor([-1.0, 0.0, 2.0])
X = torch.tensor([-3.0, -1.0, -0.5, -0.25, 0.0, 0.5, 1.0, 1.5, 3.0])
# nearest level, ties (-0.5 and 1.0 are midpoints) going to the lower level
NEAR = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0, 2.0])
# interval [lo, hi] = Q[i-1], Q[i] with i = #{Q_j < x}; the end level outside Q
LO = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 2.0])
HI = torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])


def apply(prox, t, q=None, x=X, Qs=Q, dim=None):
    p = x.clone()
    out = prox.apply_(p, q, Qs, step_count=t, dim=dim)
    return p, out


def test_hard_nearest_level_ties_low():
    p, out = apply(ProxHardQuant(), 0)
    assert torch.equal(p, NEAR)
    assert out is None


def test_hard_uses_q_when_given():
    q = torch.full_like(X, -1.0)  # deliberately not the nearest level
    p, _ = apply(ProxHardQuant(), 0, q=q)
    assert torch.equal(p, q)


def test_hard_per_channel():
    Qs = torch.tensor([[-1.0, 1.0], [0.0, 10.0]])
    x = torch.tensor([[-0.2, 0.2, 5.0], [4.0, 5.0, 6.0]])
    p, _ = apply(ProxHardQuant(), 0, x=x, Qs=Qs, dim=-1)
    assert torch.equal(p, torch.tensor([[-1.0, 1.0, 1.0], [0.0, 0.0, 10.0]]))


@pytest.mark.parametrize("center", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("steepness", [1.0, 10.0, 40.0])
def test_parq_schedule_endpoints(center, steepness):
    # (fix) g(0) = 1 and g(1) = 0 for every center
    assert normalized_mirror_sigmoid(0, 0, 1, steepness, center) == pytest.approx(1.0, abs=1e-12)
    assert normalized_mirror_sigmoid(1, 0, 1, steepness, center) == pytest.approx(0.0, abs=1e-12)
    fs = [i / 20 for i in range(21)]
    gs = [normalized_mirror_sigmoid(f, 0, 1, steepness, center) for f in fs]
    assert all(a > b for a, b in zip(gs, gs[1:], strict=False))  # strictly decreasing

    prox = ProxPARQ(10, 30, steepness=steepness, anneal_center=center)
    assert prox.inv_slope(9) == 1.0 and prox.inv_slope(30) == 0.0
    assert prox.inv_slope(10) == pytest.approx(1.0, abs=1e-12)
    s, c = steepness, center

    def sig(z):
        return 1 / (1 + math.exp(-z))

    f = 0.35
    expected = (sig(-s * (f - c)) - sig(-s * (1 - c))) / (sig(s * c) - sig(-s * (1 - c)))
    assert prox.inv_slope(17) == pytest.approx(max(expected, 1.2e-38), rel=1e-12)


def test_parq_center_half_is_symmetric():
    # at c = 0.5 the schedule is point-symmetric about f = 0.5: g(f) + g(1 - f) = 1
    for s in (2.0, 10.0):
        for f in (0.0, 0.2, 0.5, 0.9):
            total = normalized_mirror_sigmoid(f, 0, 1, s, 0.5) + normalized_mirror_sigmoid(
                1 - f, 0, 1, s, 0.5
            )
            assert total == pytest.approx(1.0, abs=1e-12)


def test_parq_phases():
    prox = ProxPARQ(10, 20)
    p, rho = apply(prox, 5)  # before: unchanged, rho = 1
    assert torch.equal(p, X) and rho == 1.0
    p, rho = apply(prox, 15)  # f = 0.5, c = 0.5: rho = 0.5 exactly
    assert rho == pytest.approx(0.5, abs=1e-12)
    c = (LO + HI) / 2
    expected = torch.clamp(c + (X - c) / rho, LO, HI)
    assert torch.allclose(p, expected, atol=1e-6)
    # hand values: -0.25 -> c=-0.5 + 0.25*2 = 0; 0.5 -> 1 - 1 = 0; 1.5 -> 2; ends clamp
    assert torch.allclose(p, torch.tensor([-1.0, -1, -0.5, 0, 0, 0, 1, 2, 2]), atol=1e-6)
    p, rho = apply(prox, 20)  # after: hard, rho = 0
    assert torch.equal(p, NEAR) and rho == 0.0
    q = torch.full_like(X, 2.0)
    p, rho = apply(prox, 25, q=q)
    assert torch.equal(p, q) and rho == 0.0


def test_parq_inside_values_stay_in_interval_and_out_of_range_go_to_ends():
    prox = ProxPARQ(0, 10, steepness=5)
    for t in range(10):
        p, rho = apply(prox, t)
        assert 0 < rho <= 1
        assert ((p >= LO) & (p <= HI)).all()
        assert p[0] == -1.0 and p[-1] == 2.0  # outside [Q_0, Q_K-1]: the end level


def test_soft_phases_and_formula():
    prox = ProxSoftQuant(4, 12, t_start=2.0, t_end=50.0, t_power=2)
    p, out = apply(prox, 3)
    assert torch.equal(p, X) and out is None
    t = 8  # f = 0.5: T = 2 + 0.25 * 48 = 14
    assert prox.temperature(t) == pytest.approx(14.0)
    p, _ = apply(prox, t)
    Tt = 14.0
    c, d = (LO + HI) / 2, (HI - LO) / 2
    u = (torch.clamp(X, LO, HI) - LO) / (HI - LO + 1e-12)
    expected = c + d * (torch.sigmoid(Tt * (u - 0.5)) - 0.5) / (1 / (1 + math.exp(-Tt / 2)) - 0.5)
    assert torch.allclose(p, expected, atol=1e-6)
    assert p[0] == -1.0 and p[-1] == 2.0  # ends
    assert torch.allclose(p[[1, 4, 6]], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)  # lo/hi/mid
    p, _ = apply(prox, 12)
    assert torch.equal(p, NEAR)


def test_soft_is_monotone_inside():
    prox = ProxSoftQuant(0, 10)
    x = torch.linspace(-1.5, 2.5, 401)
    p, _ = apply(prox, 5, x=x)
    assert (p[1:] >= p[:-1] - 1e-6).all()
    assert ((p >= -1) & (p <= 2)).all()


def test_binary_relax_phases():
    prox = ProxBinaryRelax(10, 20)
    p, out = apply(prox, 9)
    assert torch.equal(p, X) and out is None
    p, _ = apply(prox, 14)  # theta = 0.4
    assert torch.allclose(p, 0.6 * X + 0.4 * NEAR, atol=1e-7)
    q = torch.zeros_like(X)
    p, _ = apply(prox, 14, q=q)  # hard(x) = q on update steps
    assert torch.allclose(p, 0.6 * X, atol=1e-7)
    p, _ = apply(prox, 20)
    assert torch.equal(p, NEAR)


def test_prox_on_bf16_param_computes_in_float32():
    x = X.to(torch.bfloat16)
    for prox in (ProxHardQuant(), ProxPARQ(0, 10), ProxSoftQuant(0, 10), ProxBinaryRelax(0, 10)):
        p = x.clone()
        prox.apply_(p, None, Q, step_count=4)
        ref = X.clone()
        prox.apply_(ref, None, Q, step_count=4)
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, ref.to(torch.bfloat16))


def test_prox_non_contiguous_and_4d():
    w = torch.randn(3, 2, 2, 2)
    Qs = torch.tensor([[-1.0, 1.0]] * 3)
    p = w.clone()
    ProxHardQuant().apply_(p.view(3, -1), None, Qs, 0, dim=-1)
    assert torch.equal(p, torch.where(w > 0, 1.0, -1.0))
    t = torch.randn(4, 3)
    p = t.clone().t()  # non-contiguous (3, 4)
    ProxHardQuant().apply_(p, None, torch.tensor([-1.0, 1.0]), 0)
    assert torch.equal(p, torch.where(t.t() > 0, 1.0, -1.0))

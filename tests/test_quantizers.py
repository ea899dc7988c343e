"""Quantizers (SPEC.md §2-§3): hand-computed cases, properties, optimal LSBQ."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from foundation_models import one_thread, reference_backend  # noqa: F401

from parq.quant import (
    AsymUnifQuantizer,
    LSBQuantizer,
    MaxUnifQuantizer,
    TernaryUnifQuantizer,
    UnifQuantizer,
)


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def check(quantizer, x, b, q_expected, Q_expected) -> None:
    q, Q = quantizer.quantize(T(x), b)
    assert torch.equal(Q, T(Q_expected)), Q
    assert torch.equal(q, T(q_expected)), q


# ---------------------------------------------------------------------------
# Hand-computed cases
# ---------------------------------------------------------------------------

X4 = [-1.5, -0.25, 0.5, 3.0]  # mean|x| = 1.3125, max|x| = 3


def test_unif_mean_scale_b2():
    # q_max = min(2 * 1.3125, 3) = 2.625, r = 1.5, s = 1.75
    check(UnifQuantizer(), X4, 2, [-0.875, -0.875, 0.875, 2.625], [-2.625, -0.875, 0.875, 2.625])


def test_unif_max_scale_b2():
    # q_max = 3, r = 1.5, s = 2: levels (k + 0.5) * 2
    check(UnifQuantizer(scale_method="max"), X4, 2, [-1, -1, 1, 3], [-3, -1, 1, 3])


def test_unif_int_shift_1_zero_point_0_b2():
    # K = 3, r = 1, s = q_max = 2.625
    check(
        UnifQuantizer(int_shift=1.0, zero_point=0.0),
        X4,
        2,
        [-2.625, 0, 0, 2.625],
        [-2.625, 0, 2.625],
    )


def test_unif_b1():
    # b = 1: q_max = min(1.3125, 3), r = 0.5, s = 2.625: levels +-1.3125 (sign quantizer)
    check(UnifQuantizer(), X4, 1, [-1.3125, -1.3125, 1.3125, 1.3125], [-1.3125, 1.3125])


def test_unif_center():
    # mean 3: x - m = [-2, -1, 0, 3]; max scale b = 2: s = 2, levels [-3, -1, 1, 3] + 3
    check(
        UnifQuantizer(center=True, scale_method="max"), [1, 2, 3, 6], 2, [0, 2, 4, 6], [0, 2, 4, 6]
    )


def test_maxunif_b2_rounds_half_to_even():
    # K = 3, s = 3; -1.5 / 3 = -0.5 rounds to 0 (half to even)
    q, Q = MaxUnifQuantizer().quantize(T(X4), 2)
    assert torch.equal(Q, T([-3, 0, 3]))
    assert torch.equal(q, T([0, 0, 0, 3]))


def test_maxunif_b3():
    # K = 7, r = 3, s = 1: q = round(x), -1.5 -> -2
    check(MaxUnifQuantizer(), X4, 3, [-2, 0, 0, 3], [-3, -2, -1, 0, 1, 2, 3])


def test_ternary_unif():
    # s = 3 / 1.5 = 2; x / s = [-1.5, -.45, .25, .5, .6, 1.5] -> round, clamp to [-1, 1]
    check(
        TernaryUnifQuantizer(),
        [-3, -0.9, 0.5, 1.0, 1.2, 3.0],
        0,
        [-2, 0, 0, 0, 2, 2],
        [-2, 0, 2],
    )


def test_asym_b2():
    # s = (2 - (-1)) / 3 = 1, z = -1: levels [-1, 0, 1, 2]; 0.5 -> 0 (half to even)
    check(AsymUnifQuantizer(), [-1, 0.5, 2, 0.2], 2, [-1, 0, 2, 0], [-1, 0, 1, 2])


def test_asym_q_always_in_Q_when_min_not_on_grid():
    # (fix) s = 1.5, z = round(-0.7 / 1.5) = 0: levels [0, 1.5]; -0.7 clamps to level 0
    q, Q = AsymUnifQuantizer().quantize(T([-0.7, 0.2, 0.8]), 1)
    assert torch.equal(Q, T([0, 1.5]))
    assert torch.equal(q, T([0, 0, 1.5]))
    x = torch.randn(257) * 3 + 0.7
    for b in range(1, 9):
        q, Q = AsymUnifQuantizer().quantize(x, b)
        assert torch.isin(q, Q).all()


def test_lsbq_greedy_b1_b2():
    # b = 1: v1 = mean|x| = 2.5; b = 2: r1 = [-0.5, 1.5, -1.5, 0.5], v2 = 1
    x = [-3, -1, 1, 3]
    check(LSBQuantizer(), [-3, -1, 1, 5], 1, [-2.5, -2.5, 2.5, 2.5], [-2.5, 2.5])
    check(LSBQuantizer(), x, 2, [-3, -1, 1, 3], [-3, -1, 1, 3])
    # b = 3 on the same x: r2 = 0, v3 = 0: K = 8 levels with repeats
    check(LSBQuantizer(), x, 3, [-3, -1, 1, 3], [-3, -3, -1, -1, 1, 1, 3, 3])


def _greedy_exact(x: list[Fraction], b: int) -> tuple[list[Fraction], list[Fraction]]:
    """Greedy LSBQ in exact rational arithmetic (SPEC.md §3)."""
    r, vs = list(x), []
    for _ in range(b):
        v = sum(abs(e) for e in r) / len(r)
        r = [e - v * (1 if e >= 0 else -1) for e in r]
        vs.append(v)
    q = [xi - ri for xi, ri in zip(x, r, strict=True)]
    Q = sorted(
        sum(c * v for c, v in zip(cs, vs, strict=True))
        for cs in itertools.product((-1, 1), repeat=b)
    )
    return q, Q


@pytest.mark.parametrize("b", range(1, 9))
def test_lsbq_greedy_exact_b1_to_b8(b):
    # dyadic inputs with n = 4: every mean is exact in float32, so the float
    # result must equal exact rational arithmetic
    x = [-3.0, -0.5, 1.25, 6.0]
    q_exact, Q_exact = _greedy_exact([Fraction(v) for v in x], b)
    q, Q = LSBQuantizer().quantize(T(x), b)
    assert Q.shape == (2**b,)
    assert torch.equal(Q, T([float(v) for v in Q_exact]))
    assert torch.equal(q, T([float(v) for v in q_exact]))


def test_lsbq_simple_ternary():
    # v = 1.1 * mean|x| = 1.1, thresholds +-0.55
    x = T([-2, -0.5, 0.3, 1, 1.2])
    q, Q = LSBQuantizer().quantize(x, 0)
    v = torch.tensor(1.1, dtype=torch.float32) * 1.0
    assert torch.equal(Q, torch.stack([-v, torch.zeros(()), v]))
    assert torch.equal(q, torch.stack([-v, torch.zeros(()), torch.zeros(()), v, v]))
    q, Q = LSBQuantizer(ternary_multiplier=2.0).quantize(x, 0)  # v = 2, thresholds +-1
    assert torch.equal(Q, T([-2, 0, 2]))
    assert torch.equal(q, T([-2, 0, 0, 0, 2]))


def test_lsbq_optimal_b2_hand():
    # |x| sorted [1, 1, 3, 4, 5]: split k = 2 gives lo = 1, hi = 4 (E = 2, the minimum)
    check(LSBQuantizer(optimal=True), [-4, -1, 1, 3, 5], 2, [-4, -1, 1, 4, 4], [-4, -1, 1, 4])


def test_lsbq_optimal_ternary_hand():
    # |x| sorted [.2, .5, 3, 4, 5]: E_k = T - (n-k) hi_k^2 is minimal at k = 2, A = 4
    check(LSBQuantizer(optimal=True), [-4, -0.5, 0.2, 3, 5], 0, [-4, 0, 0, 4, 4], [-4, 0, 4])


def test_lsbq_optimal_b1_is_greedy():
    x = torch.randn(3, 50)
    q1, Q1 = LSBQuantizer(optimal=True).quantize(x, 1, dim=-1)
    q2, Q2 = LSBQuantizer().quantize(x, 1, dim=-1)
    assert torch.equal(q1, q2) and torch.equal(Q1, Q2)


# ---------------------------------------------------------------------------
# Properties over every quantizer
# ---------------------------------------------------------------------------

ALL = [
    ("unif", UnifQuantizer, (1, 2, 3, 4, 8)),
    ("unif-center", lambda: UnifQuantizer(center=True), (1, 2, 4)),
    ("unif-max", lambda: UnifQuantizer(scale_method="max"), (1, 3, 8)),
    ("maxunif", MaxUnifQuantizer, (2, 3, 4, 8)),
    ("ternunif", TernaryUnifQuantizer, (0,)),
    ("ternunif-center", lambda: TernaryUnifQuantizer(center=True), (0,)),
    ("asym", AsymUnifQuantizer, (1, 2, 4, 8)),
    ("lsbq", LSBQuantizer, (0, 1, 2, 3, 4, 8)),
    ("lsbq-center", lambda: LSBQuantizer(center=True), (0, 2, 3)),
    ("lsbq-opt", lambda: LSBQuantizer(optimal=True), (0, 1, 2)),
    ("lsbq-opt-center", lambda: LSBQuantizer(center=True, optimal=True), (0, 2)),
]
CASES = [(name, make, b) for name, make, bits in ALL for b in bits]
IDS = [f"{name}-b{b}" for name, _, b in CASES]


@pytest.mark.parametrize(("name", "make", "b"), CASES, ids=IDS)
def test_properties(name, make, b):
    quantizer = make()
    K = quantizer.get_quant_size(b)
    x = torch.randn(5, 33) * torch.tensor([[0.1], [1.0], [3.0], [0.01], [10.0]]) + 0.2
    x_before = x.clone()
    # per tensor: Q (K,), sorted, q like x and exactly on the levels
    q, Q = quantizer.quantize(x, b)
    assert torch.equal(x, x_before), "quantize modified p"
    assert q.shape == x.shape and Q.shape == (K,)
    assert (Q[1:] >= Q[:-1]).all()
    assert torch.isin(q, Q).all()
    # per channel: Q (rows, K), each row independent
    q, Q = quantizer.quantize(x, b, dim=-1)
    assert torch.equal(x, x_before)
    assert q.shape == x.shape and Q.shape == (5, K)
    assert (Q[:, 1:] >= Q[:, :-1]).all()
    for r in range(5):
        assert torch.isin(q[r], Q[r]).all()
        q_r, Q_r = quantizer.quantize(x[r], b)
        assert torch.equal(q_r, q[r]) and torch.equal(Q_r, Q[r])
    # the levels are symmetric about the mean when centering, else about 0 / not at all
    if quantizer.center:
        qc, Qc = quantizer.quantize(x, b, dim=-1)
        shifted, Qs = quantizer.quantize(x + 5.0, b, dim=-1)
        assert torch.allclose(Qs - 5.0, Qc, atol=1e-4)


@pytest.mark.parametrize(("name", "make", "b"), CASES, ids=IDS)
def test_low_precision_inputs(name, make, b):
    quantizer = make()
    x32 = torch.randn(4, 16)
    for dtype in (torch.bfloat16, torch.float16):
        x = x32.to(dtype)
        x_before = x.clone()
        q, Q = quantizer.quantize(x, b, dim=-1)
        assert torch.equal(x, x_before)
        q_ref, Q_ref = quantizer.quantize(x.float(), b, dim=-1)
        # computed in float32 from the low-precision values; Q is float32
        assert Q.dtype == torch.float32
        assert torch.equal(Q, Q_ref)
        # q stays float32 so that it is exactly one of the float32 levels
        assert q.shape == x.shape and q.dtype == torch.float32
        assert torch.equal(q, q_ref)
        for r in range(4):
            assert torch.isin(q[r], Q[r]).all()


def test_dim_shapes_on_4d():
    w = torch.randn(4, 2, 3, 3)
    quantizer = UnifQuantizer()
    q, Q = quantizer.quantize(w, 2)
    assert q.shape == w.shape and Q.shape == (4,)
    q, Q = quantizer.quantize(w.reshape(4, -1), 2, dim=-1)
    assert Q.shape == (4, 4)
    q0, Q0 = quantizer.quantize(w[1].reshape(-1), 2)
    assert torch.equal(Q[1], Q0) and torch.equal(q[1], q0)


def test_uniform_centering_quantizes_deviation():
    x = torch.randn(2, 20) + 7.0
    m = x.mean(dim=1, keepdim=True)
    q, Q = UnifQuantizer(center=True).quantize(x, 3, dim=-1)
    q0, Q0 = UnifQuantizer().quantize(x - m, 3, dim=-1)
    assert torch.equal(Q, Q0 + m)
    assert torch.equal(q, q0 + m)


def test_all_zero_and_single_element_rows_are_finite():
    for make, b in [(UnifQuantizer, 2), (MaxUnifQuantizer, 2), (TernaryUnifQuantizer, 0),
                    (AsymUnifQuantizer, 2), (LSBQuantizer, 2), (LSBQuantizer, 0),
                    (lambda: LSBQuantizer(optimal=True), 2),
                    (lambda: LSBQuantizer(optimal=True), 0)]:  # fmt: skip
        for x in (torch.zeros(3, 8), torch.randn(3, 1)):
            q, Q = make().quantize(x, b, dim=-1)
            assert torch.isfinite(q).all() and torch.isfinite(Q).all()
            assert torch.isin(q[0], Q[0]).all()


def test_empty_tensor():
    for make, b in [(UnifQuantizer, 2), (LSBQuantizer, 2), (AsymUnifQuantizer, 3)]:
        q, Q = make().quantize(torch.empty(0), b)
        assert q.shape == (0,) and Q.shape == (make().get_quant_size(b),)
        assert torch.isfinite(Q).all()


@pytest.mark.parametrize("shape, rows", [((4, 0), 4), ((0,), 1), ((2, 3, 0), 6), ((0, 4), 0)])
def test_empty_rows_per_channel(shape, rows):
    """Rows of length 0 (a (4, 0) weight per channel) are valid (SPEC.md §6): one level set
    per row, finite (scale clamps to tiny)."""
    for make, b in [(UnifQuantizer, 2), (MaxUnifQuantizer, 2), (TernaryUnifQuantizer, 0),
                    (AsymUnifQuantizer, 2), (LSBQuantizer, 2), (LSBQuantizer, 0),
                    (lambda: LSBQuantizer(optimal=True), 2),
                    (lambda: LSBQuantizer(refine_rounds=2), 2)]:  # fmt: skip
        q, Q = make().quantize(torch.zeros(shape), b, -1)
        assert q.shape == shape and Q.shape == (rows, make().get_quant_size(b))
        assert torch.isfinite(Q).all()


# ---------------------------------------------------------------------------
# Optimal LSBQ
# ---------------------------------------------------------------------------


def _brute_force_error(x: torch.Tensor, ternary: bool) -> float:
    """min over every split of |x| into a lower and an upper group (float64)."""
    a = x.abs().double().tolist()
    best = float("inf")
    for mask in itertools.product((0, 1), repeat=len(a)):
        up = [v for v, m in zip(a, mask, strict=True) if m]
        low = [v for v, m in zip(a, mask, strict=True) if not m]
        hi = sum(up) / len(up) if up else 0.0
        lo = 0.0 if ternary or not low else sum(low) / len(low)
        err = sum((v - hi) ** 2 for v in up) + sum((v - lo) ** 2 for v in low)
        best = min(best, err)
    return best


@pytest.mark.parametrize("b", [0, 2])
def test_lsbq_optimal_equals_brute_force(b):
    g = torch.Generator().manual_seed(3)
    for trial in range(12):
        n = 1 + trial % 8
        x = torch.randn(n, generator=g) * (1 + trial)
        q, Q = LSBQuantizer(optimal=True).quantize(x, b)
        err = ((x.double() - q.double()) ** 2).sum().item()
        ref = _brute_force_error(x, ternary=(b == 0))
        assert err == pytest.approx(ref, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("b", [0, 1, 2])
def test_lsbq_optimal_never_worse_than_greedy(b):
    x = torch.randn(16, 40) * torch.linspace(0.1, 4, 16)[:, None]
    x[3] = x[3] ** 3  # heavy tails
    qo, _ = LSBQuantizer(optimal=True).quantize(x, b, dim=-1)
    qg, _ = LSBQuantizer().quantize(x, b, dim=-1)
    eo = ((x - qo) ** 2).sum(dim=1)
    eg = ((x - qg) ** 2).sum(dim=1)
    assert (eo <= eg * (1 + 1e-6) + 1e-12).all(), (eo, eg)
    if b != 1:
        assert (eo < eg).any()  # strictly better somewhere


@pytest.mark.parametrize("b", [0, 2])
def test_lsbq_optimal_per_channel_matches_per_row(b):
    x = torch.randn(6, 31) * torch.arange(1, 7)[:, None]
    q, Q = LSBQuantizer(optimal=True).quantize(x, b, dim=-1)
    for r in range(6):
        q_r, Q_r = LSBQuantizer(optimal=True).quantize(x[r], b)
        assert torch.equal(q_r, q[r]) and torch.equal(Q_r, Q[r])


@pytest.mark.parametrize("b", [0, 2])
def test_lsbq_optimal_stable_on_long_row(b):
    # a split found in float64 on 1e5 elements must match a float64 recomputation
    g = torch.Generator().manual_seed(7)
    x = torch.randn(100_000, generator=g) + 1e-3
    q, Q = LSBQuantizer(optimal=True).quantize(x, b)
    assert torch.isfinite(Q).all() and torch.isin(q, Q).all()
    a = x.abs().double().sort().values
    S = torch.cat([torch.zeros(1, dtype=torch.float64), a.cumsum(0)])
    n = a.numel()
    k = torch.arange(n + 1, dtype=torch.float64)
    hi = torch.where(k < n, (S[-1] - S) / (n - k).clamp_min(1), 0.0)
    lo = torch.where(k > 0, S / k.clamp_min(1), 0.0)
    if b == 0:
        E = (a * a).sum() - (n - k) * hi * hi
        assert Q[2].item() == pytest.approx(hi[E.argmin()].item(), rel=1e-6)
    else:
        E = (a * a).sum() - k * lo * lo - (n - k) * hi * hi
        assert Q[3].item() == pytest.approx(hi[E.argmin()].item(), rel=1e-6)
        assert Q[2].item() == pytest.approx(lo[E.argmin()].item(), rel=1e-5)
    # the chosen error is the smallest over the neighbouring splits too
    err = ((x.double() - q.double()) ** 2).sum().item()
    assert err <= E.min().item() * (1 + 1e-6)

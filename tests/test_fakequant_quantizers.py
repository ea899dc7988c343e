"""SPEC.md §12: observers (BatchMinMax, ExpAvgMinMax) and the quantizer modules
(AffineQuantizer, QfmtQuantizer) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from parq.fakequant import (
    AffineQuantizer,
    BatchMinMax,
    ExpAvgMinMax,
    ObserverNotReadyError,
    QfmtQuantizer,
)

TINY = torch.finfo(torch.float32).tiny


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- observers -----------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BatchMinMax, ExpAvgMinMax])
def test_reading_before_observing_raises(cls):
    obs = cls()
    with pytest.raises(ObserverNotReadyError, match=r"get_ranges\(\) before any observe_batch"):
        obs.get_ranges()
    with pytest.raises(ObserverNotReadyError):
        AffineQuantizer(8, cls())(torch.randn(3))  # quantize() reads the ranges too


def test_batch_min_max_reports_the_last_batch():
    obs = BatchMinMax()
    obs.observe_batch(t(-1.0, 3.0))
    obs.observe_batch(t(0.5, 2.0, 1.0))
    mn, mx = obs.get_ranges()
    assert (mn.item(), mx.item()) == (0.5, 2.0) and mn.shape == ()


def test_batch_min_max_per_channel_axis0():
    obs = BatchMinMax(per_channel=True)
    x = torch.arange(24.0).reshape(2, 3, 4) - 5.0
    obs.observe_batch(x)
    mn, mx = obs.get_ranges()
    assert torch.equal(mn, t(-5.0, 7.0)) and torch.equal(mx, t(6.0, 18.0))


def test_exp_avg_is_zero_initialised_and_bias_corrected():
    m = 0.5
    obs = ExpAvgMinMax(momentum=m)
    obs.observe_batch(t(-1.0, 2.0))
    mn, mx = obs.get_ranges()
    assert (mn.item(), mx.item()) == (-1.0, 2.0)  # r_1 / (1 - m) = x_1
    obs.observe_batch(t(-3.0, 4.0))
    # r_2 = m (1 - m) x_1 + (1 - m) x_2, over 1 - m^2 = 0.75
    mn, mx = obs.get_ranges()
    assert mn.item() == pytest.approx(-7 / 3, rel=1e-6) and mx.item() == pytest.approx(10 / 3)


def test_exp_avg_matches_the_formula_over_many_steps_per_channel():
    m, steps = 0.9, 30
    obs = ExpAvgMinMax(m, per_channel=True)
    xs = [torch.randn(4, 7) * (1 + i) for i in range(steps)]
    r_min = torch.zeros(4, dtype=torch.float64)
    r_max = torch.zeros(4, dtype=torch.float64)
    for i, x in enumerate(xs, start=1):
        obs.observe_batch(x)
        r_min = m * r_min + (1 - m) * x.double().amin(1)
        r_max = m * r_max + (1 - m) * x.double().amax(1)
        mn, mx = obs.get_ranges()
        torch.testing.assert_close(mn.double(), r_min / (1 - m**i), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mx.double(), r_max / (1 - m**i), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="observed 4 channels before, got 3"):
        obs.observe_batch(torch.randn(3, 7))


def test_force_ranges_then_observing_continues_the_average():
    obs = ExpAvgMinMax(0.5)
    obs.force_ranges(-2.0, 6.0)
    assert [v.item() for v in obs.get_ranges()] == [-2.0, 6.0]
    obs.observe_batch(t(0.0, 2.0))
    assert [v.item() for v in obs.get_ranges()] == [-1.0, 4.0]
    pc = BatchMinMax(per_channel=True)
    pc.force_ranges(t(-1.0, -2.0), t(1.0, 3.0))
    assert torch.equal(pc.get_ranges()[1], t(1.0, 3.0))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda o: o.force_ranges(2.0, 1.0), ValueError, "needs min <= max"),
        (lambda o: o.force_ranges(float("inf"), 1.0), ValueError, "must be finite"),
        (lambda o: o.force_ranges("a", 1.0), TypeError, "min must be a number"),
        (lambda o: o.force_ranges(t(0.0, 1.0), t(1.0, 2.0)), ValueError, "per-tensor observer"),
        (lambda o: o.observe_batch(torch.empty(0)), ValueError, "x is empty"),
    ],
)  # fmt: skip
def test_observer_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(BatchMinMax())


def test_observer_constructor_errors():
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        ExpAvgMinMax(1.0)
    with pytest.raises(TypeError, match="momentum must be a float"):
        ExpAvgMinMax("0.9")
    with pytest.raises(TypeError, match="per_channel must be a bool"):
        BatchMinMax(per_channel=1)
    with pytest.raises(ValueError, match="per-channel observer needs x.dim"):
        BatchMinMax(per_channel=True).observe_batch(torch.tensor(1.0))


def test_observer_state_dict_round_trip_any_channel_count():
    src = ExpAvgMinMax(0.8, per_channel=True)
    src.observe_batch(torch.randn(5, 3))
    src.observe_batch(torch.randn(5, 3))
    dst = ExpAvgMinMax(0.8, per_channel=True)
    dst.load_state_dict(src.state_dict())
    assert dst.ready
    for a, b in zip(src.get_ranges(), dst.get_ranges(), strict=True):
        assert torch.equal(a, b)
    empty = BatchMinMax()
    empty.load_state_dict(BatchMinMax().state_dict())
    assert not empty.ready


# --- AffineQuantizer ---------------------------------------------------------------


def test_affine_asymmetric_hand_values():
    q = AffineQuantizer(2, BatchMinMax())
    q.observer.force_ranges(-1.0, 2.0)  # lo -1, hi 2: delta 1, z 1, levels -1 .. 2
    delta, z, qmin, qmax, _ = q.qparams()
    assert (delta.item(), z.item(), qmin, qmax) == (1.0, 1.0, 0, 3)
    x = t(-1.6, -0.3, 0.5, 1.5, 2.6)
    assert torch.equal(q(x), t(-1.0, 0.0, 0.0, 2.0, 2.0))


def test_affine_range_always_contains_zero():
    q = AffineQuantizer(8, BatchMinMax())
    q.observer.force_ranges(0.5, 2.55)  # lo = min(0.5, 0) = 0: delta = 0.01, z = 0
    delta, z, *_ = q.qparams()
    assert delta.item() == pytest.approx(0.01) and z.item() == 0.0
    q.observer.force_ranges(-2.55, -0.5)  # hi = 0: z = 255
    assert q.qparams()[1].item() == 255.0


def test_affine_symmetric_hand_values():
    q = AffineQuantizer(3, BatchMinMax(), symmetric=True)
    q.observer.force_ranges(-0.5, 3.5)  # hi = 3.5, lo = -3.5: delta = 1, z = round(3.5) = 4
    delta, z, *_ = q.qparams()
    assert (delta.item(), z.item()) == (1.0, 4.0)
    assert torch.equal(q(t(-9.0, -3.4, 0.4, 2.5, 9.0)), t(-4.0, -3.0, 0.0, 2.0, 3.0))


def test_affine_all_zero_range_clamps_delta_to_tiny_and_stays_finite():
    q = AffineQuantizer(4, BatchMinMax())
    q.pre_observe(torch.zeros(8))
    delta, z, *_ = q.qparams()
    assert delta.item() == TINY and z.item() == 0.0
    assert torch.equal(q(torch.zeros(8)), torch.zeros(8))


def test_affine_per_channel_hand_values():
    q = AffineQuantizer(2, BatchMinMax(per_channel=True), per_channel=True)
    w = t(-1.0, 2.0, 0.4, 0.0, 3.0, 1.4).reshape(2, 3)  # ranges [-1, 2] and [0, 3]
    q.pre_observe(w)
    delta, z, *_ = q.qparams()
    assert torch.equal(delta, t(1.0, 1.0)) and torch.equal(z, t(1.0, 0.0))
    assert torch.equal(q(w), t(-1.0, 2.0, 0.0, 0.0, 3.0, 1.0).reshape(2, 3))
    with pytest.raises(ValueError, match="per-channel ranges of 2 channels, x has 3"):
        q(torch.randn(3, 2))


def test_affine_gradient_clip_masks_outside_the_levels():
    x = t(-2.0, -1.0, 0.3, 2.0, 2.2).requires_grad_()
    q = AffineQuantizer(2, BatchMinMax(), gradient_clip=True)
    q.observer.force_ranges(-1.0, 2.0)
    q(x).sum().backward()
    assert torch.equal(x.grad, t(0.0, 1.0, 1.0, 1.0, 0.0))
    x.grad = None
    q2 = AffineQuantizer(2, BatchMinMax())
    q2.observer.force_ranges(-1.0, 2.0)
    q2(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(5))  # identity without gradient_clip


# --- QfmtQuantizer -----------------------------------------------------------------


def test_qfmt_signed_hand_values():
    q = QfmtQuantizer(8, True, BatchMinMax())
    q.observer.force_ranges(-3.1, 1.0)
    # A = 3.1: int_bits = floor(log2 3.1) + 1 = 2, frac = 8 - 2 - 1 = 5, delta = 1/32
    delta, z, qmin, qmax, pow2 = q.qparams()
    assert (delta.item(), qmin, qmax, pow2) == (1 / 32, -128, 127, True)
    x = t(3.1, 5.0, -5.0, 0.01)
    assert torch.equal(q(x), t(99 / 32, 127 / 32, -128 / 32, 0.0))


def test_qfmt_unsigned_clamps_by_n_bits_not_int_bits():
    q = QfmtQuantizer(4, False, BatchMinMax())
    q.observer.force_ranges(0.0, 2.0)
    # A = 2: int_bits = 2, frac = 2, delta = 0.25, codes [0, 15]: up to 3.75 (the
    # public version clamps at 2^int_bits = 4 levels of the integer part instead)
    assert q.qparams()[0].item() == 0.25
    assert torch.equal(q(t(-1.0, 1.9, 3.7, 9.0)), t(0.0, 2.0, 3.75, 3.75))


def test_qfmt_int_bits_exact_just_below_a_power_of_two():
    q = QfmtQuantizer(8, True, BatchMinMax())
    a = 1024 * (1 - 2**-24)  # float32 log2 rounds this to 10.0 exactly
    q.observer.force_ranges(-a, a)
    assert q.qparams()[0].item() == 2.0 ** -(8 - 10 - 1)  # int_bits 10, frac -3, delta 8
    q.observer.force_ranges(-1024.0, 0.0)
    assert q.qparams()[0].item() == 16.0  # int_bits 11


def test_qfmt_zero_and_tiny_ranges_stay_finite():
    q = QfmtQuantizer(8, True, BatchMinMax())
    q.pre_observe(torch.zeros(4))
    delta = q.qparams()[0]
    assert delta.item() == 2.0**-126 and torch.isfinite(1 / delta)
    x = torch.tensor([0.0, 1e-39, -1.0])
    assert torch.equal(q(x), torch.tensor([0.0, 0.0, -128 * 2.0**-126]))


def test_qfmt_per_channel_hand_values():
    q = QfmtQuantizer(4, True, BatchMinMax(per_channel=True))
    w = t(0.9, -0.2, 3.0, 1.0).reshape(2, 2)  # A = 0.9 -> delta 1/8; A = 3 -> delta 1/2
    q.pre_observe(w)
    assert torch.equal(q.qparams()[0], t(1 / 8, 1 / 2))
    assert torch.equal(q(w), t(7 / 8, -0.25, 3.0, 1.0).reshape(2, 2))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: AffineQuantizer(0, BatchMinMax()), ValueError, r"n_bits must be in 1\.\.16"),
        (lambda: AffineQuantizer(8.0, BatchMinMax()), TypeError, "n_bits must be an int"),
        (lambda: AffineQuantizer(8, None), TypeError, "observer must be a parq.fakequant"),
        (lambda: AffineQuantizer(8, BatchMinMax(), per_channel=True), ValueError,
         "per_channel=True needs an observer with per_channel=True"),
        (lambda: AffineQuantizer(8, BatchMinMax(), symmetric="yes"), TypeError,
         "symmetric must be a bool"),
        (lambda: QfmtQuantizer(8, 1, BatchMinMax()), TypeError, "signed must be a bool"),
        (lambda: QfmtQuantizer(17, True, BatchMinMax()), ValueError, "n_bits must be in"),
        (lambda: QfmtQuantizer(8, True, BatchMinMax(), gradient_clip=None), TypeError,
         "gradient_clip must be a bool"),
    ],
)  # fmt: skip
def test_quantizer_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_exp_avg_skips_a_non_finite_batch(bad):
    # one Inf/NaN batch (an fp16 AMP overflow the GradScaler skips) must not poison the
    # average for good: the batch is skipped, the range stays what it was
    obs = ExpAvgMinMax(0.9)
    obs.observe_batch(t(-2.0, 1.0))
    before = [v.clone() for v in obs.get_ranges()]
    obs.observe_batch(t(1.0, bad))
    assert [v.item() for v in obs.get_ranges()] == [v.item() for v in before]
    for _ in range(3):
        obs.observe_batch(t(-2.0, 1.0))
    mn, mx = obs.get_ranges()
    assert mn.item() == pytest.approx(-2.0) and mx.item() == pytest.approx(1.0)
    q = AffineQuantizer(8, obs)
    assert torch.isfinite(q(torch.randn(16))).all()


def test_exp_avg_non_finite_first_batch_and_per_channel():
    obs = ExpAvgMinMax(0.5)
    obs.observe_batch(t(float("nan"), 1.0))  # nothing finite seen yet: the range is [0, 0]
    assert [v.item() for v in obs.get_ranges()] == [0.0, 0.0]
    obs.observe_batch(t(-1.0, 2.0))  # the first finite batch counts as the first
    assert [v.item() for v in obs.get_ranges()] == [-1.0, 2.0]
    pc = ExpAvgMinMax(0.5, per_channel=True)
    pc.observe_batch(torch.tensor([[0.0, 1.0], [-1.0, 3.0]]))
    pc.observe_batch(torch.tensor([[0.0, 5.0], [-1.0, float("inf")]]))  # one channel bad
    mn, mx = pc.get_ranges()
    assert torch.equal(mn, t(0.0, -1.0)) and torch.equal(mx, t(1.0, 3.0))


def test_batch_min_max_recovers_after_a_non_finite_batch():
    obs = BatchMinMax()
    obs.observe_batch(t(1.0, float("inf")))
    obs.observe_batch(t(-1.0, 2.0))
    assert [v.item() for v in obs.get_ranges()] == [-1.0, 2.0]

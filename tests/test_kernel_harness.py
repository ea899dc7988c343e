"""The comparison harness itself: it must accept the reference and reject wrong kernels."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import (
    PROX_CONFIGS,
    QUANT_CONFIGS,
    assert_matches_reference,
    make_rows,
    run_op,
)

from parq_kernels import backends, reference

SHAPES = [(3, 7), (1, 33), (2, 1), (0, 5), (2, 0)]


@pytest.mark.parametrize("qc", QUANT_CONFIGS, ids=lambda c: c.name)
def test_reference_matches_itself(qc):
    params = make_rows(SHAPES, zero_row=True)
    for pc in PROX_CONFIGS:
        assert_matches_reference("reference", params, qc, pc, update=True)
    assert_matches_reference("reference", params, qc, PROX_CONFIGS[1], update=False, gamma=1.5)


def _install_fake_cpu_backend(monkeypatch, impl):
    """Serve ``impl`` as the "cpu" backend; the reference stays the reference."""
    real = backends._load
    fake = {"quant_prox_": impl}
    monkeypatch.setattr(backends, "_load", lambda name: (fake, "") if name == "cpu" else real(name))


def test_harness_rejects_a_wrong_kernel(monkeypatch):
    """A backend that is off by a small, non-boundary amount must fail the check."""

    def off_by_a_bit(params, *args):
        reference.quant_prox_(params, *args)
        for p in params:
            p.mul_(1.001)

    _install_fake_cpu_backend(monkeypatch, off_by_a_bit)
    params = make_rows([(4, 64)])
    with pytest.raises(AssertionError, match="differ"):
        assert_matches_reference("cpu", params, QUANT_CONFIGS[1], PROX_CONFIGS[1])


def test_harness_accepts_boundary_flips_only(monkeypatch):
    """Elements exactly on a decision boundary may go either way; others may not."""

    def shifted(params, latents, *args):  # x * (1 + 1e-7) flips exact midpoints upward
        inputs = [p.clone() for p in params]
        scaled = [p * (1 + 1e-7) for p in params]
        reference.quant_prox_(scaled, latents, *args)
        for p, s in zip(params, scaled, strict=True):
            p.copy_(s)
        for lat, x in zip(latents, inputs, strict=True):
            lat.copy_(x)

    _install_fake_cpu_backend(monkeypatch, shifted)
    Q = torch.tensor([[-1.5, -0.5, 0.5, 1.5]])
    x = torch.tensor([[-1.0, 0.0, 1.0, 0.3, -0.7, 1.2]])  # three exact midpoints
    hard = PROX_CONFIGS[1]
    ref = run_op("reference", [x], QUANT_CONFIGS[1], hard, update=False, quants=[Q])
    out = run_op("cpu", [x], QUANT_CONFIGS[1], hard, update=False, quants=[Q])
    assert not torch.equal(out.params[0], ref.params[0])  # the flips really happen
    assert_matches_reference("cpu", [x], QUANT_CONFIGS[1], hard, update=False, quants=[Q])


def test_optimizer_lockstep_reference_vs_itself():
    from kernel_harness import assert_optimizer_matches_reference

    from parq.optim import ProxPARQ
    from parq.quant import LSBQuantizer

    assert_optimizer_matches_reference(
        "reference", LSBQuantizer, lambda: ProxPARQ(3, 8), steps=10,
        warmup_steps=2, quant_period=2, quant_per_channel=True,
    )  # fmt: skip

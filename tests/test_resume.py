"""Checkpoint / resume mid-annealing gives a bit-identical trajectory (SPEC.md §1, §5)."""

from __future__ import annotations

import io

import pytest
import torch
from foundation_models import (
    assert_bitwise_equal,
    build,
    make_batches,
    one_thread,  # noqa: F401
    reference_backend,  # noqa: F401
    snapshot,
    train_step,
)

from parq.optim import ProxPARQ
from parq.quant import LSBQuantizer, UnifQuantizer

STEPS, CUT = 9, 5


def _build(base, warmup, dtype, fused, seed=0):
    return build(
        "mlp",
        UnifQuantizer() if base == "sgd" else LSBQuantizer(),
        ProxPARQ(3, 8),
        2,
        base=base,
        seed=seed,
        dtype=dtype,
        warmup_steps=warmup,
        quant_period=3,
        quant_per_channel=True,
        anneal_wd_frac=0.5,
        fused=fused,
    )


CASES = [
    (base, warmup, dtype, True)
    for base in ("sgd", "adamw")
    for warmup in (0, 2)
    for dtype in (torch.float32, torch.bfloat16)
] + [("adamw", 2, torch.bfloat16, False), ("sgd", 0, torch.float32, False)]


@pytest.mark.parametrize(("base", "warmup", "dtype", "fused"), CASES)
def test_resume_is_bit_identical(base, warmup, dtype, fused):
    batches = make_batches("mlp", STEPS, dtype=dtype)
    model, opt = _build(base, warmup, dtype, fused)
    trajectory = []
    for batch in batches:
        train_step(model, opt, batch)
        trajectory.append(snapshot(model, opt))

    model, opt = _build(base, warmup, dtype, fused)
    for batch in batches[:CUT]:
        train_step(model, opt, batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    del model, opt

    checkpoint = torch.load(buffer, weights_only=True)
    model, opt = _build(base, warmup, dtype, fused, seed=123)  # other initial weights
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optim"])
    assert_bitwise_equal(snapshot(model, opt), trajectory[CUT - 1])
    group = opt.param_groups[0]
    assert group["num_steps"] == CUT
    assert 0 < group["inv_slope"] < 1  # mid-annealing
    for p in group["params"]:
        assert opt.state[p]["quants"].dtype == torch.float32
        assert opt.state[p]["latent"].dtype == dtype
    for n, batch in enumerate(batches[CUT:], start=CUT):
        train_step(model, opt, batch)
        assert_bitwise_equal(snapshot(model, opt), trajectory[n])
    assert group["num_steps"] == STEPS


def test_group_keys_are_in_state_dict():
    model, opt = _build("sgd", 0, torch.float32, True)
    for batch in make_batches("mlp", 4):
        train_step(model, opt, batch)
    groups = opt.state_dict()["param_groups"]
    for key in ("num_steps", "cumu_lr", "inv_slope", "initial_wd", "quant_bits"):
        assert key in groups[0]
    assert "quant_bits" not in groups[1] and "cumu_lr" not in groups[1]
    state = opt.state_dict()["state"]
    assert {"latent", "quants", "momentum_buffer"} <= set(state[0])

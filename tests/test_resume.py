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


def _fp_then_qat_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _groups(model):
    weights = [model[0].weight, model[2].weight]
    return [{"params": weights, "quant_bits": 2}, {"params": [model[0].bias, model[2].bias]}]


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("fused", [True, False])
def test_qat_from_a_full_precision_optimizer_checkpoint(fused):
    """The public release's flow: train in full precision, then wrap a fresh base optimizer
    for QAT and load the plain optimizer's state dict. torch replaces the groups' keys on
    load; the wrapper's QAT keys (quant_bits, ...) the checkpoint lacks must be kept."""
    from parq.optim import ProxHardQuant, QuantOptimizer

    model = _fp_then_qat_model()
    plain = torch.optim.AdamW([{"params": g["params"]} for g in _groups(model)], lr=1e-2)
    _steps(model, plain, 3, seed=1)
    fp_state = plain.state_dict()

    base = torch.optim.AdamW(_groups(model), lr=1e-2)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_period=1, fused=fused)
    opt.load_state_dict(fp_state)
    assert opt.param_groups[0]["quant_bits"] == 2 and "quant_bits" not in opt.param_groups[1]
    assert opt.param_groups[0]["initial_wd"] == 1e-2 and opt.num_steps == 0
    _steps(model, opt, 2, seed=2)
    for p in opt.param_groups[0]["params"]:
        assert p.unique().numel() <= 4  # hard-quantized to the 4 two-bit levels
        assert float(opt.state[p]["step"]) == 5  # AdamW's state carried on
    assert opt.num_steps == 2
    assert opt.param_groups[1]["params"][0].unique().numel() > 4  # not quantized


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_steps_like_the_original(fused, how):
    """copy.deepcopy / pickle of a QuantOptimizer (with its model) work as for any torch
    optimizer, mid-annealing, and the copy goes on bitwise like the original."""
    import copy
    import pickle

    from parq.optim import QuantOptimizer

    model = _fp_then_qat_model()
    base = torch.optim.AdamW(_groups(model), lr=1e-2)
    opt = QuantOptimizer(base, LSBQuantizer(), ProxPARQ(1, 8), quant_period=2, fused=fused)
    _steps(model, opt, 3, seed=1)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert type(opt2) is QuantOptimizer and opt2.defaults == opt.defaults
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    _steps(model, opt, 4, seed=2)
    _steps(model2, opt2, 4, seed=2)
    assert opt2.num_steps == opt.num_steps == 7
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state[b][key])), key

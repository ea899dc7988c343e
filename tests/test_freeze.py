"""QuantOptimizer(freeze_step=...) (SPEC.md §9): hard quantization with fresh levels at the
freeze step, then frozen quantized weights while the other groups keep training."""

from __future__ import annotations

import copy

import pytest
import torch

from parq.optim import ProxHardQuant, ProxPARQ, ProxQuant, QuantOptimizer
from parq.quant import LSBQuantizer, UnifQuantizer


def _setup(freeze_step=4, base="sgd", prox=None, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))  # fmt: skip
    weights = [model[0].weight, model[3].weight]
    others = [model[0].bias, model[1].weight, model[1].bias, model[3].bias]
    groups = [{"params": weights, "quant_bits": 2}, {"params": others}]
    if base == "sgd":
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01)
    prox = prox or ProxPARQ(0, 50)
    qopt = QuantOptimizer(opt, UnifQuantizer(), prox, quant_period=3,
                          quant_per_channel=True, freeze_step=freeze_step, **kwargs)  # fmt: skip
    return model, qopt, weights, others


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 10, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize(
    "kwargs", [{}, {"fused": False}, {"fuse_base_step": False}, {"base": "adamw"},
               {"prox": ProxQuant(0.1)}, {"warmup_steps": 2}],
    ids=["fused-step", "generic", "fused-prox", "adamw", "proxquant", "warmup"],
)  # fmt: skip
def test_freeze_step_hard_then_frozen(kwargs):
    model, opt, weights, others = _setup(freeze_step=4, **kwargs)
    twin_model, twin, twin_weights, _ = _setup(freeze_step=None, **kwargs)
    _train(model, opt, 4)  # steps 0..3: annealing, not yet hard
    _train(twin_model, twin, 4)
    assert opt.num_steps == 4
    assert any(not bool((w[..., None] == opt.state[w]["quants"][:, None]).any(-1).all())
               for w in weights)  # fmt: skip
    # the twin's step 4 made a hard level-update step by hand: what freezing must do
    twin.prox_map, twin.quant_period = ProxHardQuant(), 2
    _train(model, opt, 1, seed=2)  # step 4: the freeze step (not a level update by period)
    _train(twin_model, twin, 1, seed=2)
    for w, tw in zip(weights, twin_weights, strict=True):
        Q = opt.state[w]["quants"]
        assert torch.equal(Q, twin.state[tw]["quants"])  # fresh levels
        assert torch.equal(w.detach(), tw.detach())  # p = hard(p)
        assert bool((w[..., None] == Q[:, None]).any(-1).all())
        assert torch.equal(opt.state[w]["latent"], w.detach())  # latent = p
    frozen = [w.detach().clone() for w in weights]
    base_state = {id(w): copy.deepcopy({k: v for k, v in opt.state[w].items()}) for w in weights}
    others_before = [p.detach().clone() for p in others]
    _train(model, opt, 5, seed=3)
    assert opt.num_steps == 10
    assert [p.path for p in opt.step_paths] == ["frozen", "base step"]
    for w, f in zip(weights, frozen, strict=True):
        assert torch.equal(w.detach(), f) and torch.equal(opt.state[w]["latent"], f)
        assert w.grad is not None and w.grad.abs().sum() > 0  # gradients there, ignored
        for key, value in base_state[id(w)].items():
            assert torch.equal(opt.state[w][key], value), key  # base state kept
    # the other groups keep training (others[0], a bias before BatchNorm, gets no gradient)
    changed = [not torch.equal(p.detach(), b) for p, b in zip(others, others_before, strict=True)]
    assert all(changed[1:])


def test_frozen_state_dict_round_trip():
    model, opt, _, _ = _setup(freeze_step=3)
    _train(model, opt, 6)
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    _, opt2, _, _ = _setup(freeze_step=3)
    opt2_model = opt2  # rebuild on model2's parameters
    groups = [
        {"params": [model2[0].weight, model2[3].weight], "quant_bits": 2},
        {"params": [model2[0].bias, model2[1].weight, model2[1].bias, model2[3].bias]},
    ]
    base2 = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    opt2 = QuantOptimizer(base2, UnifQuantizer(), ProxPARQ(0, 50), quant_period=3,
                          quant_per_channel=True, freeze_step=3)  # fmt: skip
    del opt2_model
    opt2.load_state_dict(sd)
    assert opt2.num_steps == 6
    _train(model, opt, 3, seed=7)
    _train(model2, opt2, 3, seed=7)
    assert opt2.step_paths[0].path == "frozen"
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["param_groups"][0]["num_steps"] == 9


def test_freeze_with_lsbq_and_closure():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    base = torch.optim.SGD([{"params": [model.weight], "quant_bits": 1},
                            {"params": [model.bias]}], lr=0.1)  # fmt: skip
    opt = QuantOptimizer(base, LSBQuantizer(), ProxPARQ(0, 100), freeze_step=0)
    x = torch.randn(5, 6)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    opt.step(closure)  # step 0 is the freeze step
    Q = opt.state[model.weight]["quants"]
    assert bool((model.weight.detach()[..., None] == Q).any(-1).all())
    w = model.weight.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 2 and torch.is_tensor(loss)
    assert torch.equal(model.weight.detach(), w)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_freeze_step(bad):
    model = torch.nn.Linear(3, 2)
    base = torch.optim.SGD([{"params": [model.weight], "quant_bits": 2}], lr=0.1)
    with pytest.raises(ValueError, match="freeze_step"):
        QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 10), freeze_step=bad)


def test_freeze_step_before_warmup_rejected():
    model = torch.nn.Linear(3, 2)
    base = torch.optim.SGD([{"params": [model.weight], "quant_bits": 2}], lr=0.1)
    with pytest.raises(ValueError, match="freeze_step must be >= warmup_steps"):
        QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 10), warmup_steps=5, freeze_step=2)

"""``parq.diffq`` front end (SPEC.md §11): parameter selection, the size formula,
bits <-> logits, eval weights, the hooks, the optimizer set-up and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from parq.diffq import DiffQuantizer
from parq_kernels.reference_diffq import (
    PARAM_BITS,
    PARAM_NOISE,
    bits_from_logits,
    logits_from_bits,
    noise_scale_from_logits,
)

MB = 2**23


def _model() -> nn.Module:
    """``0``: Linear(100, 50) (5000-element weight, quantized by default; bias 50),
    ``1``: Linear(10, 10) (too small)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 50), nn.Linear(10, 10))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(self.a(x))


def _size(G: int, ng: int, b: float, min_bits: float = 2) -> float:
    return G * ng * b + 64 + 8 + math.ceil(math.log2(1 + round(b) - min_bits)) * ng


@pytest.mark.parametrize("group,G,ng", [(0, 5000, 1), (1, 1, 5000), (8, 8, 625)])
@pytest.mark.parametrize("float16", [False, True])
def test_size_formula(group, G, ng, float16):
    q = DiffQuantizer(_model(), group_size=group, float16=float16)
    assert [qp.name for qp in q._qparams] == ["0.weight"]
    other = 160 * (16 if float16 else 32)
    for exact in (False, True):
        got = float(q.model_size(exact=exact).detach()) * MB
        assert got == pytest.approx(other + _size(G, ng, 8.0), rel=1e-6)
    assert q.true_model_size() == pytest.approx((other + _size(G, ng, 8.0)) / MB)


@pytest.mark.parametrize("group", [5000, 5001, 10**6])
def test_size_counts_a_group_at_most_the_tensor(group):
    """A group larger than its tensor counts the tensor's numel, not group_size elements
    (SPEC.md §11): one 5000-element group, as with group_size=0."""
    q = DiffQuantizer(_model(), group_size=group)
    for exact in (False, True):
        got = float(q.model_size(exact=exact).detach()) * MB
        assert got == pytest.approx(160 * 32 + _size(5000, 1, 8.0), rel=1e-6)


def test_size_uses_extra_bits_and_rounds_when_exact():
    q = DiffQuantizer(_model(), group_size=0, init_bits=5.3, extra_bits=1)
    assert float(q.model_size().detach()) * MB == pytest.approx(
        5120 + _size(5000, 1, 6.3), rel=1e-5
    )
    assert q.true_model_size() * MB == pytest.approx(5120 + _size(5000, 1, 6.0), rel=1e-6)


def test_size_is_differentiable_in_the_logits():
    q = DiffQuantizer(_model(), group_size=8)
    q.model_size().backward()
    grad = q._qparams[0].logit.grad
    assert grad is not None and bool((grad > 0).all())


def test_selection_min_size_and_exclude():
    assert len(DiffQuantizer(_model(), min_size=0)._qparams) == 4
    for pat in (["0.weight"], ["weight"], ["0.*"]):
        q = DiffQuantizer(_model(), exclude=pat)
        assert q._qparams == [] and float(q.model_size().detach()) * MB == 5160 * 32
    q = DiffQuantizer(_model(), min_size=0, exclude=["bias"])
    assert [qp.name for qp in q._qparams] == ["0.weight", "1.weight"]
    assert not hasattr(_model()[0], "weight_diffq")
    assert DiffQuantizer(_model()).model[0].weight_diffq.shape == (5000,)


def test_tied_weights_counted_once():
    q = DiffQuantizer(Tied(), min_size=0, group_size=0)
    assert [qp.name for qp in q._qparams] == ["a.weight", "a.bias", "b.bias"]
    assert len(q._qparams[0].owners) == 2
    sizes = [_size(4096, 1, 8.0), _size(64, 1, 8.0), _size(64, 1, 8.0)]
    assert float(q.model_size().detach()) * MB == pytest.approx(sum(sizes), rel=1e-6)
    assert len(DiffQuantizer(Tied(), min_size=0, detect_bound=False)._qparams) == 4


@pytest.mark.parametrize("param", [PARAM_BITS, PARAM_NOISE])
def test_bits_logits_round_trip(param):
    bits = torch.linspace(2.01, 14.99, 50)
    logits = logits_from_bits(bits, 2, 15, param)
    torch.testing.assert_close(bits_from_logits(logits, 2, 15, param), bits, rtol=1e-4, atol=1e-4)
    logits = torch.linspace(-6, 6, 25)
    back = logits_from_bits(bits_from_logits(logits, 2, 15, param), 2, 15, param)
    torch.testing.assert_close(back, logits, rtol=1e-3, atol=1e-3)
    D = noise_scale_from_logits(logits, 2, 15, param)
    torch.testing.assert_close(D, 1 / (2 ** bits_from_logits(logits, 2, 15, param) - 1))


def test_param_formulas():
    sig = torch.sigmoid(torch.tensor(0.3))
    assert float(bits_from_logits(torch.tensor(0.3), 2, 15, PARAM_BITS)) == pytest.approx(
        float(2 + sig * 13)
    )
    s_min, s_max = 1 / (2**15 - 1), 1 / (2**2 - 1)
    s = math.exp(float(sig) * math.log(s_min) + (1 - float(sig)) * math.log(s_max))
    got = float(bits_from_logits(torch.tensor(0.3), 2, 15, PARAM_NOISE))
    assert got == pytest.approx(math.log2(1 + 1 / s), rel=1e-5)


@pytest.mark.parametrize("param", ["bits", "noise"])
def test_init_bits(param):
    q = DiffQuantizer(_model(), group_size=8, param=param, init_bits=5)
    torch.testing.assert_close(q.get_bits()["0.weight"], torch.full((625,), 5.0))


def _expected_eval(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mn, mx = w.min(), w.max()
    scale = 2**b - 1
    return torch.round((w - mn) / (mx - mn) * scale) / scale * (mx - mn) + mn


def test_eval_uses_true_quantization_and_hooks_clean_up():
    model = _model()
    q = DiffQuantizer(model, group_size=0, init_bits=3.2, extra_bits=0.6)  # b = round(3.8) = 4
    model.eval()
    x = torch.randn(4, 100)
    w = model[0].weight.detach()
    expected = _expected_eval(w, torch.tensor(4.0))
    assert len(torch.unique(expected)) <= 16
    assert torch.equal(q._eval_weights()[0], expected)
    y = model[0](x)  # a submodule on its own: latent weights
    assert torch.equal(y, F.linear(x, w, model[0].bias))
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(w=m.weight))
    with pytest.raises(RuntimeError, match="shapes"):  # Linear(10, 10) after Linear(100, 50)
        model(x)  # raises after the hook: the quantized weights are still removed
    assert torch.equal(seen["w"], expected)
    assert "weight" not in model[0].__dict__ and isinstance(model[0].weight, nn.Parameter)


def test_constant_weight_is_kept():
    model = nn.Sequential(nn.Linear(100, 50))
    with torch.no_grad():
        model[0].weight.fill_(0.25)
    q = DiffQuantizer(model)
    assert torch.equal(q._eval_weights()[0], model[0].weight.detach())


def test_training_forward_needs_setup_optimizer():
    model = nn.Sequential(nn.Linear(100, 50))
    q = DiffQuantizer(model)
    with pytest.raises(RuntimeError, match="setup_optimizer"):
        model(torch.randn(2, 100))
    model.eval()
    model(torch.randn(2, 100))  # eval needs no optimizer
    model.train()
    q.no_optimizer()
    out = model(torch.randn(2, 100))
    assert out.requires_grad


def test_setup_optimizer_moves_the_logits():
    model = nn.Sequential(nn.Linear(100, 50))
    q = DiffQuantizer(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    q.setup_optimizer(opt, lr=0.02)
    logit = model[0].weight_diffq
    assert all(p is not logit for p in opt.param_groups[0]["params"])
    assert len(opt.param_groups[0]["params"]) == 2
    assert opt.param_groups[1]["params"] == [logit]
    assert opt.param_groups[1]["lr"] == 0.02 and opt.param_groups[1]["weight_decay"] == 0
    x = torch.randn(8, 100)
    loss = model(x).square().mean() + 10 * q.model_size()
    loss.backward()
    before = logit.detach().clone()
    opt.step()
    assert not torch.equal(before, logit.detach())


def test_setup_optimizer_bad_arguments():
    q = DiffQuantizer(nn.Sequential(nn.Linear(100, 50)))
    with pytest.raises(TypeError, match="optimizer"):
        q.setup_optimizer(None)
    opt = torch.optim.SGD(q.model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        q.setup_optimizer(opt, lr=-1.0)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 3


@pytest.mark.parametrize(
    "kwargs,name",
    [({"group_size": -1}, "group_size"), ({"param": "bit"}, "param"),
     ({"noise": "laplace"}, "noise"), ({"min_bits": 8, "max_bits": 4}, "min_bits"),
     ({"init_bits": 16}, "init_bits"), ({"min_size": -1}, "min_size"),
     ({"max_bits": 16}, "max_bits"), ({"suffix": ""}, "suffix"),
     ({"extra_bits": float("nan")}, "extra_bits"), ({"extra_bits": float("inf")}, "extra_bits"),
     ({"init_bits": float("nan")}, "init_bits"), ({"min_size": float("nan")}, "min_size")],
)  # fmt: skip
def test_bad_arguments_leave_no_state(kwargs, name):
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=name):
        DiffQuantizer(model, **kwargs)
    assert [n for n, _ in model.named_parameters()] == names
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_detach_removes_hooks():
    model = nn.Sequential(nn.Linear(100, 50))
    q = DiffQuantizer(model)
    q.detach()
    model(torch.randn(2, 100))  # no setup_optimizer needed any more
    assert not model._forward_pre_hooks


def test_tied_weight_is_replaced_in_every_owner():
    model = Tied()
    q = DiffQuantizer(model, min_size=0, group_size=0, init_bits=3)
    model.eval()
    seen = []
    for m in (model.a, model.b):
        m.register_forward_hook(lambda mod, i, o: seen.append(mod.weight))
    model(torch.randn(2, 64))
    assert seen[0] is seen[1]
    assert len(torch.unique(seen[0])) <= 8 and not isinstance(seen[0], nn.Parameter)
    assert torch.equal(seen[0], q._eval_weights()[0])


def test_integer_like_arguments():
    import numpy as np

    q = DiffQuantizer(_model(), group_size=np.int64(8), init_bits=np.float64(4.0))
    assert q.group_size == 8 and isinstance(q.group_size, int)
    with pytest.raises(TypeError, match="min_bits"):
        DiffQuantizer(_model(), min_bits="2")
    with pytest.raises(ValueError, match="group_size"):
        DiffQuantizer(_model(), group_size=2.5)

"""The fused step's call kept between steps (parq.optim.fused_call): a group steps through
it once it has taken the fused step, with the same bits as the general code, and a change
of parameters, storage, state, gradients or options between steps is honoured."""

from __future__ import annotations

import copy

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)

from parq.optim import ProxHardQuant, ProxPARQ, QuantOptimizer, fused_call
from parq.quant import MaxUnifQuantizer, UnifQuantizer
from parq_kernels import backends

_WHY = backends.availability("cpu")["cpu"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
SHAPES = [(16, 144), (16,), (32, 16, 3, 3), (10, 10), (64,)]


def _build(base: str, seed: int = 0, **kw):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    groups = [{"params": [p for p in params if p.dim() > 1], "quant_bits": 2},
              {"params": [p for p in params if p.dim() == 1]}]  # fmt: skip
    if base == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.01)
    quantizer = kw.pop("quantizer", None) or UnifQuantizer()
    prox = kw.pop("prox", None) or ProxPARQ(anneal_start=0, anneal_end=30)
    return params, QuantOptimizer(opt, quantizer, prox, quant_period=3, **kw)


def _grads(params, step: int):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.05


def _kept(opt) -> bool:
    return (fused_call.KEY, 0) in opt.__dict__.get("_fused_views", {})


def _run(base, steps, uncached: bool, between=None, **kw):
    """``steps`` steps; ``uncached``: the kept call dropped before each step (the general
    code every time); ``between(step, params, opt)`` runs before each step's gradients."""
    params, opt = _build(base, **kw)
    for step in range(steps):
        if between is not None:
            between(step, params, opt)
        _grads(params, step)
        if uncached:
            opt.__dict__.pop("_fused_views", None)
        opt.step()
    return params, opt


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(x, y)
        for key, v in oa.state[x].items():
            if torch.is_tensor(v):
                assert torch.equal(v, ob.state[y][key]), key


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_kept_call_is_used_and_gives_the_same_bits(base):
    kept = _run(base, 8, uncached=False)
    assert _kept(kept[1]) and str(kept[1].step_paths[0]) == "fused step"
    _assert_same(kept, _run(base, 8, uncached=True))
    if base == "adamw":  # the state's step counters still count every step
        assert all(int(kept[1].state[p]["step"]) == 8 for p in kept[0] if p.dim() > 1)


def test_the_4bit_recipe_through_the_kept_call():
    kw = {"quantizer": MaxUnifQuantizer(), "prox": ProxHardQuant()}
    kept = _run("adamw", 7, uncached=False, **kw)
    _assert_same(kept, _run("adamw", 7, uncached=True, **kw))


def _replace_buffer(step, params, opt):
    if step == 4:  # a user resets a parameter's momentum by replacing its buffer
        opt.state[params[0]]["momentum_buffer"] = torch.zeros_like(params[0])


def _new_storage(step, params, opt):
    if step == 4:
        params[2].data = params[2].data.clone()


def _reset_state(step, params, opt):
    if step == 4:
        opt.state[params[3]] = {}


def _change_lr(step, params, opt):
    opt.param_groups[0]["lr"] = 0.05 / (1 + step)


def _change_bits(step, params, opt):
    if step == 4:  # a new level set (4 bits): the levels are recomputed at once
        opt.param_groups[0]["quant_bits"] = 4


@pytest.mark.parametrize(
    "between", [_replace_buffer, _new_storage, _reset_state, _change_lr, _change_bits],
    ids=lambda f: f.__name__.strip("_"),
)  # fmt: skip
def test_changes_between_steps_are_honoured(between):
    kept = _run("sgd", 8, uncached=False, between=between)
    _assert_same(kept, _run("sgd", 8, uncached=True, between=between))
    if between is _change_bits:
        assert kept[1].state[kept[0][0]]["quants"].shape[-1] == 16


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_a_missing_gradient_leaves_the_kept_call(base):
    def drop(step, params, opt):
        if step == 4:
            params[0].grad = None

    def run(uncached: bool):
        params, opt = _build(base)
        for step in range(8):
            _grads(params, step)
            drop(step, params, opt)
            if uncached:
                opt.__dict__.pop("_fused_views", None)
            opt.step()
            if step == 4:
                assert not _kept(opt)  # two op calls this step (one without a gradient)
        return params, opt

    kept = run(False)
    _assert_same(kept, run(True))
    # SGD: one call again at the next step; Adam: its step counters now differ between the
    # parameters, so the group keeps two calls (one per counter)
    assert _kept(kept[1]) == (base == "sgd")


def test_a_loaded_checkpoint_or_a_copy_does_not_reuse_the_call():
    params, opt = _run("adamw", 4, uncached=False)
    twin = copy.deepcopy(opt)
    assert not _kept(twin)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert not _kept(opt)
    # after loading, the state's tensors are new: the step writes them, not the old ones
    _grads(params, 4)
    opt.step()
    assert int(opt.state[params[0]]["step"]) == 5

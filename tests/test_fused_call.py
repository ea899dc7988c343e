"""The fused step's call kept between steps (parq.optim.fused_call): a group steps through
it once it has taken the fused step, with the same bits as the general code, and a change
of parameters, storage, state, gradients or options between steps is honoured."""

from __future__ import annotations

import copy

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)
from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS
from step_harness import OPTIM_CONFIGS, run_step

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


def test_the_cpu_call_passes_the_gradients_as_they_are():
    """The C++ kernels read a gradient of any contiguous shape of the parameter's numel
    (csrc/validate_step.cpp), so the kept CPU call makes no view per parameter and step;
    another backend gets (rows, cols) views."""
    params, opt = _run("sgd", 4, uncached=False)
    call = opt.__dict__["_fused_views"][(fused_call.KEY, 0)]
    assert call.views == [0] * len(call.params)
    assert any(tuple(p.shape) != s for p, s in zip(call.params, call.shapes, strict=True))
    _, ref = _run("sgd", 4, uncached=False, backend="reference")
    ref_call = ref.__dict__["_fused_views"][(fused_call.KEY, 0)]
    assert ref_call.views != [0] * len(ref_call.params)


def test_the_cpu_op_reads_any_shape_of_the_parameters_numel():
    g = torch.Generator().manual_seed(3)
    lat = [torch.randn(8, 36, generator=g)]
    grad = torch.randn(8, 4, 3, 3, generator=g)  # a conv weight's gradient, (rows, cols) = (8, 36)
    oc = next(c for c in OPTIM_CONFIGS if c.name == "adamw")
    qc = next(c for c in QUANT_CONFIGS if c.name == "unif-b2")
    bufs = [[torch.zeros(8, 36)] for _ in range(oc.nbufs)] + [[]] * (3 - oc.nbufs)
    flat = run_step("cpu", lat, [grad], bufs, oc, qc, PROX_CONFIGS[0])
    rows = run_step("cpu", lat, [grad.view(8, 36)], bufs, oc, qc, PROX_CONFIGS[0])
    for a, b in zip(flat.params + flat.latents, rows.params + rows.latents, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a contiguous Float tensor of 288"):
        run_step("cpu", lat, [torch.randn(8, 35)], bufs, oc, qc, PROX_CONFIGS[0])
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a contiguous"):
        run_step("cpu", lat, [torch.randn(36, 8).t()], bufs, oc, qc, PROX_CONFIGS[0])

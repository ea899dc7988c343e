"""The groups left to the base optimizer take torch's fused kernel directly
(parq.optim.base_call): the same bits as ``torch.optim``'s own step on every option, and
anything the direct call does not cover (hooks, a missing gradient, a replaced state,
a scheduler on the base optimizer, a grad scaler) takes ``base_optimizer.step()``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)

from parq.optim import ProxPARQ, QuantOptimizer, base_call
from parq.quant import UnifQuantizer
from parq_kernels import backends

_WHY = backends.availability("cpu")["cpu"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
QSHAPES = [(16, 12), (8, 4, 3, 3)]
SHAPES = [(16,), (8,), (5, 7), (3,)]  # the unquantized group (a 2-D one too)

SGD = [
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
    {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "nesterov": False, "maximize": True},
    {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
    {"lr": 0.05, "momentum": 0.0, "weight_decay": 1e-3},
]
ADAM = [
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.01}),
    ("AdamW", {"lr": 1e-2, "betas": (0.9, 0.95), "amsgrad": True, "maximize": True}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.01}),
    ("Adam", {"lr": 1e-2, "weight_decay": 0.01, "decoupled_weight_decay": True}),
]


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in QSHAPES]
    u = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    return q, u


def _grads(params, step: int):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.05


def _pair(cls: str, kw: dict, fused=True):
    """(QuantOptimizer over a quantized and an unquantized group, torch's optimizer of the
    same class and options over copies of the unquantized tensors)."""
    q, u = _tensors()
    ref = [torch.nn.Parameter(p.detach().clone()) for p in u]
    make = getattr(torch.optim, cls)
    base = make([{"params": q, "quant_bits": 2}, {"params": u}], fused=fused, **kw)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 20), quant_period=2)
    return (q, u, opt), (ref, make(ref, fused=fused, **kw))


def _step_both(ours, theirs, steps: int, between=None):
    (q, u, opt), (ref, torch_opt) = ours, theirs
    for step in range(steps):
        if between is not None:
            between(step, opt, torch_opt)
        _grads(q + u, step)
        _grads(ref, step)
        for p, r in zip(u, ref, strict=True):  # the unquantized group's gradients equal
            r.grad = p.grad.clone()
        opt.step()
        torch_opt.step()


def _assert_same(ours, theirs):
    (_, u, opt), (ref, torch_opt) = ours, theirs
    for p, r in zip(u, ref, strict=True):
        assert torch.equal(p, r)
        st, rst = opt.state[p], torch_opt.state[r]
        assert st.keys() == rst.keys()
        for key, v in rst.items():
            assert torch.equal(st[key], v), key


def _kept(opt, index: int = 1) -> bool:
    return (base_call.KEY, index) in opt.__dict__.get("_fused_views", {})


@pytest.mark.parametrize("kw", SGD)
def test_sgd_group_steps_through_the_kernel_with_torchs_bits(kw):
    ours, theirs = _pair("SGD", kw)
    _step_both(ours, theirs, 6)
    assert _kept(ours[2]) and str(ours[2].step_paths[0]) == "fused step"
    _assert_same(ours, theirs)


@pytest.mark.parametrize(("cls", "kw"), ADAM)
def test_adam_group_steps_through_the_kernel_with_torchs_bits(cls, kw):
    ours, theirs = _pair(cls, kw)
    _step_both(ours, theirs, 6)
    assert _kept(ours[2])
    _assert_same(ours, theirs)
    assert all(int(ours[2].state[p]["step"]) == 6 for p in ours[1])


def test_options_changed_between_steps_are_read_at_each_step():
    ours, theirs = _pair("AdamW", {"lr": 1e-2, "weight_decay": 0.01})

    def between(step, opt, torch_opt):
        for g in (opt.param_groups[1], torch_opt.param_groups[0]):
            g["lr"] = 1e-2 / (1 + step)
            g["betas"] = (0.9, 0.99 if step > 2 else 0.999)
            g["weight_decay"] = 0.01 * step

    _step_both(ours, theirs, 6, between)
    assert _kept(ours[2])
    _assert_same(ours, theirs)


def test_not_fused_base_groups_take_the_base_step():
    ours, theirs = _pair("SGD", SGD[0], fused=None)
    _step_both(ours, theirs, 4)
    assert not _kept(ours[2])
    _assert_same(ours, theirs)


def test_a_missing_gradient_is_skipped_as_torch_does():
    ours, theirs = _pair("SGD", SGD[0])
    (q, u, opt), (ref, torch_opt) = ours, theirs
    _step_both(ours, theirs, 3)
    assert _kept(opt)
    _grads(q + u, 9)
    for p, r in zip(u, ref, strict=True):
        r.grad = p.grad.clone()
    u[1].grad = ref[1].grad = None
    opt.step()
    torch_opt.step()
    assert not _kept(opt)
    _assert_same(ours, theirs)
    _step_both(ours, theirs, 2)  # all gradients back: kept again
    assert _kept(opt)
    _assert_same(ours, theirs)


def test_a_replaced_state_tensor_is_used():
    ours, theirs = _pair("SGD", SGD[0])
    u, ref = ours[1], theirs[0]
    _step_both(ours, theirs, 3)

    def reset(step, opt, torch_opt):
        if step == 0:  # a buffer replaced in its state dict
            opt.state[u[0]]["momentum_buffer"] = torch.full_like(u[0], 0.5)
            torch_opt.state[ref[0]]["momentum_buffer"] = torch.full_like(ref[0], 0.5)
        if step == 1:  # the state dict replaced
            opt.state[u[2]] = {"momentum_buffer": torch.ones_like(u[2])}
            torch_opt.state[ref[2]] = {"momentum_buffer": torch.ones_like(ref[2])}

    _step_both(ours, theirs, 3, reset)
    _assert_same(ours, theirs)


def test_a_loaded_checkpoint_and_a_copy_step_as_torch():
    ours, theirs = _pair("AdamW", ADAM[0][1])
    opt, torch_opt = ours[2], theirs[1]
    _step_both(ours, theirs, 3)
    saved, saved_ref = copy.deepcopy(opt.state_dict()), copy.deepcopy(torch_opt.state_dict())
    _step_both(ours, theirs, 2)
    opt.load_state_dict(saved)
    torch_opt.load_state_dict(saved_ref)
    assert not _kept(opt)
    _step_both(ours, theirs, 2)
    assert _kept(opt)
    twin = copy.deepcopy(opt)  # steps its own tensors, not the original's kept lists
    assert not _kept(twin)
    twin.step()
    _assert_same(ours, theirs)


def test_hooks_and_a_scheduler_on_the_base_optimizer_see_its_step():
    ours, theirs = _pair("SGD", SGD[0])
    (_, _, opt), _ = ours, theirs
    calls = []
    handle = opt.base_optimizer.register_step_post_hook(lambda *_: calls.append(1))
    _step_both(ours, theirs, 3)
    assert len(calls) == 3 and not _kept(opt)
    handle.remove()
    _step_both(ours, theirs, 2)
    assert _kept(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer, step_size=1, gamma=0.5)
    torch_sched = torch.optim.lr_scheduler.StepLR(theirs[1], step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(2):
            _step_both(ours, theirs, 1)
            sched.step()
            torch_sched.step()
    assert not _kept(opt)
    _assert_same(ours, theirs)


def test_a_grad_scaler_attribute_takes_the_base_step():
    ours, theirs = _pair("AdamW", ADAM[0][1])
    (_, _, opt), (_, torch_opt) = ours, theirs
    _step_both(ours, theirs, 2)
    assert _kept(opt)
    for o in (opt.base_optimizer, torch_opt):
        o.grad_scale = torch.tensor(2.0)
        o.found_inf = torch.tensor(0.0)
    _step_both(ours, theirs, 2)
    assert not _kept(opt)
    _assert_same(ours, theirs)


def test_dtensor_groups_take_the_base_step():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        q, u = _tensors()
        d = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])) for p in u]
        ref = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])) for p in u]
        base = torch.optim.AdamW([{"params": q, "quant_bits": 2}, {"params": d}], lr=1e-2,
                                 fused=True)  # fmt: skip
        opt = QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 20), quant_period=2)
        torch_opt = torch.optim.AdamW(ref, lr=1e-2, fused=True)
        for step in range(3):
            _grads(q + u, step)
            for p, r, plain in zip(d, ref, u, strict=True):
                p.grad = distribute_tensor(plain.grad, mesh, [Replicate()])
                r.grad = distribute_tensor(plain.grad.clone(), mesh, [Replicate()])
            opt.step()
            torch_opt.step()
        assert not _kept(opt)
        for p, r in zip(d, ref, strict=True):
            assert torch.equal(p.full_tensor(), r.full_tensor())
    finally:
        dist.destroy_process_group()

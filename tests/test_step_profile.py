"""QuantOptimizer.step's profiling wrapper (parq/optim/step_profile.py) behaves as torch's
``Optimizer.profile_hook_step``: the profiler sees an ``Optimizer.step#QuantOptimizer.step``
range around the step (its kernel inside it), the global and the optimizer's step hooks run
in torch's order, a pre-hook may replace the arguments, a bad pre-hook return is refused
with torch's message; torch's own wrapper serves where the C++ range is missing."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from parq.optim import ProxPARQ, QuantOptimizer, step_profile
from parq.quant import UnifQuantizer


def _opt():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 16)) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn_like(p)
    base = torch.optim.SGD([{"params": ps, "quant_bits": 2}], lr=0.1, momentum=0.9, fused=True)
    return QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 10), quant_period=1)


def test_the_profiler_sees_the_step_range_around_its_kernel():
    opt = _opt()
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    events = {e.name: e for e in prof.events()}
    step = events.get("Optimizer.step#QuantOptimizer.step")
    assert step is not None, sorted(events)
    kernel = events["parq_kernels_C::fused_step_"]
    start, end = step.time_range.start, step.time_range.end
    assert start <= kernel.time_range.start and kernel.time_range.end <= end


def test_hooks_run_in_torchs_order_and_may_replace_the_arguments():
    opt = _opt()
    seen = []
    closures = []

    def pre(o, args, kwargs):
        seen.append(("pre", len(args), dict(kwargs)))
        return args, {"closure": lambda: closures.append(1) or 0.5}

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append(("global-pre",))),
        opt.register_step_pre_hook(pre),
        opt.register_step_post_hook(lambda o, a, k: seen.append(("post", "closure" in k))),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append(("global-post",))),
    ]
    try:
        loss = opt.step()
    finally:
        for h in handles:
            h.remove()
    assert loss == 0.5 and closures == [1]  # the pre-hook's closure ran
    # (global hooks run again around the base optimizer's own step, inside: routing.py)
    assert seen[:2] == [("global-pre",), ("pre", 1, {})]
    assert seen[-2:] == [("post", True), ("global-post",)]


def test_a_bad_pre_hook_return_is_refused():
    opt = _opt()
    opt.register_step_pre_hook(lambda o, a, k: "nonsense")
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises(RuntimeError, match="must return None or a tuple of"):
        opt.step()
    after = opt.param_groups[0]["params"]
    assert all(
        torch.equal(a, b) for a, b in zip(after, before, strict=True)
    )  # the step did not run


def test_torchs_wrapper_where_the_fast_range_is_missing(monkeypatch):
    used = []

    def torch_wrapper(func):
        used.append(func)
        return func

    monkeypatch.setattr(step_profile, "_FAST_RANGE", None)
    monkeypatch.setattr(step_profile.Optimizer, "profile_hook_step", staticmethod(torch_wrapper))

    def step(self):
        return "stepped"

    assert step_profile.profile_hook_step(step) is step
    assert used == [step]

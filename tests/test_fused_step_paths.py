"""Which groups take the fused step, what falls back and why, and what stays torch's own
(SPEC.md §8): paths and reasons, checkpoints across paths and into plain torch
optimizers, closures, schedulers, groups added mid-training, missing gradients,
non-contiguous parameters."""

from __future__ import annotations

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)
from test_fused_step import (
    _assert_close,
    _assert_projection_close,
    _build,
    _grads,
    _params,
    run_pair,
)

from parq.optim import NMSGDOptimizer, ProxHardQuant, ProxPARQ, QuantOptimizer, routing
from parq.quant import UnifQuantizer


def _step(params, opt, step, **kw):
    for p, g in zip(params, _grads(step, params), strict=True):
        p.grad = g
    return opt.step(**kw)


def _paths(opt) -> list[str]:
    return [str(p) for p in opt.step_paths]


class MySGD(torch.optim.SGD):
    def step(self, closure=None):  # a user's own update: never replaced
        return super().step(closure)


class Renamed(torch.optim.AdamW):  # a subclass that keeps torch's step: still fused
    pass


class MyQuantizer(UnifQuantizer):
    def quantize(self, p, b, dim=None):
        return super().quantize(p, b, dim)


@pytest.mark.parametrize(
    ("make_base", "kw", "want"),
    [
        (lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), {}, "fused step"),
        (lambda g: Renamed(g, lr=0.01), {}, "fused step"),
        (lambda g: MySGD(g, lr=0.1), {}, "base step + fused prox (MySGD overrides "
         "torch.optim.SGD's step)"),
        (lambda g: torch.optim.RMSprop(g, lr=0.01), {}, "base step + fused prox (RMSprop is "
         "not torch.optim.SGD, Adam or AdamW)"),
        (lambda g: torch.optim.SGD(g, lr=0.1), {"fuse_base_step": False},
         "base step + fused prox (fuse_base_step=False)"),
        (lambda g: torch.optim.SGD(g, lr=0.1), {"fused": False},
         "base step + generic prox (fused=False)"),
    ],
)  # fmt: skip
def test_paths_and_reasons(make_base, kw, want):
    params = _params()
    groups = [{"params": params[:-1], "quant_bits": 2}, {"params": params[-1:]}]
    opt = QuantOptimizer(make_base(groups), UnifQuantizer(), ProxHardQuant(), **kw)
    assert opt.step_paths == []
    _step(params, opt, 0)
    assert _paths(opt) == [want, "base step"]
    assert f"param_groups[0]: {want}" in repr(opt)


def test_differentiable_base_is_not_fused():
    params = _params()
    groups = [{"params": params[:-1], "quant_bits": 2}, {"params": params[-1:]}]
    base = torch.optim.Adam(groups, lr=0.01, differentiable=True)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant())
    assert routing.routes(opt) == {0: ("base step + fused prox", "differentiable=True")}


def test_user_quantizer_and_float64_take_the_generic_path():
    params = _params()
    groups = [{"params": params[:2], "quant_bits": 2}, {"params": params[2:]}]
    opt = QuantOptimizer(torch.optim.SGD(groups, lr=0.1), MyQuantizer(), ProxHardQuant())
    _step(params, opt, 0)
    assert _paths(opt)[0] == "base step + generic prox (user quantizer MyQuantizer)"
    p64 = [torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))]
    opt = QuantOptimizer(torch.optim.SGD([{"params": p64, "quant_bits": 2}], lr=0.1),
                         UnifQuantizer(), ProxHardQuant())  # fmt: skip
    _step(p64, opt, 0)
    assert _paths(opt) == ["base step + generic prox (torch.float64 parameters)"]


def test_warmup_and_nm_sgd_paths():
    params = _params()
    groups = [{"params": params[:-1], "quant_bits": 2}, {"params": params[-1:]}]
    opt = QuantOptimizer(torch.optim.SGD(groups, lr=0.1), UnifQuantizer(), ProxHardQuant(),
                         warmup_steps=1)  # fmt: skip
    _step(params, opt, 0)
    assert _paths(opt) == ["base step (warmup)", "base step (warmup)"]
    params = _params()
    groups = [{"params": params[:-1], "quant_bits": 2}, {"params": params[-1:]}]
    opt = NMSGDOptimizer(torch.optim.SGD(groups, lr=0.1), UnifQuantizer(), ProxHardQuant(),
                         nm_gamma=2.0)  # fmt: skip
    _step(params, opt, 0)
    assert _paths(opt)[0] == "base step + fused prox (NM-SGD latent corrections)"


@pytest.mark.parametrize("base", ["sgd-mom-wd", "adamw-ams-betas"])
def test_checkpoints_move_between_paths(base):
    """fused -> unfused -> fused, continuing from state_dict() each time, equals an
    all-unfused run; the state has torch's keys, dtypes and shapes throughout."""
    mixed, plain = _params(), _params()
    for stage, fused in enumerate((True, False, True)):
        fm = _build(mixed, base, UnifQuantizer(), ProxPARQ(5, 20), fused, backend="cpu",
                    quant_per_channel=True)  # fmt: skip
        fp = _build(plain, base, UnifQuantizer(), ProxPARQ(5, 20), False, quant_per_channel=True)
        if stage:
            fm.load_state_dict(saved_m)  # noqa: F821  (set by the previous stage)
            fp.load_state_dict(saved_p)  # noqa: F821
        for step in range(stage * 8, stage * 8 + 8):
            _step(mixed, fm, step)
            _step(plain, fp, step)
        saved_m, saved_p = fm.state_dict(), fp.state_dict()
        assert saved_m["param_groups"] == saved_p["param_groups"]
        for k, sp in saved_p["state"].items():
            sm = saved_m["state"][k]
            assert sm.keys() == sp.keys(), (sorted(sm), sorted(sp))
            for key in sp:
                if torch.is_tensor(sp[key]):
                    assert sm[key].dtype == sp[key].dtype and sm[key].shape == sp[key].shape
                    _assert_close(sm[key], sp[key], f"stage {stage} state {k} {key}", ulps=8)


@pytest.mark.parametrize("base", ["sgd-mom-wd", "adamw"])
def test_a_fused_checkpoint_loads_into_a_plain_torch_optimizer(base):
    """The base optimizer's state after fused steps is torch's own: a plain torch optimizer
    that loads it continues exactly like one that loads the unfused run's state."""
    from test_fused_step import BASES

    runs = []
    for fused in (True, False):
        params = _params()
        opt = _build(params, base, UnifQuantizer(), ProxHardQuant(), fused, backend="cpu")
        for step in range(6):
            _step(params, opt, step)
        with torch.no_grad():  # continue on the latent weights
            for p in opt.param_groups[0]["params"]:
                p.copy_(opt.state[p]["latent"])
        groups = [{"params": g["params"]} for g in opt.param_groups]
        plain = BASES[base](groups)
        plain.load_state_dict(opt.base_optimizer.state_dict())
        for step in range(6, 10):
            _step(params, plain, step)
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        _assert_close(a, b, "plain continuation", ulps=8)


def test_closure_runs_once_before_any_update():
    params = _params()
    groups = [{"params": params[:-1], "quant_bits": 2}, {"params": params[-1:]}]
    opt = QuantOptimizer(torch.optim.AdamW(groups, lr=0.01), UnifQuantizer(), ProxHardQuant())
    before = [p.detach().clone() for p in params]
    seen = []

    def closure():
        seen.append([torch.equal(p, b) for p, b in zip(params, before, strict=True)])
        for p, g in zip(params, _grads(0, params), strict=True):
            p.grad = g
        return torch.tensor(1.5)

    assert float(opt.step(closure)) == 1.5
    assert seen == [[True] * len(params)]  # once, before anything moved
    assert _paths(opt)[0] == "fused step"


def test_lr_scheduler_and_anneal_wd_are_read_every_step():
    run_pair("sgd-mom-wd", UnifQuantizer, lambda: ProxPARQ(2, 12), backend="cpu", steps=14,
             quant_per_channel=True, anneal_wd_frac=0.7, warmup_steps=0)  # fmt: skip
    params = _params()
    opt = _build(params, "adamw", UnifQuantizer(), ProxHardQuant(), True, backend="cpu")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(8):
        _step(params, opt, step)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    # warmup 3 steps, then lr 1e-2 * 0.5 ** (step // 2) for steps 3..7
    assert opt.param_groups[0]["cumu_lr"] == pytest.approx(1e-2 * (0.5 + 0.25 * 2 + 0.125 * 2))


def test_group_added_mid_training_and_missing_gradients():
    """A quantized group added later starts its latent and its Adam state then; a
    parameter without a gradient is not updated but still projected."""
    pa, pb = _params(), _params()
    extra_a = torch.nn.Parameter(torch.randn(5, 4))
    extra_b = torch.nn.Parameter(extra_a.detach().clone())
    opts = [_build(params, "adamw", UnifQuantizer(), ProxHardQuant(), fused, backend="cpu",
                   quant_per_channel=True)
            for params, fused in ((pa, True), (pb, False))]  # fmt: skip
    for step in range(10):
        for params, opt, extra in ((pa, opts[0], extra_a), (pb, opts[1], extra_b)):
            if step == 5:
                opt.add_param_group({"params": [extra], "quant_bits": 3})
            for p, g in zip(params, _grads(step, params), strict=True):
                p.grad = None if (p is params[0] and step % 2) else g
            extra.grad = torch.full_like(extra, 0.1 * (step + 1))
            opt.step()
    for a, b in zip([*pa, extra_a], [*pb, extra_b], strict=True):
        _assert_close(a, b, "weights", ulps=8)
        sa, sb = opts[0].state.get(a, {}), opts[1].state.get(b, {})
        assert sa.keys() == sb.keys()
    assert _paths(opts[0])[2] == "fused step"


def test_non_contiguous_parameters():
    pa, pb = _params(), _params()
    ta = torch.nn.Parameter(torch.randn(6, 4).t())  # (4, 6), strides (1, 4)
    tb = torch.nn.Parameter(ta.detach().clone().t().contiguous().t())
    assert not ta.is_contiguous() and not tb.is_contiguous()
    opts = []
    for params, t, fused in ((pa, ta, True), (pb, tb, False)):
        groups = [{"params": [*params[:-1], t], "quant_bits": 2}, {"params": params[-1:]}]
        opts.append(QuantOptimizer(torch.optim.SGD(groups, lr=0.1, momentum=0.9),
                                   UnifQuantizer(), ProxPARQ(1, 6), quant_per_channel=True,
                                   fused=fused, backend="cpu" if fused else None))  # fmt: skip
    for step in range(8):
        for params, t, opt in ((pa, ta, opts[0]), (pb, tb, opts[1])):
            for p, g in zip([*params, t], _grads(step, [*params, t]), strict=True):
                p.grad = g
            opt.step()
    _assert_close(ta, tb, "non-contiguous weights", ulps=8)
    _assert_close(opts[0].state[ta]["momentum_buffer"], opts[1].state[tb]["momentum_buffer"],
                  "momentum", ulps=8)  # fmt: skip


def _pair_step(pairs, step):
    for params, opt in pairs:
        for p, g in zip(params, _grads(step, params), strict=True):
            p.grad = g
        opt.step()


def _assert_pair(pa, pb, fa, fb, where):
    for i, (a, b) in enumerate(zip(pa, pb, strict=True)):
        _assert_projection_close(a, b, 1.0, f"{where} weights {i}")
        if "latent" in fb.state[b]:
            _assert_close(fa.state[a]["latent"], fb.state[b]["latent"], f"{where} latent {i}")


def test_views_between_level_updates_follow_replaced_state_and_storage():
    """Between level updates the fused step reuses its views of a parameter; a state
    buffer or weight storage replaced mid-period is seen at the next step."""
    pa, pb = _params(), _params()
    kw = {"quant_period": 5, "warmup_steps": 0}
    fa = _build(pa, "sgd-mom-wd", UnifQuantizer(), ProxHardQuant(), True, **kw)
    fb = _build(pb, "sgd-mom-wd", UnifQuantizer(), ProxHardQuant(), False, **kw)
    pairs = ((pa, fa), (pb, fb))
    for step in range(3):  # a level update, then steps that reuse the views
        _pair_step(pairs, step)
    for params, opt in pairs:  # a new momentum buffer, and new storage for the weights
        state = opt.state[params[0]]
        state["momentum_buffer"] = state["momentum_buffer"] * 0.5
        params[1].data = params[1].data.clone()
    for step in range(3, 5):  # still between level updates
        _pair_step(pairs, step)
        _assert_pair(pa, pb, fa, fb, f"step {step}")
    assert "fused step" in _paths(fa)[0]


def test_views_at_level_updates_follow_a_changed_bit_width_and_layout():
    """Level updates reuse the views too; a group whose quant_bits change, or an optimizer
    whose quant_per_channel changes, gets new views (and levels) at its next update."""
    pa, pb = _params(), _params()
    kw = {"quant_period": 1, "warmup_steps": 0}
    fa = _build(pa, "sgd-mom-wd", UnifQuantizer(), ProxPARQ(0, 100), True, **kw)
    fb = _build(pb, "sgd-mom-wd", UnifQuantizer(), ProxPARQ(0, 100), False, **kw)
    pairs = ((pa, fa), (pb, fb))
    changes = {2: ("quant_bits", 3), 4: ("quant_per_channel", False), 6: ("quant_bits", 1)}
    for step in range(8):
        if step in changes:
            key, value = changes[step]
            for _, opt in pairs:
                if key == "quant_per_channel":
                    opt.quant_per_channel = value
                else:
                    opt.param_groups[0][key] = value
        _pair_step(pairs, step)
        _assert_pair(pa, pb, fa, fb, f"step {step}")
        levels = fa.state[pa[0]]["quants"]
        assert levels.shape[-1] == UnifQuantizer().get_quant_size(fa.param_groups[0]["quant_bits"])
    assert "fused step" in _paths(fa)[0]


def test_fused_step_keeps_no_gradient_alive():
    import gc
    import weakref

    params = _params()
    opt = _build(params, "adamw", UnifQuantizer(), ProxPARQ(0, 100), True, quant_period=5,
                 warmup_steps=0)  # fmt: skip
    refs = []
    for step in range(3):
        _step(params, opt, step)
        refs.append(weakref.ref(params[0].grad))
        for p in params:
            p.grad = None  # zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


_AFTER_COMPILE = """
import torch
from parq.optim import ProxPARQ, QuantOptimizer
from parq.quant import UnifQuantizer

def paths(make):
    p = torch.nn.Parameter(torch.randn(4, 8))
    p.grad = torch.randn(4, 8)
    opt = QuantOptimizer(make([{"params": [p], "quant_bits": 2}]), UnifQuantizer(), ProxPARQ(0, 9))
    opt.step()
    return str(opt.step_paths[0])

makers = [lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9), lambda g: torch.optim.Adam(g),
          lambda g: torch.optim.AdamW(g)]
before = [paths(m) for m in makers]
torch.compile(lambda x: x.sin() * 2)(torch.randn(8))  # dynamo wraps the optimizers' methods
print(before + [paths(m) for m in makers])
"""


def test_fused_step_after_torch_compile_was_used():
    """torch.compile, once used in a process, wraps the optimizer classes' ``step`` and
    ``_init_group``: AdamW (a subclass of Adam) must still be recognized."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _AFTER_COMPILE], capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == str(["fused step"] * 6)

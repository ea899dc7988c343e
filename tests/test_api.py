"""The drop-in public API (SPEC.md §1): import paths, signatures, extension points."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from foundation_models import one_thread, reference_backend  # noqa: F401
from torch import nn

import parq
from parq.optim import ProxHardQuant, ProxMap, ProxPARQ, QuantOptimizer
from parq.quant import Quantizer, UnifQuantizer

EMPTY = inspect.Parameter.empty


def test_import_paths():
    from parq import LSBQuantizer as L0
    from parq import ProxPARQ as P0
    from parq import QuantOptimizer as Q0
    from parq import UnifQuantizer as U0
    from parq.optim import (  # noqa: F401
        NMSGDOptimizer,
        ProxBinaryRelax,
        ProxHardQuant,
        ProxMap,
        ProxPARQ,
        ProxSoftQuant,
        QuantOptimizer,
        build_quant_optimizer,
    )
    from parq.quant import (  # noqa: F401
        AsymUnifQuantizer,
        LSBQuantizer,
        MaxUnifQuantizer,
        Quantizer,
        TernaryUnifQuantizer,
        UnifQuantizer,
    )
    from parq.quant.lsbq import LSBQuantizer as L1
    from parq.quant.uniform import UnifQuantizer as U1

    assert L0 is L1 is LSBQuantizer and U0 is U1 is UnifQuantizer
    assert Q0 is QuantOptimizer and P0 is ProxPARQ
    # the public release's module layout
    for module, name in [
        ("parq.optim.quantopt", "QuantOptimizer"),
        ("parq.optim.proxmap", "ProxMap"),
        ("parq.optim.proxmap", "ProxHardQuant"),
        ("parq.optim.parq", "ProxPARQ"),
        ("parq.optim.proxsoft", "ProxSoftQuant"),
        ("parq.optim.binarelax", "ProxBinaryRelax"),
        ("parq.quant.quantizer", "Quantizer"),
        ("parq.quant.uniform", "MaxUnifQuantizer"),
        ("parq.quant.uniform", "TernaryUnifQuantizer"),
        ("parq.quant.uniform", "AsymUnifQuantizer"),
    ]:
        assert getattr(importlib.import_module(module), name) is getattr(parq, name)
    for name in parq.__all__:
        assert hasattr(parq, name)


QUANT_OPT_ARGS = [
    ("base_optimizer", EMPTY),
    ("quantizer", EMPTY),
    ("prox_map", EMPTY),
    ("warmup_steps", 0),
    ("quant_period", 10),
    ("quant_per_channel", False),
    ("quant_shrink", False),
    ("anneal_wd_frac", 0.0),
]

SIGNATURES = [
    (parq.QuantOptimizer, [*QUANT_OPT_ARGS, ("group_quantizer_map", None)]),
    # as in the public release: nm_gamma is the 9th positional (group_quantizer_map keyword-only)
    (parq.NMSGDOptimizer, [*QUANT_OPT_ARGS, ("nm_gamma", 0.0)]),
    (parq.build_quant_optimizer, [*QUANT_OPT_ARGS, ("nm_gamma", 0.0)]),
    (
        parq.UnifQuantizer,
        [("center", False), ("scale_method", "mean"), ("int_shift", 0.5), ("zero_point", 0.5)],
    ),
    (
        parq.MaxUnifQuantizer,
        [("center", False), ("scale_method", "max"), ("int_shift", 1.0), ("zero_point", 0.0)],
    ),
    (parq.TernaryUnifQuantizer, [("center", False)]),
    (parq.AsymUnifQuantizer, [("center", False)]),
    (parq.LSBQuantizer, [("center", False), ("optimal", False), ("ternary_multiplier", 1.1)]),
    (parq.ProxHardQuant, []),
    (
        parq.ProxSoftQuant,
        [
            ("anneal_start", EMPTY),
            ("anneal_end", EMPTY),
            ("t_start", 1.0),
            ("t_end", 1e3),
            ("t_power", 1),
        ],
    ),
    (
        parq.ProxPARQ,
        [("anneal_start", EMPTY), ("anneal_end", EMPTY), ("steepness", 10), ("anneal_center", 0.5)],
    ),
    (parq.ProxBinaryRelax, [("anneal_start", EMPTY), ("anneal_end", EMPTY)]),
]


@pytest.mark.parametrize(("obj", "expected"), SIGNATURES, ids=[s[0].__name__ for s in SIGNATURES])
def test_signatures(obj, expected):
    params = list(inspect.signature(obj).parameters.values())
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]  # extra options (backend, fused, ...) must be keyword-only
    assert [(p.name, p.default) for p in positional] == expected
    for p in positional:
        if p.default is not EMPTY:
            assert type(p.default) is type(dict(expected)[p.name])


def test_quantizer_extension_points():
    q = UnifQuantizer()
    assert q.get_quant_size(2) == 4 and q.get_quant_size(1) == 2
    assert parq.MaxUnifQuantizer().get_quant_size(3) == 7
    assert parq.TernaryUnifQuantizer().get_quant_size(0) == 3
    assert parq.LSBQuantizer().get_quant_size(0) == 3
    assert parq.LSBQuantizer().get_quant_size(5) == 32
    assert parq.AsymUnifQuantizer().get_quant_size(3) == 8
    assert inspect.isabstract(Quantizer) and inspect.isabstract(ProxMap)


# ---------------------------------------------------------------------------
# User subclasses go through the generic per-parameter path
# ---------------------------------------------------------------------------


class SignQuantizer(Quantizer):
    """q = mean|x| * sign(x), levels [-m, m] (one bit, whatever b says)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def get_quant_size(self, b: int) -> int:
        return 2

    def quantize(self, p, b, dim=None):
        self.calls.append((tuple(p.shape), b, dim))
        if dim is None:
            m = p.abs().mean().reshape(1)
            Q = torch.cat([-m, m])
            q = torch.where(p >= 0, m, -m)
        else:
            m = p.abs().mean(dim=dim, keepdim=True)
            Q = torch.cat([-m, m], dim=-1)
            q = torch.where(p >= 0, m, -m)
        return q, Q


class ShrinkHalfway(ProxMap):
    """p = (p + hard(p)) / 2, records what it is given."""

    def __init__(self):
        self.calls = []

    def apply_(self, p, q, Q, step_count, dim=None):
        self.calls.append((tuple(p.shape), q is not None, tuple(Q.shape), step_count, dim))
        if q is None:  # nearest of two levels
            lo, hi = (Q[0], Q[1]) if dim is None else (Q[:, :1], Q[:, 1:])
            q = torch.where(p >= (lo + hi) / 2, hi, lo)
        p.copy_((p + q) / 2)
        return 0.5


@pytest.mark.parametrize("per_channel", [False, True])
def test_user_quantizer_and_prox_map(per_channel):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    free = nn.Parameter(torch.randn(4))
    base = torch.optim.SGD([{"params": [w], "quant_bits": 1}, {"params": [free]}], lr=0.1)
    quantizer, prox = SignQuantizer(), ShrinkHalfway()
    opt = QuantOptimizer(
        base, quantizer, prox, quant_period=2, quant_per_channel=per_channel, anneal_wd_frac=0.5
    )
    latent = w.detach().clone()
    for step in range(3):
        w.grad = torch.full_like(w, 0.1 * (step + 1))
        free.grad = torch.ones_like(free)
        latent = latent.add(w.grad, alpha=-0.1)
        opt.step()
        assert torch.equal(opt.state[w]["latent"], latent)
    dim = -1 if per_channel else None
    q_shape = (3, 2) if per_channel else (2,)
    assert quantizer.calls == [((3, 4), 1, dim)] * 2  # update steps 0 and 2
    assert prox.calls == [
        ((3, 4), True, q_shape, 0, dim),
        ((3, 4), False, q_shape, 1, dim),
        ((3, 4), True, q_shape, 2, dim),
    ]
    q, Q = quantizer.quantize(latent, 1, dim)
    assert torch.allclose(w.detach(), (latent + q) / 2)
    assert torch.equal(opt.state[w]["quants"], Q)
    assert opt.param_groups[0]["inv_slope"] == 0.5


def test_overriding_a_builtin_goes_generic():
    calls = []

    class LoggedUnif(UnifQuantizer):
        def quantize(self, p, b, dim=None):
            calls.append(b)
            return super().quantize(p, b, dim)

    class LoggedHard(ProxHardQuant):
        def apply_(self, p, q, Q, step_count, dim=None):
            calls.append("prox")
            return super().apply_(p, q, Q, step_count, dim)

    w = nn.Parameter(torch.randn(4, 4))
    base = torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1)
    opt = QuantOptimizer(base, LoggedUnif(), LoggedHard(), quant_period=1)
    w.grad = torch.ones_like(w)
    opt.step()
    assert calls == [2, "prox"]
    q, _ = UnifQuantizer().quantize(opt.state[w]["latent"], 2)
    assert torch.equal(w.detach(), q)


def test_builtins_use_the_fused_ops(monkeypatch):
    """torch SGD/Adam/AdamW bases: one fused_step_ call; other bases: base.step() then
    one quant_prox_ call; fused=False: neither op."""
    from parq.optim import fused_step, prox_paths

    seen = []
    for module, name in ((prox_paths, "quant_prox_"), (fused_step, "fused_step_")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: (seen.append(_n), _r(*a)))

    def run(make_base, **kw):
        seen.clear()
        w = nn.Parameter(torch.randn(4, 4))
        opt = QuantOptimizer(make_base([{"params": [w], "quant_bits": 2}]), UnifQuantizer(),
                             ProxPARQ(0, 4), **kw)  # fmt: skip
        w.grad = torch.ones_like(w)
        opt.step()
        return list(seen)

    assert run(lambda g: torch.optim.SGD(g, lr=0.1)) == ["fused_step_"]
    assert run(lambda g: torch.optim.AdamW(g, lr=0.1)) == ["fused_step_"]
    assert run(lambda g: torch.optim.RMSprop(g, lr=0.1)) == ["quant_prox_"]
    assert run(lambda g: torch.optim.SGD(g, lr=0.1), fuse_base_step=False) == ["quant_prox_"]
    assert run(lambda g: torch.optim.SGD(g, lr=0.1), fused=False) == []


def test_optimizer_is_a_torch_optimizer():
    w = nn.Parameter(torch.randn(4, 4))
    base = torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    hooks = []
    opt.register_step_post_hook(lambda o, a, k: hooks.append(o))
    w.grad = torch.ones_like(w)
    opt.step()
    assert hooks == [opt]
    assert "QuantOptimizer" in repr(opt) and "UnifQuantizer" in repr(opt)

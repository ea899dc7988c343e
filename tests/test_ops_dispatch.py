"""The op wrappers (parq_kernels.ops.quant_prox_ / fused_step_) call the implementation
directly in eager mode and go through the dispatcher otherwise (fake tensors, tracing):
both give the same result."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from parq_kernels import backends, ops
from parq_kernels.kinds import OptimKind, ProxKind, QuantKind, num_levels

HP = [0.05, 0.9, 0.0, 1e-3, 0.0, 0.0, 0.0]  # SGD: lr, momentum, dampening, wd, nesterov, ...
QARGS = [0.0, 0.5, 0.0]  # UNIFORM: scale_is_max, int_shift, zero_point
K = num_levels(QuantKind.UNIFORM, 2, QARGS)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 7), (5, 33)]
    lat = [torch.randn(s, generator=g) for s in shapes]
    return {
        "params": [torch.empty(s) for s in shapes],
        "latents": lat,
        "grads": [torch.randn(s, generator=g) for s in shapes],
        "bufs1": [torch.randn(s, generator=g) for s in shapes],
        "quants": [torch.empty(s[0], K) for s in shapes],
        "nonfinite": torch.zeros(len(shapes), dtype=torch.int32),
    }


def _call(fn, t, update=True):
    fn(t["params"], t["latents"], t["grads"], t["bufs1"], [], [], t["quants"], t["nonfinite"],
       int(OptimKind.SGD), HP, int(QuantKind.UNIFORM), 2, QARGS, False, update,
       int(ProxKind.PARQ), 0.5, 1.0, "cpu")  # fmt: skip


def test_eager_wrapper_equals_the_dispatcher():
    a, b = _inputs(), _inputs()
    for update in (True, False):
        _call(ops.fused_step_, a, update)
        _call(torch.ops.parq_kernels.fused_step_, b, update)
        for key in ("params", "latents", "bufs1", "quants"):
            for x, y in zip(a[key], b[key], strict=True):
                assert torch.equal(x, y), key


def test_fake_tensors_go_through_the_fake_impl():
    real = _inputs()
    with FakeTensorMode() as mode:
        fake = {k: [mode.from_tensor(t) for t in v] if isinstance(v, list) else mode.from_tensor(v)
                for k, v in real.items()}  # fmt: skip
        _call(ops.fused_step_, fake)  # the kernel would fail on fake tensors
        ops.quant_prox_(fake["params"], fake["latents"], fake["quants"], fake["nonfinite"],
                        int(QuantKind.UNIFORM), 2, QARGS, False, True,
                        int(ProxKind.HARD), 0.0, 1.0, "cpu")  # fmt: skip
    assert not ops._eager(fake["params"], fake["nonfinite"])
    assert ops._eager(real["params"], real["nonfinite"])


def test_availability_says_a_missing_backend_is_missing(monkeypatch):
    """Without triton installed, the table says the import failed, not which device triton
    would serve (issue 22)."""
    real = backends._load

    def fake(name):
        return (None, "triton import failed: ModuleNotFoundError: No module named 'triton'") \
            if name == "triton" else real(name)  # fmt: skip

    monkeypatch.setattr(backends, "_load", fake)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # (conftest sets it)
    why = backends.availability("cpu")["triton"]
    assert "No module named 'triton'" in why and "serves" not in why

"""The kept call's ``fused_step_`` (parq_kernels.backends.kept_step_impl, csrc/host_steps.h):
for the C++ kernels, the extension's ``fused_step_call`` runs the op through the C++
dispatcher without torch.ops' Python argument parsing. The same bits and the same checks as
the op, and the op is still seen by the profiler and by dispatch modes. The ops' Autograd key
falls through to the device kernel (csrc/ops.cpp)."""

from __future__ import annotations

import pytest
import torch
from foundation_models import one_thread  # noqa: F401  (autouse fixture)
from torch.utils._python_dispatch import TorchDispatchMode

from parq.optim import ProxPARQ, QuantOptimizer, fused_call
from parq.quant import UnifQuantizer
from parq_kernels import backends

_WHY = backends.availability("cpu")["cpu"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
OP = "parq_kernels_C::fused_step_"
UPDATE = 14  # the op's argument `update`


def _ext():
    import parq_kernels._C as ext

    return ext


def _optimizer(base: str, backend: str | None = None):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 36), (4, 2, 3, 3)]]
    if base == "sgd":
        inner = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        inner = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for group in inner.param_groups:
        group["quant_bits"] = 2
    opt = QuantOptimizer(inner, UnifQuantizer(), ProxPARQ(0, 100), quant_period=3,
                         backend=backend)  # fmt: skip
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return opt, opt.__dict__["_fused_views"][(fused_call.KEY, 0)]


def _captured_args(base: str) -> tuple:
    """The arguments of the kept call's next op call."""
    opt, call = _optimizer(base)
    seen = []
    impl = call.impl
    call.impl = lambda *args: seen.append(args) or impl(*args)
    opt.step()
    return seen[0]


def _clone(x):
    if torch.is_tensor(x):
        return x.clone()
    return [_clone(v) for v in x] if isinstance(x, list) else x


def _tensors(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if torch.is_tensor(a):
            out.append(a)
        elif isinstance(a, list):
            out += [t for t in a if torch.is_tensor(t)]
    return out


def test_the_kept_cpu_call_is_the_extensions_and_another_backends_is_its_op():
    _, call = _optimizer("sgd")
    assert call.impl is _ext().fused_step_call
    _, ref = _optimizer("sgd", backend="reference")
    assert ref.impl is backends.get_impl("reference", "fused_step_")


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("update", [False, True])
def test_the_direct_call_gives_the_ops_bits(base, update):
    args = list(_captured_args(base))
    args[UPDATE] = update
    ours, theirs = _clone(args), _clone(args)
    _ext().fused_step_call(*ours)
    torch.ops.parq_kernels_C.fused_step_(*theirs)
    changed = [not torch.equal(a, b) for a, b in zip(_tensors(args), _tensors(ours), strict=True)]
    assert any(changed)  # the call did update something
    for a, b in zip(_tensors(ours), _tensors(theirs), strict=True):
        assert torch.equal(a, b)


def test_the_direct_call_checks_as_the_op():
    args = list(_captured_args("sgd"))
    args[2] = [torch.randn(8, 35)] + list(args[2][1:])  # grads[0] of another numel
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be a contiguous Float tensor of 288"):
        _ext().fused_step_call(*args)


def test_the_profiler_and_dispatch_modes_still_see_the_op():
    args = _captured_args("adamw")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _ext().fused_step_call(*args)
    assert OP in [e.name for e in prof.events()]

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as mode:
        _ext().fused_step_call(*_clone(list(args)))
    assert "parq_kernels_C.fused_step_.default" in mode.ops


@pytest.mark.parametrize("op", ["fused_step_", "quant_prox_"])
def test_the_ops_autograd_key_falls_through(op):
    """In-place updates with no derivative: autograd has nothing to record (its boxed
    not-implemented fallback cost ~0.1 us a tensor argument and did nothing observable)."""
    dump = torch._C._dispatch_dump(f"parq_kernels_C::{op}")
    line = next(row for row in dump.splitlines() if row.startswith("Autograd[alias]"))
    assert "fallthrough" in line


def test_the_op_on_a_parameter_in_grad_mode_records_nothing():
    args = _clone(list(_captured_args("sgd")))
    p = args[0][0].detach().clone().requires_grad_()  # a leaf that requires grad
    args[0] = [p, *args[0][1:]]
    before = p.detach().clone()
    with torch.enable_grad():
        torch.ops.parq_kernels_C.fused_step_(*args)
    assert p.grad_fn is None and not torch.equal(p.detach(), before)


def _grads_cases():
    """(name, params, ptrs, dtype, accepted) for the kept call's gradient test."""
    g = torch.Generator().manual_seed(1)

    def params():
        ps = [torch.nn.Parameter(torch.randn(4, 6, generator=g)) for _ in range(3)]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        return ps, [p.data_ptr() for p in ps]

    cases = []
    ps, ptrs = params()
    cases.append(("accepted", ps, ptrs, torch.float32, True))
    ps, ptrs = params()
    ps[1].grad = None
    cases.append(("a missing gradient", ps, ptrs, torch.float32, False))
    ps, ptrs = params()
    ps[2].grad = torch.randn(6, 4, generator=g).t()
    cases.append(("a non-contiguous gradient", ps, ptrs, torch.float32, False))
    ps, ptrs = params()
    ps[0].grad = ps[0].grad.to_sparse()
    cases.append(("a sparse gradient", ps, ptrs, torch.float32, False))
    ps, ptrs = params()
    ps[1].data = ps[1].data.clone()
    cases.append(("new storage", ps, ptrs, torch.float32, False))
    ps, ptrs = params()
    cases.append(("another dtype", ps, ptrs, torch.float64, False))
    ps, ptrs = params()
    cases.append(("another count", ps, ptrs[:2], torch.float32, False))
    return cases


@pytest.mark.parametrize("check", ["extension", "python"])
def test_the_gradients_check_accepts_only_what_the_kernel_takes_as_it_is(check):
    fn = _ext().kept_grads if check == "extension" else backends._kept_grads
    if check == "extension":
        assert backends.grads_checker() is fn
    for name, params, ptrs, dtype, accepted in _grads_cases():
        grads = fn(params, ptrs, dtype)
        if accepted:
            assert isinstance(grads, list) and len(grads) == len(params), name
            assert all(g is p.grad for g, p in zip(grads, params, strict=True)), name
        else:
            assert grads is None, name

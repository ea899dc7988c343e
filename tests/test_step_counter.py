"""Adam's step counters + 1 (parq_kernels.backends.step_counter, csrc/host_steps.h): the
same values and version bumps as ``torch._foreach_add_(steps, 1)``, which torch's fused Adam
runs and the fused step's kept call and the unquantized groups' direct call replace."""

from __future__ import annotations

import pytest
import torch

from parq_kernels import backends

_WHY = backends.availability("cpu")["cpu"]
VALUES = [0.0, 1.0, 7.0, 2.0**24 - 1, 2.0**24, 2.0**24 + 2, 3.0e38, float("inf"), -1.5,
          float("nan")]  # fmt: skip


def _steps():
    steps = [torch.tensor(v, dtype=torch.float32) for v in VALUES]
    steps += [torch.tensor(5.0, dtype=torch.float64), torch.tensor(2.0**11, dtype=torch.float16)]
    steps += [torch.tensor([3.0]), torch.tensor(9.0, dtype=torch.bfloat16)]
    return steps


def _check(count):
    ours, theirs = _steps(), _steps()
    before = [t._version for t in ours]
    count(ours)
    torch._foreach_add_(theirs, 1)
    for a, b, v in zip(ours, theirs, before, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), (a, b)
        assert a._version == v + 1


@pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
def test_the_extensions_counter_adds_as_foreach_add():
    count = backends.step_counter()
    assert count is not None and getattr(count, "__name__", "") == "count_steps_"
    _check(count)


def test_without_the_extension_torch_counts(monkeypatch):
    monkeypatch.setattr(backends, "_cpu_ext", lambda: None)
    backends.step_counter.cache_clear()
    try:
        _check(backends.step_counter())
    finally:
        backends.step_counter.cache_clear()


@pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
def test_an_inference_tensor_fails_as_in_torch():
    with torch.inference_mode():
        ours, theirs = torch.tensor(1.0), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        torch._foreach_add_([theirs], 1)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        backends.step_counter()([ours])
    assert float(ours) == float(theirs)  # (torch adds, then refuses the version bump)

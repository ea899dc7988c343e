"""Changing a group's bits or layout between level updates, or at resume, takes a level
update at the next step on every path (issue 22, item 6; parq/optim/stale_levels.py):
before, the fused paths failed on the stored levels' shape and ``fused=False`` in
``searchsorted``."""

from __future__ import annotations

import pytest
import torch

from parq.optim import ProxHardQuant, QuantOptimizer
from parq.quant import UnifQuantizer

PATHS = {"fused": {}, "fused-prox": {"fuse_base_step": False}, "generic": {"fused": False}}


def _setup(path: str, bits: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(8, 32, generator=g)) for _ in range(2)]
    base = torch.optim.SGD([{"params": ps, "quant_bits": bits}], lr=0.05, momentum=0.9)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_period=5,
                         quant_per_channel=True, **PATHS[path])  # fmt: skip
    return ps, opt


def _step(ps, opt, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def _on_levels(p: torch.Tensor, Q: torch.Tensor, rows: int) -> bool:
    """Is every weight one of its group's stored levels (hard prox)?"""
    x = p.detach().reshape(rows, -1)
    Qr = Q.reshape(rows, -1) if Q.dim() > 1 else Q.expand(rows, -1)
    return bool(((x[:, :, None] - Qr[:, None, :]).abs().amin(-1) <= 1e-6 * Qr.abs().amax()).all())


@pytest.mark.parametrize("path", PATHS)
def test_bits_and_layout_changed_between_level_updates(path):
    ps, opt = _setup(path)
    for s in range(3):  # the level update at step 0, then two steps on the stored levels
        _step(ps, opt, s)
    group = opt.param_groups[0]
    group["quant_bits"] = 3  # step 3 is not a scheduled level update
    _step(ps, opt, 3)
    for p in ps:
        Q = opt.state[p]["quants"]
        assert tuple(Q.shape) == (8, 8) and _on_levels(p, Q, 8)
    opt.quant_per_channel = False
    _step(ps, opt, 4)
    for p in ps:
        Q = opt.state[p]["quants"]
        assert tuple(Q.shape) == (8,) and _on_levels(p, Q, 1)
    opt.quant_per_channel = True
    group["quant_block_size"] = 16
    _step(ps, opt, 6)  # step 6: not scheduled either (period 5)
    for p in ps:
        Q = opt.state[p]["quants"]
        assert tuple(Q.shape) == (16, 8) and _on_levels(p, Q, 16)


@pytest.mark.parametrize("path", PATHS)
def test_unchanged_setup_keeps_the_schedule(path):
    ps, opt = _setup(path)
    _step(ps, opt, 0)
    before = [opt.state[p]["quants"].clone() for p in ps]
    _step(ps, opt, 1)  # not a level update: the stored levels stay as they are
    for p, Q in zip(ps, before, strict=True):
        assert torch.equal(opt.state[p]["quants"], Q)


@pytest.mark.parametrize("path", PATHS)
def test_resume_with_other_bits(path):
    ps, opt = _setup(path, bits=2)
    for s in range(3):
        _step(ps, opt, s)
    saved = opt.state_dict()
    ps2, opt2 = _setup(path, bits=3, seed=0)
    with torch.no_grad():
        for p, q in zip(ps2, ps, strict=True):
            p.copy_(q)
    opt2.load_state_dict(saved)  # the checkpoint's group says 2 bits: it wins (torch's rule)
    opt2.param_groups[0]["quant_bits"] = 3  # then the user asks for 3 before resuming
    _step(ps2, opt2, 3)
    for p in ps2:
        Q = opt2.state[p]["quants"]
        assert tuple(Q.shape) == (8, 8) and _on_levels(p, Q, 8)

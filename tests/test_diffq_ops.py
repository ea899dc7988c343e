"""The DiffQ ops (SPEC.md §11, :mod:`parq_kernels.diffq_ops`): noise statistics and
gradients of the reference, every other backend against the reference over shapes x
group sizes x dtypes x parametrizations, and the argument checks.

Without a GPU the Triton kernels run on CPU tensors under the interpreter
(``TRITON_INTERPRET=1``, set by conftest.py)."""

from __future__ import annotations

import pytest
import torch

from parq.diffq.functions import GroupConfig, draw_noise, inject_noise, true_quantize
from parq_kernels import backends
from parq_kernels.diffq_ops import DIFFQ_OPS, diffq_noise_, num_groups
from parq_kernels.reference_diffq import (
    PARAM_BITS,
    PARAM_NOISE,
    logits_from_bits,
    noise_scale_from_logits,
)

FAST = [b for b in ("cpu", "triton") if not backends.availability("cpu")[b]
        and all(op in backends._load(b)[0] for op in DIFFQ_OPS)]  # fmt: skip
SHAPES = [(1,), (7,), (3, 1023), (4097,), (2, 3, 5, 7), (0, 5)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def _case(group: int, dtype: torch.dtype, param: int, seed: int = 0):
    """Weights, logits (bits spread over 2..15), noise and the config of one call."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g).mul(3).to(dtype) for s in SHAPES]
    sizes = [max(1, group or w.numel()) for w in weights]
    logits = [logits_from_bits(torch.rand(num_groups(w.numel(), G), generator=g) * 13 + 2, 2, 15,
                               param) for w, G in zip(weights, sizes, strict=True)]  # fmt: skip
    cfg = GroupConfig(tuple(sizes), 2.0, 15.0, param, 0.0)
    return weights, logits, cfg


def test_backend_table_lists_the_ops():
    assert set(DIFFQ_OPS) <= set(backends.ALL_OPS)
    assert all(op in backends._load("reference")[0] for op in DIFFQ_OPS)


@pytest.mark.parametrize("kind,std", [("gaussian", 0.5), ("uniform", 12**-0.5)])
@pytest.mark.parametrize("param", [PARAM_BITS, PARAM_NOISE])
def test_noise_statistics(kind, std, param):
    """``(out - w) / (R * D)`` has mean 0 and the noise's std, per group."""
    n = 100_000
    w = torch.linspace(-1.0, 1.0, 2 * n)  # R = 2
    logits = logits_from_bits(torch.tensor([3.0, 6.0]), 2, 15, param)
    cfg = GroupConfig((n,), 2.0, 15.0, param)
    out = inject_noise([w], [logits], cfg, kind, torch.Generator().manual_seed(1))[0]
    D = noise_scale_from_logits(logits, 2, 15, param)
    assert torch.allclose(D, 1 / (2 ** torch.tensor([3.0, 6.0]) - 1), rtol=1e-4)
    for g in range(2):
        e = ((out - w)[g * n : (g + 1) * n] / (2 * D[g])).double()
        assert abs(float(e.mean())) < 4 * std / n**0.5
        assert abs(float(e.std()) - std) < 0.01 * std
        if kind == "uniform":
            assert float(e.abs().max()) <= 0.5 + 1e-4


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("param", [PARAM_BITS, PARAM_NOISE])
def test_gradients_reach_weights_and_logits(backend, param):
    """The fused Function's gradients equal autograd through ``w + R * D * e``."""
    weights, logits, cfg = _case(8, torch.float32, param)
    cfg = GroupConfig(cfg.group_sizes, 2.0, 15.0, param, 0.0, backend)
    ws = [w.clone().requires_grad_(True) for w in weights]
    ls = [lg.clone().requires_grad_(True) for lg in logits]
    out = inject_noise(ws, ls, cfg, "gaussian", torch.Generator().manual_seed(3))
    coef = [torch.randn(w.shape) for w in weights]
    sum((o * c).sum() for o, c in zip(out, coef, strict=True)).backward()
    noise = draw_noise(weights, "gaussian", torch.Generator().manual_seed(3))
    for i, (w, lg, e, c) in enumerate(zip(weights, logits, noise, coef, strict=True)):
        leaf = lg.clone().requires_grad_(True)
        R = (w.max() - w.min()) if w.numel() else torch.tensor(0.0)
        D = noise_scale_from_logits(leaf, 2, 15, param).repeat_interleave(cfg.group_sizes[i])
        ref = w + R * D[: w.numel()].view(w.shape) * e
        (ref * c).sum().backward()
        torch.testing.assert_close(out[i].detach(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert torch.equal(ws[i].grad, c), i
        torch.testing.assert_close(ls[i].grad, leaf.grad, rtol=1e-4, atol=1e-6)
        if w.numel() > 1:
            assert ls[i].grad.abs().sum() > 0, i


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("group", [0, 1, 8])
@pytest.mark.parametrize("param", [PARAM_BITS, PARAM_NOISE])
def test_backend_matches_reference(backend, dtype, group, param):
    weights, logits, cfg = _case(group, dtype, param)
    noise = draw_noise(weights, "gaussian", torch.Generator().manual_seed(5))
    res = {}
    for name in ("reference", backend):
        out = [torch.empty_like(w) for w in weights]
        ranges = torch.empty(len(weights))
        diffq_noise_(weights, logits, noise, out, ranges, cfg.group_sizes, 2, 15, param, name)
        grads = [torch.randn(w.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
                 for w in weights]  # fmt: skip
        gl = [torch.empty_like(lg) for lg in logits]
        torch.ops.parq_kernels.diffq_noise_backward_(grads, logits, noise, ranges, gl,
                                                     list(cfg.group_sizes), 2.0, 15.0, param,
                                                     name)  # fmt: skip
        qcfg = GroupConfig(cfg.group_sizes, 2.0, 15.0, param, 0.5, name)
        res[name] = (out, ranges, gl, *true_quantize(weights, logits, qcfg, with_levels=True))
    ref, got = res["reference"], res[backend]
    assert torch.equal(ref[1], got[1])  # ranges
    assert torch.equal(ref[5], got[5])  # minmax
    eps = torch.finfo(dtype).eps
    for i in range(len(weights)):
        scale = float(ref[1][i]) + 1
        torch.testing.assert_close(got[0][i], ref[0][i], rtol=eps, atol=4 * eps * scale)
        torch.testing.assert_close(got[2][i], ref[2][i], rtol=1e-4, atol=1e-5 * scale)
        assert torch.equal(got[4][i], ref[4][i]), f"levels of tensor {i}"
        assert torch.equal(got[3][i], ref[3][i]), f"quantized tensor {i}"


def test_bad_arguments_are_named():
    w = [torch.randn(10)]
    out, ranges, noise = [torch.empty(10)], torch.empty(1), [torch.randn(10)]
    with pytest.raises(ValueError, match="logits\\[0\\]"):
        diffq_noise_(w, [torch.zeros(3)], noise, out, ranges, [8], 2, 15, PARAM_BITS)
    with pytest.raises(ValueError, match="group_sizes\\[0\\]"):
        diffq_noise_(w, [torch.zeros(2)], noise, out, ranges, [0], 2, 15, PARAM_BITS)
    with pytest.raises(ValueError, match="noise\\[0\\]"):
        diffq_noise_(w, [torch.zeros(2)], [torch.randn(9)], out, ranges, [8], 2, 15, PARAM_BITS)
    with pytest.raises(ValueError, match="ranges"):
        diffq_noise_(w, [torch.zeros(2)], noise, out, torch.empty(2), [8], 2, 15, PARAM_BITS)
    with pytest.raises(ValueError, match="param"):
        diffq_noise_(w, [torch.zeros(2)], noise, out, ranges, [8], 2, 15, 7)


@pytest.mark.parametrize("backend", FAST)
def test_training_lockstep_with_reference(backend):
    """A few DiffQ training steps on a backend follow the reference backend's."""
    from torch import nn

    from parq.diffq import DiffQuantizer

    states = []
    for name in ("reference", backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
        q = DiffQuantizer(model, min_size=0, group_size=4)
        q.backend, q.generator = name, torch.Generator().manual_seed(2)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        q.setup_optimizer(opt, lr=0.1)
        x, y = torch.randn(16, 20), torch.randint(0, 4, (16,))
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x), y) + 10 * q.model_size()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        states.append((model(x).detach(), [p.detach().clone() for p in model.parameters()]))
    for a, b in zip(states[0][1], states[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states[0][0], states[1][0], rtol=1e-3, atol=1e-4)

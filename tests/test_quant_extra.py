"""Refined LSBQ and threshold ternary quantization (SPEC.md §9)."""

from __future__ import annotations

import pytest
import torch

from parq.optim import ProxPARQ, QuantOptimizer
from parq.quant import LSBQuantizer, TernaryThresholdQuantizer
from parq.quant.lsbq_refine import quantize_lsbq_refined


def _data(kind: str, shape=(6, 500), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g) - 0.5  # Laplace by inverse CDF
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _err(x, q):
    return (x.double() - q.double()).square().sum(dim=-1)


def _assert_valid(q, Q, K, dim):
    assert Q.shape[-1] == K
    assert bool((Q[..., 1:] >= Q[..., :-1]).all())  # sorted
    Qr = Q if dim is not None else Q[None]
    qr = q if dim is not None else q.reshape(1, -1)
    assert bool((qr[..., None] == Qr[:, None, :]).any(-1).all())  # q in Q, bitwise


# -- refined LSBQ ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
@pytest.mark.parametrize("b", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [None, -1])
def test_refined_never_worse_than_greedy(kind, b, dim):
    x = _data(kind)
    greedy = LSBQuantizer()
    qg, _ = greedy.quantize(x, b, dim)
    prev = None
    for rounds in (1, 2, 5):
        q, Q = LSBQuantizer(refine_rounds=rounds).quantize(x, b, dim)
        _assert_valid(q, Q, 2**b, dim)
        e, eg = _err(x, q).sum(), _err(x, qg).sum()
        assert e <= eg
        if prev is not None:
            assert e <= prev  # more rounds never worse
        prev = e
        if b >= 3:
            assert e < eg * (1 - 1e-3), (rounds, e, eg)  # strictly lower at b >= 3


@pytest.mark.parametrize("kind", ["gauss", "laplace"])
def test_refined_per_row_never_worse(kind):
    x = _data(kind, (20, 64), seed=3)
    for b in (2, 3):
        qg, _ = LSBQuantizer().quantize(x, b, -1)
        q, _ = LSBQuantizer(refine_rounds=3).quantize(x, b, -1)
        assert bool((_err(x, q) <= _err(x, qg)).all())


def test_refined_levels_are_a_binary_basis():
    """Q = {sum c_i v_i} with v positive: Q symmetric and K = 2**b distinct levels."""
    x = _data("gauss", (3, 200), seed=5)
    _, Q = LSBQuantizer(refine_rounds=3).quantize(x, 3, -1)
    assert torch.allclose(Q, -Q.flip(1), atol=1e-6)
    assert bool((Q[:, 1:] > Q[:, :-1]).all())


def test_refined_degenerate_rows():
    """All-zero, constant, single-element and empty groups: finite, q in Q (singular
    B^T B keeps the greedy coefficients)."""
    x = torch.zeros(4, 9)
    x[1] = 0.5
    x[2, 0] = 3.0
    for b in (1, 2, 3):
        q, Q = LSBQuantizer(refine_rounds=2).quantize(x, b, -1)
        assert torch.isfinite(Q).all()
        _assert_valid(q, Q, 2**b, -1)
    q, Q = LSBQuantizer(refine_rounds=2).quantize(torch.tensor([2.0]), 2)
    assert q.item() in Q.tolist()
    q, Q = quantize_lsbq_refined(torch.zeros(3, 0), 2, 2)  # empty groups
    assert q.shape == (3, 0) and Q.shape == (3, 4) and torch.isfinite(Q).all()


def test_refined_center_and_half_precision():
    x = _data("laplace", (4, 100)) + 3.0
    q, Q = LSBQuantizer(center=True, refine_rounds=2).quantize(x.to(torch.bfloat16), 2, -1)
    assert q.dtype == torch.float32
    _assert_valid(q, Q, 4, -1)
    qg, _ = LSBQuantizer(center=True).quantize(x.to(torch.bfloat16), 2, -1)
    xb = x.to(torch.bfloat16).float()
    assert bool((_err(xb, q) <= _err(xb, qg) + 1e-9).all())


def test_refine_rounds_zero_is_greedy_and_fused():
    x = _data("gauss", (5, 40))
    q0, Q0 = LSBQuantizer(refine_rounds=0).quantize(x, 3, -1)
    q1, Q1 = LSBQuantizer().quantize(x, 3, -1)
    assert torch.equal(q0, q1) and torch.equal(Q0, Q1)
    assert not LSBQuantizer(refine_rounds=0).host_levels(3) and LSBQuantizer(
        refine_rounds=1
    ).host_levels(3)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_refine_rounds_bad(bad):
    with pytest.raises(ValueError, match="refine_rounds"):
        LSBQuantizer(refine_rounds=bad)
    with pytest.raises(ValueError, match="refine_rounds"):
        LSBQuantizer(optimal=True, refine_rounds=2)


# -- threshold ternary -------------------------------------------------------------


def test_ternary_threshold_by_hand():
    x = torch.tensor([1.0, -2.0, 0.3, 3.0, -0.1, 0.0])
    # mean|x| = 6.4 / 6; D = 0.7 * that = 0.74667: pos {1, 3}, neg {-2}
    q, Q = TernaryThresholdQuantizer().quantize(x, 0)
    assert torch.allclose(Q, torch.tensor([-2.0, 0.0, 2.0]))
    assert torch.equal(q, torch.tensor([2.0, -2.0, 0.0, 2.0, 0.0, 0.0]))
    # max method: D = 0.05 * 3 = 0.15: pos {1, 0.3, 3}, neg {-2}
    q, Q = TernaryThresholdQuantizer(0.05, "max").quantize(x, 0)
    assert torch.allclose(Q, torch.tensor([-2.0, 0.0, 4.3 / 3]))
    assert torch.allclose(q, torch.tensor([4.3 / 3, -2.0, 4.3 / 3, 4.3 / 3, 0.0, 0.0]))


def test_ternary_threshold_empty_sides():
    x = torch.tensor([[1.0, 2.0, 0.1, 3.0],  # no element <= -D: a_neg = a_pos
                      [-1.0, -2.0, -0.1, -3.0],  # no element >= D: a_pos = a_neg
                      [0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    q, Q = TernaryThresholdQuantizer(0.7).quantize(x, 0, dim=-1)
    # D = 0.7 * 1.525 = 1.0675: one side {2, 3}, mean 2.5
    assert torch.allclose(Q[0], torch.tensor([-2.5, 0.0, 2.5]))
    assert torch.allclose(Q[1], torch.tensor([-2.5, 0.0, 2.5]))
    assert torch.equal(q[0], torch.tensor([0.0, 2.5, 0.0, 2.5]))
    assert torch.equal(q[1], torch.tensor([0.0, -2.5, 0.0, -2.5]))
    assert torch.equal(q[2], torch.zeros(4)) and torch.isfinite(Q[2]).all()
    # both sides empty: a = max(D, tiny) (a large factor puts D above every |x|)
    q, Q = TernaryThresholdQuantizer(5.0).quantize(torch.tensor([0.5, -0.5, 0.1]), 0)
    D = 5.0 * 1.1 / 3
    assert torch.allclose(Q, torch.tensor([-D, 0.0, D])) and torch.equal(q, torch.zeros(3))
    q, Q = TernaryThresholdQuantizer(5.0).quantize(torch.zeros(0), 0)
    assert Q.tolist() == [-torch.finfo(torch.float32).tiny, 0.0, torch.finfo(torch.float32).tiny]


def test_ternary_threshold_arguments():
    with pytest.raises(ValueError, match="delta_factor"):
        TernaryThresholdQuantizer(0.0)
    with pytest.raises(ValueError, match="delta_method"):
        TernaryThresholdQuantizer(0.7, "median")
    with pytest.raises(ValueError, match="quant_bits == 0"):
        TernaryThresholdQuantizer().quantize(torch.ones(3), 2)


# -- through QuantOptimizer -----------------------------------------------------------


def test_ternary_threshold_takes_the_fused_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 6)
    base = torch.optim.SGD([{"params": [model.weight], "quant_bits": 0},
                            {"params": [model.bias]}], lr=0.1, momentum=0.9)  # fmt: skip
    quantizer = TernaryThresholdQuantizer()
    opt = QuantOptimizer(base, quantizer, ProxPARQ(0, 6), quant_period=2, quant_per_channel=True)
    for _ in range(8):
        opt.zero_grad()
        model(torch.randn(4, 16)).square().mean().backward()
        opt.step()
    path = opt.step_paths[0]
    assert path.path == "fused step", path
    assert not hasattr(quantizer, "generic_path_reason")
    Q = opt.state[model.weight]["quants"]
    assert Q.shape == (6, 3)
    w = model.weight.detach()
    assert bool((w[..., None] == Q[:, None, :]).any(-1).all())  # hard at the end


def _refined_run(steps=9, base="sgd", **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 5))
    weights = [model[0].weight, model[2].weight]
    groups = [{"params": weights, "quant_bits": 3},
              {"params": [model[0].bias, model[2].bias]}]  # fmt: skip
    if base == "sgd":
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01)
    qopt = QuantOptimizer(opt, LSBQuantizer(refine_rounds=2), ProxPARQ(0, 8), quant_period=3,
                          quant_per_channel=kwargs.pop("per_channel", True), **kwargs)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    paths = []
    for _ in range(steps):
        qopt.zero_grad()
        model(torch.randn(8, 16, generator=g)).square().mean().backward()
        qopt.step()
        paths.append(qopt.step_paths[0])
    return model, qopt, weights, paths


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_refined_lsbq_fused_matches_generic(base, per_channel):
    """Refined LSBQ on the fused path (levels by torch ops on update steps, stored levels
    in the fused op) against the generic path (quantize + apply_ per parameter)."""
    fused_model, fused, weights, paths = _refined_run(base=base, per_channel=per_channel)
    plain_model, plain, plain_weights, plain_paths = _refined_run(
        base=base, per_channel=per_channel, fused=False
    )
    assert [p.path for p in paths[:4]] == ["base step + fused prox", "fused step", "fused step",
                                           "base step + fused prox"]  # fmt: skip
    assert "refined LSBQ" in paths[0].reason
    assert plain_paths[-1].path == "base step + generic prox"
    for w, pw in zip(weights, plain_weights, strict=True):
        Qf, Qp = fused.state[w]["quants"], plain.state[pw]["quants"]
        assert torch.allclose(Qf, Qp, rtol=1e-5, atol=1e-7)
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_refined_lsbq_fused_levels_are_the_quantizers():
    _, opt, weights, _ = _refined_run(steps=7, freeze_step=6)  # step 6: fresh levels, hard
    for w in weights:
        assert torch.equal(opt.state[w]["latent"], w.detach())
        Q = opt.state[w]["quants"]
        assert bool((w[..., None] == Q[:, None, :]).any(-1).all())


def test_refined_lsbq_cpu_backend_matches_reference():
    from parq_kernels import backends

    if backends.availability("cpu")["cpu"]:
        pytest.skip("compiled extension unavailable")
    a_model, *_ = _refined_run(backend="cpu")
    b_model, *_ = _refined_run(backend="reference")
    for a, b in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)

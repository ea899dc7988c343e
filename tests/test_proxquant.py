"""ProxQuant and ProxBinaryConnect (SPEC.md §9): the math by hand, the lambda schedule
through QuantOptimizer in float64, BinaryConnect's clipped latents on every path, every
backend of both fused ops against the reference, and the fused step against the
unfused path."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import (
    LEVEL_RTOL,
    QUANT_CONFIGS,
    ProxConfig,
    assert_matches_reference,
    assert_optimizer_matches_reference,
    make_rows,
    run_op,
)
from step_harness import OC, assert_step_matches_reference, run_step

from parq.optim import ProxBinaryConnect, ProxQuant, QuantOptimizer
from parq.quant import LSBQuantizer, UnifQuantizer
from parq_kernels import backends
from parq_kernels.kinds import ProxKind

QC = {c.name: c for c in QUANT_CONFIGS}
PQ_CONFIGS = [
    ProxConfig("proxquant-l1", ProxKind.PROXQUANT_L1, 0.05),
    ProxConfig("proxquant-l2", ProxKind.PROXQUANT_L2, 0.7),
]
BC = ProxConfig("binaryconnect", ProxKind.BINARYCONNECT)
QNAMES = ["unif-b2", "unif-b3-center", "ternary-unif", "lsbq-b3", "lsbq-opt-b2", "asym-b4"]


def _usable(name: str) -> str:
    why = backends.availability("cpu")[name]
    return why


BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(bool(_usable(b)), reason=_usable(b) or "ok"))
    for b in ("cpu", "triton")
]


def _shapes(backend: str) -> list[tuple[int, int]]:
    if backend == "triton":
        return [(3, 7), (2, 33), (0, 4)]
    return [(3, 1), (4, 7), (2, 1023), (1, 4097), (0, 4)]


# -- the math by hand --------------------------------------------------------------


def test_proxquant_l1_and_l2_by_hand():
    Q = torch.tensor([-1.0, 0.0, 1.0])
    p = torch.tensor([0.3, -0.05, 0.9, 1.5, -0.7])
    l1 = ProxQuant(0.1, penalty="l1", lr_scaled=False)
    x = p.clone()
    l1.apply_(x, None, Q, step_count=2)  # lam = 0.1 * 2 = 0.2
    # hard: 0, 0, 1, 1, -1; soft-threshold by 0.2 toward it (within 0.2: the level itself)
    assert torch.allclose(x, torch.tensor([0.1, 0.0, 1.0, 1.3, -0.9]), atol=1e-7)
    l2 = ProxQuant(0.5, penalty="l2", lr_scaled=False)
    x = p.clone()
    l2.apply_(x, None, Q, step_count=2)  # lam = 1: the midpoint of x and hard(x)
    assert torch.allclose(x, torch.tensor([0.15, -0.025, 0.95, 1.25, -0.85]), atol=1e-7)


def test_proxquant_schedule():
    pq = ProxQuant(0.01, anneal_start=3, anneal_end=20, steps_per_epoch=4)
    pq.begin_group({"lr": 0.5})
    lams = [pq.schedule(t) for t in range(0, 22)]
    assert all(k == ProxKind.NONE for k, _, _ in lams[:7])  # t < 3, then floor(.) = 0
    assert lams[7] == (ProxKind.PROXQUANT_L1, pytest.approx(0.01 * 1 * 0.5), None)
    assert lams[15][1] == pytest.approx(0.01 * 3 * 0.5)
    assert lams[20] == (ProxKind.HARD, 0.0, None) and lams[21][0] == ProxKind.HARD
    unscaled = ProxQuant(0.01, steps_per_epoch=2, penalty="l2", lr_scaled=False)
    unscaled.begin_group({"lr": 0.5})
    assert unscaled.schedule(5) == (ProxKind.PROXQUANT_L2, pytest.approx(0.02), None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reg_rate": -1.0}, "reg_rate"),
        ({"reg_rate": float("nan")}, "reg_rate"),
        ({"reg_rate": 0.1, "anneal_start": 5, "anneal_end": 5}, "anneal_end"),
        ({"reg_rate": 0.1, "steps_per_epoch": 0}, "steps_per_epoch"),
        ({"reg_rate": 0.1, "penalty": "l3"}, "penalty"),
    ],
)
def test_proxquant_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProxQuant(**kwargs)


def test_public_names():
    import parq
    import parq.optim

    assert parq.ProxQuant is ProxQuant and parq.optim.ProxBinaryConnect is ProxBinaryConnect
    assert "ProxQuant" in parq.optim.__all__ and "ProxBinaryConnect" in parq.__all__


# -- the lambda schedule through QuantOptimizer, simulated in float64 --------------


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_proxquant_schedule_through_optimizer_float64(penalty):
    """SGD on a fixed-gradient loss, lr changed every step: p after each step must be the
    prox of the simulated latent with lam_t = reg_rate * floor((t - t1) / spe) * lr_t."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    c = torch.randn(6, 10, dtype=torch.float64)
    base = torch.optim.SGD([{"params": [w], "quant_bits": 2}], lr=0.1)
    reg, t1, spe = 0.3, 2, 3
    prox = ProxQuant(reg, anneal_start=t1, steps_per_epoch=spe, penalty=penalty)
    opt = QuantOptimizer(base, UnifQuantizer(), prox, quant_period=1)
    latent = w.detach().clone()
    for t in range(14):
        lr = 0.1 * (1 + t % 3)
        base.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (w * c).sum().backward()
        opt.step()
        latent = latent - lr * c
        q, Q = UnifQuantizer().quantize(latent, 2)
        lam = 0.0 if t < t1 else reg * ((t - t1) // spe) * lr
        if penalty == "l1":
            d = latent - q
            want = q + torch.where(d >= 0, 1.0, -1.0) * (d.abs() - lam).clamp_min(0)
        else:
            want = (latent + lam * q) / (1 + lam)
        if lam == 0.0:
            want = latent
        assert opt.step_paths[0].path == "base step + generic prox"
        assert torch.allclose(opt.state[w]["latent"], latent, atol=1e-12)
        assert torch.allclose(w.detach(), want, atol=1e-12), f"step {t}"


# -- BinaryConnect: latents inside their row's level range, on every path -----------


def _bc_run(steps=12, **kwargs):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 4))
    weights = [model[0].weight, model[2].weight]
    groups = [{"params": weights, "quant_bits": 2},
              {"params": [model[0].bias, model[2].bias]}]  # fmt: skip
    base = torch.optim.SGD(groups, lr=0.2, momentum=0.5)
    opt = QuantOptimizer(base, LSBQuantizer(), ProxBinaryConnect(), quant_period=3,
                         quant_per_channel=True, **kwargs)  # fmt: skip
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = torch.randn(16, 12, generator=g)
        opt.zero_grad()
        model(x).square().mean().mul(5).backward()  # big steps: latents leave the range
        opt.step()
    return model, opt, weights


@pytest.mark.parametrize(
    "kwargs, path",
    [
        ({}, "fused step"),
        ({"fuse_base_step": False}, "base step + fused prox"),
        ({"fused": False}, "base step + generic prox"),
        ({"backend": "reference"}, "fused step"),
    ],
)
def test_binaryconnect_latent_inside_level_range(kwargs, path):
    _, opt, weights = _bc_run(**kwargs)
    assert opt.step_paths[0].path == path
    clipped = 0
    for w in weights:
        latent, Q = opt.state[w]["latent"], opt.state[w]["quants"]
        assert latent.shape == w.shape and Q.shape == (w.size(0), 4)
        assert bool((latent >= Q[:, :1]).all() and (latent <= Q[:, -1:]).all())
        clipped += int(((latent == Q[:, :1]) | (latent == Q[:, -1:])).sum())
        assert bool((w.detach()[..., None] == Q[:, None, :]).any(-1).all())  # p in Q
    assert clipped > 0  # the clamp really acted


def test_binaryconnect_fused_step_matches_unfused():
    fused_model, *_ = _bc_run()
    plain_model, *_ = _bc_run(fused=False)
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("penalty", ["l1", "l2"])
def test_proxquant_fused_step_matches_unfused(penalty):
    def run(**kwargs):
        torch.manual_seed(5)
        model = torch.nn.Linear(20, 7)
        base = torch.optim.AdamW([{"params": [model.weight], "quant_bits": 3},
                                  {"params": [model.bias]}], lr=0.02)  # fmt: skip
        prox = ProxQuant(0.5, anneal_start=2, anneal_end=25, steps_per_epoch=4, penalty=penalty)
        opt = QuantOptimizer(base, UnifQuantizer(), prox, quant_period=5, **kwargs)
        g = torch.Generator().manual_seed(6)
        for _ in range(30):
            opt.zero_grad()
            model(torch.randn(8, 20, generator=g)).square().mean().backward()
            opt.step()
        return model, opt

    fused_model, fused = run()
    plain_model, plain = run(fused=False)
    assert fused.step_paths[0].path == "fused step"
    assert plain.step_paths[0].path == "base step + generic prox"
    for a, b in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


# -- every backend against the reference ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pc", PQ_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("qname", QNAMES)
def test_proxquant_op_matches_reference(backend, pc, qname):
    params = make_rows(_shapes(backend), zero_row=True)
    for update in (True, False):
        assert_matches_reference(backend, params, QC[qname], pc, update=update)
    assert_matches_reference(backend, params, QC[qname], pc, update=False, gamma=1.5)
    half = [p.to(torch.bfloat16) for p in params]
    assert_matches_reference(backend, half, QC[qname], pc, update=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qname", QNAMES)
def test_binaryconnect_op_matches_reference(backend, qname):
    """Same levels and weights as HARD; latents clamped to the row's level range (times
    gamma), equal to the reference's up to the levels' few-ulp differences."""
    params = make_rows(_shapes(backend), zero_row=True)
    qc = QC[qname]
    for update, gamma in ((True, 1.0), (False, 1.0), (True, 1.5)):
        quants = None
        if not update:
            quants = run_op("reference", params, qc, BC, True, gamma).quants
        out = run_op(backend, params, qc, BC, update, gamma, quants)
        ref = run_op("reference", params, qc, BC, update, gamma, quants)
        hard = run_op(backend, params, qc, ProxConfig("hard", ProxKind.HARD), update, gamma,
                      quants)  # fmt: skip
        for i, p in enumerate(params):
            Q = out.quants[i]
            scale = Q.abs().amax(dim=1, keepdim=True) if Q.numel() else Q.sum(1, keepdim=True)
            assert torch.equal(out.params[i], hard.params[i])
            assert torch.equal(out.quants[i], hard.quants[i])
            assert torch.all((Q - ref.quants[i]).abs() <= LEVEL_RTOL * scale + 1e-30)
            tol = 2 * LEVEL_RTOL * gamma * scale + 1e-30
            assert torch.all((out.latents[i] - ref.latents[i]).abs() <= tol)
            lat = out.latents[i]
            assert bool((lat >= Q[:, :1] * gamma).all() and (lat <= Q[:, -1:] * gamma).all())
            inside = (p >= Q[:, :1] * gamma) & (p <= Q[:, -1:] * gamma)
            assert torch.equal(lat[inside], p[inside])  # untouched inside the range


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pc", [*PQ_CONFIGS, BC], ids=lambda c: c.name)
@pytest.mark.parametrize("oc", ["sgd", "sgd-mom-wd", "adam-amsgrad", "adamw"])
def test_fused_step_op_matches_reference(backend, pc, oc):
    params = make_rows(_shapes(backend), zero_row=True)
    for qname in ("unif-b2", "lsbq-b3"):
        # BinaryConnect: non-update steps (on update steps the reference's re-projection of
        # the backend's clamped latent would compute other levels; the op test covers them)
        for update in (False,) if pc is BC else (True, False):
            assert_step_matches_reference(backend, params, OC[oc], QC[qname], pc, update=update)
    if pc is BC:  # update steps: latent clamped into the fresh levels' range
        out = run_step(backend, params, *_step_inputs(params, OC[oc]), OC[oc], QC["unif-b2"], pc)
        for lat, Q in zip(out.latents, out.quants, strict=True):
            assert bool((lat >= Q[:, :1]).all() and (lat <= Q[:, -1:]).all())


def _step_inputs(params, oc):
    from step_harness import make_state

    return make_state(params, oc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make_prox", [lambda: ProxQuant(0.2, anneal_start=2, steps_per_epoch=3),
                  lambda: ProxQuant(0.2, penalty="l2", anneal_end=20), ProxBinaryConnect],
    ids=["l1", "l2", "binaryconnect"],
)  # fmt: skip
def test_optimizer_backend_matches_reference(backend, make_prox):
    steps = 8 if backend == "triton" else 24
    assert_optimizer_matches_reference(backend, UnifQuantizer, make_prox, steps=steps,
                                       quant_period=3, quant_per_channel=True)  # fmt: skip


def test_kernels_reject_bad_lambda():
    params = make_rows([(2, 5)])
    with pytest.raises((RuntimeError, ValueError), match="lambda"):
        run_op("cpu", params, QC["unif-b2"], ProxConfig("bad", ProxKind.PROXQUANT_L1, -1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_binaryconnect_clamp_nonfinite_and_half(backend, dtype):
    """The clamp of a latent that keeps its previous value (NaN/Inf input), of a latent
    that never was finite, and of bf16 latents: as the reference's float32 clamp."""
    x = make_rows([(3, 40)], seed=7)[0] * 3
    x[0, 3], x[1, 5] = float("nan"), float("inf")
    params = [x.to(dtype)]
    Q = [torch.tensor([[-1.0, -0.5, 0.5, 1.0]] * 3)]
    for update in (False, True):
        quants = None if update else Q
        out = run_op(backend, params, QC["unif-b2"], BC, update, 1.0, quants)
        ref = run_op("reference", params, QC["unif-b2"], BC, update, 1.0, quants)
        assert torch.equal(out.flags, ref.flags) and bool(out.flags[0])
        # levels agree to a few float32 ulp; the clamped latent then to 2 ulp of its dtype
        rtol = 1e-5 + 2 * torch.finfo(dtype).eps
        assert torch.allclose(out.latents[0].float(), ref.latents[0].float(), rtol=rtol,
                              equal_nan=True)  # fmt: skip
        assert torch.equal(out.params[0].isnan(), ref.params[0].isnan())
    # a latent that never was finite stays NaN (torch.clamp propagates NaN)
    lat = torch.full((1, 4), float("nan"), dtype=dtype)
    ps = [torch.full((1, 4), float("nan"), dtype=dtype)]
    flags = torch.zeros(1, dtype=torch.int32)
    backends.get_impl(backend)(ps, [lat], [Q[0][:1].clone()], flags, int(QC["unif-b2"].kind), 2,
                               QC["unif-b2"].qargs, False, False, int(ProxKind.BINARYCONNECT), 0.0,
                               1.0)  # fmt: skip
    assert bool(lat.isnan().all()) and bool(flags[0])

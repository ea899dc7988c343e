"""QuantOptimizer.step (SPEC.md §2, §5) on tiny models, reference backend."""

from __future__ import annotations

import pytest
import torch
from foundation_models import (
    ANNEAL_END,
    PROX_MAPS,
    QUANTIZERS,
    assert_bitwise_equal,
    assert_on_levels,
    build,
    make_batches,
    one_thread,  # noqa: F401
    reference_backend,  # noqa: F401
    snapshot,
    split_params,
    train_step,
)
from torch import nn

from parq.optim import (
    NMSGDOptimizer,
    ProxBinaryRelax,
    ProxHardQuant,
    ProxPARQ,
    ProxSoftQuant,
    QuantOptimizer,
    build_quant_optimizer,
)
from parq.quant import LSBQuantizer, MaxUnifQuantizer, TernaryUnifQuantizer, UnifQuantizer

STEPS = ANNEAL_END + 3

# every quantizer x prox map on the MLP (per tensor); on the CNN (per channel)
# every quantizer with one prox map, cycling through the maps
COMBOS = [
    pytest.param(model, qname, qmake, b, K, pname, pmake, id=f"{model}-{qname}-{pname}")
    for model in ("mlp", "cnn")
    for i, (qname, qmake, b, K) in enumerate(QUANTIZERS)
    for j, (pname, pmake) in enumerate(PROX_MAPS)
    if model == "mlp" or i % len(PROX_MAPS) == j
]


@pytest.mark.parametrize(("model_kind", "qname", "qmake", "b", "K", "pname", "pmake"), COMBOS)
def test_every_quantizer_and_prox_fused_equals_generic(
    model_kind, qname, qmake, b, K, pname, pmake
):
    per_channel = model_kind == "cnn"
    runs = [
        build(model_kind, qmake(), pmake(), b, quant_per_channel=per_channel, fused=fused)
        for fused in (True, False)
    ]
    batches = make_batches(model_kind, STEPS)
    for n, batch in enumerate(batches):
        for model, opt in runs:
            train_step(model, opt, batch)
        assert_bitwise_equal(snapshot(*runs[0]), snapshot(*runs[1]))
        model, opt = runs[0]
        weights, _ = split_params(model)
        for p in weights:
            assert opt.state[p]["quants"].dtype == torch.float32
            if pname == "hard" or n >= ANNEAL_END:
                assert_on_levels(p, opt.state[p]["quants"], K, per_channel)
    for model, opt in runs:
        assert opt.param_groups[0]["num_steps"] == STEPS
        assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("fused", [True, False])
def test_unquantized_groups_are_plain_base_steps(base, fused):
    model, opt = build("mlp", UnifQuantizer(), ProxPARQ(1, 4), 2, base=base, fused=fused)
    _, others = split_params(model)
    shadow = [p.detach().clone().requires_grad_() for p in others]
    if base == "sgd":
        shadow_opt = torch.optim.SGD(shadow, lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        shadow_opt = torch.optim.AdamW(shadow, lr=0.01, weight_decay=1e-2)
    for batch in make_batches("mlp", 6):
        train_step(model, opt, batch)
        for s, p in zip(shadow, others, strict=True):
            s.grad = p.grad.clone()
        shadow_opt.step()
        for s, p in zip(shadow, others, strict=True):
            assert torch.equal(s, p)
            assert "latent" not in opt.state[p] and "quants" not in opt.state[p]


LOW_PRECISION = [
    (dtype, prox, shrink)
    for dtype in (torch.bfloat16, torch.float16)
    for prox in ("hard", "relax", "parq", "soft")
    for shrink in (False, True)
    if dtype == torch.bfloat16 or shrink
]


@pytest.mark.parametrize(("dtype", "prox", "shrink"), LOW_PRECISION)
def test_fused_equals_generic_low_precision(prox, dtype, shrink):
    make = dict(PROX_MAPS)[prox]
    runs = [
        build(
            "mlp",
            UnifQuantizer(),
            make(),
            2,
            dtype=dtype,
            fused=f,
            quant_per_channel=True,
            quant_shrink=shrink,
            fuse_base_step=False,  # torch's own half-precision base step: bitwise comparable
        )
        for f in (True, False)
    ]
    for batch in make_batches("mlp", STEPS, dtype=dtype):
        for model, opt in runs:
            train_step(model, opt, batch)
        assert_bitwise_equal(snapshot(*runs[0]), snapshot(*runs[1]))
    for p in split_params(runs[0][0])[0]:
        assert p.dtype == dtype and runs[0][1].state[p]["latent"].dtype == dtype


# ---------------------------------------------------------------------------
# A single parameter with hand-set gradients
# ---------------------------------------------------------------------------


def single(values, bits=2, lr=0.1, momentum=0.0, **kw):
    p = nn.Parameter(torch.tensor(values, dtype=torch.float32))
    base = torch.optim.SGD([{"params": [p], "quant_bits": bits}], lr=lr, momentum=momentum)
    return p, base


def set_grad(p, step):
    g = torch.Generator().manual_seed(100 + step)
    p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("fused", [True, False])
def test_step_state_machine_hand_check(fused):
    """Latent = plain SGD trajectory; p = q of the latent; Q stored as float32."""
    x0 = torch.randn(3, 5)
    p, base = single(x0.tolist(), lr=0.3)
    quantizer = UnifQuantizer()
    opt = QuantOptimizer(base, quantizer, ProxHardQuant(), quant_period=1, fused=fused)
    latent = x0.clone()
    for step in range(4):
        set_grad(p, step)
        latent = latent.add(p.grad, alpha=-0.3)
        opt.step()
        assert torch.equal(opt.state[p]["latent"], latent)
        q, Q = quantizer.quantize(latent, 2)
        assert torch.equal(p.detach(), q)
        assert torch.equal(opt.state[p]["quants"], Q)
        assert opt.param_groups[0]["cumu_lr"] == pytest.approx(0.3 * (step + 1))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("sched", ["step", "cosine"])
def test_lr_scheduler_changes_are_seen(fused, sched):
    p, base = single(torch.randn(4, 4).tolist(), lr=0.2)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxPARQ(0, 10), quant_period=1, fused=fused)
    if sched == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    seen, latent = [], p.detach().clone()
    for step in range(6):
        set_grad(p, step)
        lr = opt.param_groups[0]["lr"]
        seen.append(lr)
        latent = latent.add(p.grad, alpha=-lr)
        opt.step()
        scheduler.step()
        assert torch.equal(opt.state[p]["latent"], latent)
    assert len(set(seen)) > 2  # the schedule did change the lr
    assert opt.param_groups[0]["cumu_lr"] == pytest.approx(sum(seen), rel=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_warmup_runs_base_only(fused):
    x0 = torch.randn(4, 3)
    p, base = single(x0.tolist(), lr=0.1)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), warmup_steps=3, fused=fused)
    plain = x0.clone()
    for step in range(3):
        set_grad(p, step)
        plain = plain.add(p.grad, alpha=-0.1)
        opt.step()
        assert torch.equal(p.detach(), plain)
        assert "latent" not in opt.state[p] and "quants" not in opt.state[p]
        assert opt.param_groups[0]["cumu_lr"] == 0.0
    set_grad(p, 3)
    opt.step()
    assert torch.equal(opt.state[p]["latent"], plain.add(p.grad, alpha=-0.1))
    assert opt.param_groups[0]["num_steps"] == 4
    assert torch.isin(p.detach(), opt.state[p]["quants"]).all()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("base_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_base_first_step_sees_empty_state(fused, base_cls):
    x0 = torch.randn(5, 4)
    p = nn.Parameter(x0.clone())
    ref = nn.Parameter(x0.clone())
    opt = QuantOptimizer(
        base_cls([{"params": [p], "quant_bits": 2}], lr=0.01),
        UnifQuantizer(),
        ProxSoftQuant(0, 5),
        warmup_steps=0,
        fused=fused,
    )
    ref_opt = base_cls([ref], lr=0.01)
    for step in range(3):
        set_grad(p, step)
        ref.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        # Adam's own state (step count, moments) is exactly that of a plain run
        assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[ref]["exp_avg"])
        assert torch.equal(opt.state[p]["step"], ref_opt.state[ref]["step"])
    assert torch.equal(opt.state[p]["latent"], ref.detach())


@pytest.mark.parametrize("fused", [True, False])
def test_quant_period_recomputes_only_on_update_steps(fused):
    p, base = single(torch.randn(6, 5).tolist(), lr=0.2)
    quantizer = LSBQuantizer()
    opt = QuantOptimizer(
        base, quantizer, ProxBinaryRelax(2, 12), warmup_steps=1, quant_period=3, fused=fused
    )
    prev = None
    for step in range(9):
        set_grad(p, step)
        opt.step()
        if step < 1:
            continue
        Q = opt.state[p]["quants"].clone()
        if (step - 1) % 3 == 0:
            assert torch.equal(Q, quantizer.quantize(opt.state[p]["latent"], 2)[1])
            if prev is not None:
                assert not torch.equal(Q, prev)
        else:
            assert torch.equal(Q, prev)
        prev = Q


@pytest.mark.parametrize("fused", [True, False])
def test_quant_shrink(fused):
    p, base = single(torch.randn(4, 6).tolist(), lr=0.7)
    quantizer = UnifQuantizer()
    opt = QuantOptimizer(
        base, quantizer, ProxHardQuant(), quant_period=1, quant_shrink=True, fused=fused
    )
    latent = p.detach().clone()
    for step in range(4):
        set_grad(p, step)
        latent = latent.add(p.grad, alpha=-0.7)
        opt.step()
        gamma = max(1.0, 0.7 * (step + 1))
        assert torch.equal(opt.state[p]["latent"], latent)  # unshrunk
        q, Q = quantizer.quantize(latent / gamma, 2)
        assert torch.equal(p.detach(), q)
        assert torch.equal(opt.state[p]["quants"], Q)


@pytest.mark.parametrize("fused", [True, False])
def test_anneal_wd_frac_follows_rho(fused):
    p = nn.Parameter(torch.randn(4, 4))
    base = torch.optim.SGD([{"params": [p], "quant_bits": 2}], lr=0.1, weight_decay=0.2)
    prox = ProxPARQ(1, 6, steepness=4, anneal_center=0.3)
    opt = QuantOptimizer(base, UnifQuantizer(), prox, anneal_wd_frac=0.25, fused=fused)
    group = opt.param_groups[0]
    assert group["initial_wd"] == 0.2
    for step in range(8):
        set_grad(p, step)
        opt.step()
        rho = prox.inv_slope(step)
        if rho:
            assert group["inv_slope"] == rho
            assert group["weight_decay"] == pytest.approx(rho * 0.25 * 0.2 + 0.75 * 0.2)
    assert group["weight_decay"] < 0.2  # annealed


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shrink", [False, True])
def test_nm_sgd_correction_formula(fused, shrink):
    x0 = torch.tensor([[0.9, -0.4, 0.15, -1.3], [0.05, 2.0, -0.7, 0.3]])
    p, base = single(x0.tolist(), lr=0.5)
    gamma, quantizer = 2.0, UnifQuantizer()
    opt = build_quant_optimizer(
        base, quantizer, ProxHardQuant(), quant_period=1, quant_shrink=shrink, nm_gamma=gamma
    )
    assert isinstance(opt, NMSGDOptimizer)
    opt.fused = fused
    latent, proj = None, None
    for step in range(4):
        set_grad(p, step)
        g = p.grad.clone()
        # SPEC §5 by hand: restore, base step, correction, save latent, shrink, quantize
        if latent is None:
            new = x0 - 0.5 * g
        else:
            corrections = latent - proj
            new = latent - 0.5 * g
            new = new - (0.5 / gamma) * corrections
        latent = new
        proj = quantizer.quantize(latent / gamma if shrink else latent, 2)[0]
        opt.step()
        assert torch.allclose(opt.state[p]["latent"], latent, atol=1e-6, rtol=0)
        assert torch.allclose(p.detach(), proj, atol=1e-6, rtol=0)


def test_nm_sgd_hand_numbers():
    # one parameter [1.0, -3.0], grad 0, lr 1, nm_gamma 4, sign quantizer (b = 1):
    # step 0: latent [1, -3], q = +-mean|x| = [2, -2]
    # step 1: correction = latent - q = [-1, -1]; p = latent - (1/4) * [-1, -1] = [1.25, -2.75]
    p = nn.Parameter(torch.tensor([1.0, -3.0]))
    base = torch.optim.SGD([{"params": [p], "quant_bits": 1}], lr=1.0)
    opt = NMSGDOptimizer(base, LSBQuantizer(), ProxHardQuant(), quant_period=1, nm_gamma=4.0)
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([2.0, -2.0]))
    opt.step()
    assert torch.equal(opt.state[p]["latent"], torch.tensor([1.25, -2.75]))
    assert torch.equal(p.detach(), torch.tensor([2.0, -2.0]))
    assert type(build_quant_optimizer(base, LSBQuantizer(), ProxHardQuant())) is QuantOptimizer


@pytest.mark.parametrize("fused", [True, False])
def test_group_quantizer_map_counts_quantized_groups(fused):
    a = nn.Parameter(torch.randn(3, 8))
    u = nn.Parameter(torch.randn(8))
    c = nn.Parameter(torch.randn(4, 8))
    base = torch.optim.SGD(
        [{"params": [a], "quant_bits": 2}, {"params": [u]}, {"params": [c], "quant_bits": 0}],
        lr=0.1,
    )
    opt = QuantOptimizer(
        base,
        UnifQuantizer(),
        ProxHardQuant(),
        group_quantizer_map={1: TernaryUnifQuantizer()},
        fused=fused,
    )
    for p in (a, u, c):
        set_grad(p, 0)
    opt.step()
    assert opt.state[a]["quants"].shape == (4,)
    assert opt.state[c]["quants"].shape == (3,)
    latent_c = opt.state[c]["latent"]
    assert torch.equal(opt.state[c]["quants"], TernaryUnifQuantizer().quantize(latent_c, 0)[1])
    assert "quants" not in opt.state[u]
    assert "num_steps" in opt.param_groups[0] and "num_steps" not in opt.param_groups[2]


@pytest.mark.parametrize("fused", [True, False])
def test_frozen_and_gradless_params(fused):
    frozen = nn.Parameter(torch.randn(3, 4), requires_grad=False)
    nograd = nn.Parameter(torch.randn(3, 4))
    live = nn.Parameter(torch.randn(3, 4))
    frozen0 = frozen.detach().clone()
    base = torch.optim.SGD([{"params": [frozen, nograd, live], "quant_bits": 1}], lr=0.1)
    opt = QuantOptimizer(base, LSBQuantizer(), ProxHardQuant(), quant_per_channel=True, fused=fused)
    for step in range(3):
        set_grad(live, step)
        opt.step()
    assert torch.equal(frozen.detach(), frozen0)
    assert len(opt.state[frozen]) == 0
    # grad None: the base optimizer skips it, the prox map still projects it
    assert nograd.grad is None
    assert_on_levels(nograd, opt.state[nograd]["quants"], 2, per_channel=True)
    assert torch.isin(live.detach()[0], opt.state[live]["quants"][0]).all()


@pytest.mark.parametrize("fused", [True, False])
def test_closure_and_zero_grad(fused):
    model, opt = build("mlp", UnifQuantizer(), ProxPARQ(0, 4), 2, fused=fused)
    losses = []
    for batch in make_batches("mlp", 3):
        loss = train_step(model, opt, batch, closure=True)
        assert torch.is_tensor(loss) and loss.ndim == 0
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[0]["num_steps"] == 3


@pytest.mark.parametrize("fused", [True, False])
def test_add_param_group_mid_training(fused):
    a = nn.Parameter(torch.randn(4, 6))
    base = torch.optim.SGD([{"params": [a], "quant_bits": 2}], lr=0.1, momentum=0.9)
    opt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_period=3, fused=fused)
    for step in range(2):
        set_grad(a, step)
        opt.step()
    b = nn.Parameter(torch.randn(5, 6))
    opt.add_param_group({"params": [b], "quant_bits": 1})
    assert opt.param_groups[1]["cumu_lr"] == 0.0
    for step in range(2, 4):  # step 2 is not an update step: b gets its levels anyway
        set_grad(a, step)
        set_grad(b, step)
        opt.step()
        assert opt.state[b]["quants"].shape == (2,)
        assert_on_levels(b, opt.state[b]["quants"], 2, per_channel=False)
        assert_on_levels(a, opt.state[a]["quants"], 4, per_channel=False)
    assert opt.param_groups[1]["cumu_lr"] == pytest.approx(0.2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_per_block(fused, block, per_channel):
    w = nn.Parameter(torch.randn(3, 16))
    v = nn.Parameter(torch.randn(16))
    base = torch.optim.SGD([{"params": [w, v], "quant_bits": 2, "quant_block_size": block}], lr=0.1)
    quantizer = LSBQuantizer()
    opt = QuantOptimizer(
        base, quantizer, ProxHardQuant(), quant_per_channel=per_channel, fused=fused
    )
    set_grad(w, 0)
    set_grad(v, 0)
    opt.step()
    for p, rows in ((w, 48 // block), (v, 16 // block)):
        Q = opt.state[p]["quants"]
        assert Q.shape == ((rows, 4) if per_channel else (4,))
        assert_on_levels(p, Q, 4, per_channel, block)
        latent = opt.state[p]["latent"].reshape(-1, block)
        q, Q_ref = quantizer.quantize(latent, 2, dim=-1 if per_channel else None)
        assert torch.equal(p.detach().reshape(-1, block), q)
        assert torch.equal(Q, Q_ref)


@pytest.mark.parametrize("fused", [True, False])
def test_per_channel_conv_weight(fused):
    conv = nn.Conv2d(3, 5, 3)
    base = torch.optim.SGD([{"params": [conv.weight, conv.bias], "quant_bits": 3}], lr=0.1)
    quantizer = UnifQuantizer()
    opt = QuantOptimizer(base, quantizer, ProxHardQuant(), quant_per_channel=True, fused=fused)
    set_grad(conv.weight, 0)
    set_grad(conv.bias, 0)
    opt.step()
    # a 1-D parameter is one group even with quant_per_channel (SPEC §2)
    assert opt.state[conv.bias]["quants"].shape == (8,)
    Q = opt.state[conv.weight]["quants"]
    assert Q.shape == (5, 8)
    q, Q_ref = quantizer.quantize(opt.state[conv.weight]["latent"].reshape(5, -1), 3, dim=-1)
    assert torch.equal(Q, Q_ref)
    assert torch.equal(conv.weight.detach().reshape(5, -1), q)


@pytest.mark.parametrize("per_channel", [True, False])
def test_non_contiguous_empty_and_zero_rows(per_channel):
    runs = []
    for fused in (True, False):
        torch.manual_seed(0)
        t = nn.Parameter(torch.randn(6, 4).t())  # non-contiguous (4, 6)
        e = nn.Parameter(torch.empty(0, 5))
        e0 = nn.Parameter(torch.empty(4, 0))  # rows of length 0
        z = nn.Parameter(torch.randn(3, 5))
        with torch.no_grad():
            z[1] = 0
        base = torch.optim.SGD([{"params": [t, e, e0, z], "quant_bits": 2}], lr=0.1)
        opt = QuantOptimizer(
            base,
            UnifQuantizer(),
            ProxPARQ(1, 3),
            quant_per_channel=per_channel,
            quant_period=1,
            fused=fused,
        )
        for step in range(4):
            set_grad(t, step)
            z.grad = torch.zeros(3, 5)
            z.grad[0] = 1.0
            e.grad = torch.empty(0, 5)
            e0.grad = torch.empty(4, 0)
            opt.step()
        assert not t.is_contiguous()
        for p in (t, e, e0, z):
            assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["quants"]).all()
        assert_on_levels(t, opt.state[t]["quants"], 4, per_channel)
        assert e.shape == (0, 5) and e0.shape == (4, 0)
        assert opt.state[e0]["quants"].shape == ((4, 4) if per_channel else (4,))
        if per_channel:
            assert z.detach()[1].abs().max() < 1e-37  # levels scale with tiny
        runs.append([p.detach().clone() for p in (t, e, e0, z)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [True, False])
def test_hard_is_q_on_update_steps_and_nearest_level_between(fused):
    # MaxUnif b = 2 on [-1.5, -0.25, 0.5, 3]: s = 3, levels [-3, 0, 3]. The quantizer
    # rounds -1.5 / 3 = -0.5 half to even (to 0); the nearest level breaks the tie low (-3)
    p, base = single([-1.5, -0.25, 0.5, 3.0], lr=0.0)
    opt = QuantOptimizer(base, MaxUnifQuantizer(), ProxHardQuant(), quant_period=2, fused=fused)
    expected = [[0.0, 0.0, 0.0, 3.0], [-3.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 3.0]]
    for step in range(3):
        p.grad = torch.zeros(4)
        opt.step()
        assert torch.equal(opt.state[p]["latent"], torch.tensor([-1.5, -0.25, 0.5, 3.0]))
        assert torch.equal(p.detach(), torch.tensor(expected[step])), step


def test_float64_params_with_the_automatic_backend(monkeypatch):
    # the fused op serves fp32 / bf16 / fp16; a float64 model still trains (generic path)
    monkeypatch.delenv("PARQ_KERNELS_BACKEND", raising=False)
    runs = [
        build("mlp", LSBQuantizer(), ProxPARQ(1, 4), 2, dtype=torch.float64, fused=f)
        for f in (True, False)
    ]
    for batch in make_batches("mlp", 5, dtype=torch.float64):
        for model, opt in runs:
            train_step(model, opt, batch)
        assert_bitwise_equal(snapshot(*runs[0]), snapshot(*runs[1]))
    assert all(p.dtype == torch.float64 for p in runs[0][0].parameters())

"""The CUDA kernels of ``parq_kernels._C`` against the reference (SPEC.md §6, §8).

``quant_prox_`` over the house grid here; ``fused_step_`` over its grid in
test_fused_step_backends.py (the ``cuda`` entry), plus what only this backend
has here: long rows, launches of more than 40 parameters, whole-optimizer
lockstep runs through the fused step, BinaryConnect's latent clamp in the
write pass and threshold ternary's two-read statistics.

Skipped without a CUDA GPU or without an extension built with CUDA kernels.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import (
    DTYPES,
    LEVEL_RTOL,
    PROX_CONFIGS,
    QUANT_CONFIGS,
    ProxConfig,
    _assert_rounding_close,
    assert_matches_reference,
    assert_optimizer_matches_reference,
    expected_latent,
    make_rows,
    run_op,
)
from step_harness import OC, assert_step_matches_reference, make_state, run_step

from parq_kernels import backends
from parq_kernels.ops import ProxKind, QuantKind

_IMPL, _WHY = backends._load("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or _IMPL is None,
    reason=f"no CUDA GPU, or CUDA kernels unavailable: {_WHY or 'no GPU'}",
)

# optimal LSBQ with b in {0, 2} needs a per-row sort: the CUDA kernels reject it
CUDA_QUANT_CONFIGS = [
    qc for qc in QUANT_CONFIGS if not (qc.kind == QuantKind.LSBQ_OPTIMAL and qc.bits != 1)
]
PC = {pc.name: pc for pc in PROX_CONFIGS}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qc", CUDA_QUANT_CONFIGS, ids=lambda c: c.name)
def test_cuda_grid_matches_reference(qc, dtype):
    params = make_rows([(3, 1), (2, 7), (5, 33), (2, 1023), (1, 4097), (0, 4), (2, 0)],
                       dtype=dtype, device="cuda", seed=3, zero_row=True)  # fmt: skip
    for pc in PROX_CONFIGS:
        assert_matches_reference("cuda", params, qc, pc, update=True)
        assert_matches_reference("cuda", params, qc, pc, update=False, gamma=1.7)


def test_cuda_nonfinite_flag_and_determinism():
    params = make_rows([(3, 8), (2, 100_000), (1, 5)], device="cuda", seed=6)
    params[1][1, 77] = float("nan")
    qc = CUDA_QUANT_CONFIGS[1]
    a = run_op("cuda", params, qc, PC["parq-rho0.3"], update=True)
    b = run_op("cuda", params, qc, PC["parq-rho0.3"], update=True)
    assert a.flags.tolist() == [0, 1, 0]
    assert torch.equal(a.latents[1], expected_latent(params[1]))  # the NaN kept the old latent
    for x, y in zip(a.params + a.quants, b.params + b.quants, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_cuda_rejects_optimal_lsbq_with_a_clear_error():
    qc = next(q for q in QUANT_CONFIGS if q.kind == QuantKind.LSBQ_OPTIMAL and q.bits == 2)
    with pytest.raises(RuntimeError, match="optimal LSBQ"):
        run_op("cuda", make_rows([(2, 8)], device="cuda"), qc, PC["hard"])


# ---------------------------------------------------------------------------
# fused_step_ (SPEC.md §8): what the backend grid does not cover.
# ---------------------------------------------------------------------------

QC = {qc.name: qc for qc in QUANT_CONFIGS}


def test_cuda_fused_step_long_rows():
    """Per-tensor groups of ~1e5 elements: many elements per thread, several passes."""
    params = make_rows([(1, 100_003), (2, 40_000)], device="cuda", seed=7)
    for update in (True, False):
        assert_step_matches_reference("cuda", params, OC["adam-amsgrad"], QC["lsbq-b3"],
                                      PC["parq-rho0.3"], update=update)  # fmt: skip
    assert_step_matches_reference("cuda", params, OC["sgd-nesterov-max"], QC["unif-b3-center"],
                                  PC["hard"], update=True, gamma=1.5)  # fmt: skip


def test_cuda_fused_step_more_params_than_one_launch():
    """45 parameters (the kernels take 40 per launch): flags land on the right parameter."""
    latents = make_rows([(2, 5 + i % 7) for i in range(45)] + [(0, 3)], device="cuda", seed=9)
    oc, qc, pc = OC["sgd-mom-wd"], QC["unif-b2"], PC["parq-rho0.3"]
    for update in (True, False):
        assert_step_matches_reference("cuda", latents, oc, qc, pc, update=update)
    grads, bufs = make_state(latents, oc)
    grads[43][1, 2] = float("nan")
    out = run_step("cuda", latents, grads, bufs, oc, qc, pc)
    assert out.flags.tolist() == [int(i == 43) for i in range(46)]


def test_cuda_fused_step_first_momentum_step_ignores_buffer_contents():
    """init_buf: the momentum buffer holds no history yet; its contents (NaN here) do not matter."""
    latents = make_rows([(3, 40)], device="cuda", seed=11)
    oc, qc, pc = OC["sgd-mom-first"], QC["unif-b2"], PC["hard"]
    grads, bufs = make_state(latents, oc)
    garbage = [[torch.full_like(b, float("nan")) for b in bufs[0]], [], []]
    out = run_step("cuda", latents, grads, garbage, oc, qc, pc)
    ref = run_step("reference", latents, grads, bufs, oc, qc, pc)
    assert out.flags.tolist() == [0]
    _assert_rounding_close(out.bufs[0][0], ref.bufs[0][0], "momentum buffer")
    _assert_rounding_close(out.latents[0], ref.latents[0], "latent")


def test_cuda_fused_step_rejects_optimal_lsbq_with_a_clear_error():
    latents = make_rows([(2, 8)], device="cuda")
    grads, bufs = make_state(latents, OC["adamw"])
    with pytest.raises(RuntimeError, match="optimal LSBQ"):
        run_step("cuda", latents, grads, bufs, OC["adamw"], QC["lsbq-opt-b2"], PC["hard"])


def _lockstep_cases():
    from parq.optim import ProxHardQuant, ProxPARQ, ProxSoftQuant
    from parq.quant import LSBQuantizer, UnifQuantizer

    return {
        "sgd-unif-parq-channel": dict(
            make_quantizer=UnifQuantizer, make_prox=lambda: ProxPARQ(3, 20),
            quant_per_channel=True, warmup_steps=2, quant_period=3,
        ),
        "sgd-lsbq-hard-tensor-shrink": dict(
            make_quantizer=LSBQuantizer, make_prox=ProxHardQuant, quant_shrink=True,
        ),
        "adamw-lsbq-soft-channel": dict(
            make_quantizer=LSBQuantizer, make_prox=lambda: ProxSoftQuant(1, 20), base="adamw",
            quant_per_channel=True,
        ),
        "adamw-unif-parq-block-bf16": dict(
            make_quantizer=UnifQuantizer, make_prox=lambda: ProxPARQ(0, 25), base="adamw",
            dtype=torch.bfloat16, block_size=8, quant_per_channel=True,
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["sgd-unif-parq-channel", "sgd-lsbq-hard-tensor-shrink", "adamw-lsbq-soft-channel",
     "adamw-unif-parq-block-bf16"],
)  # fmt: skip
def test_cuda_optimizer_lockstep_through_the_fused_step(case: str):
    """30 QuantOptimizer steps, cuda vs reference in lockstep, SGD and AdamW bases."""
    assert_optimizer_matches_reference("cuda", steps=30, device="cuda", **_lockstep_cases()[case])


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_cuda_optimizer_takes_the_fused_step(base: str):
    from parq.optim import ProxHardQuant, QuantOptimizer
    from parq.quant import UnifQuantizer

    model = torch.nn.Linear(16, 4).cuda()
    groups = [{"params": [model.weight], "quant_bits": 2}, {"params": [model.bias]}]
    if base == "sgd":
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(groups, lr=0.01)
    qopt = QuantOptimizer(opt, UnifQuantizer(), ProxHardQuant(), backend="cuda")
    for _ in range(2):
        qopt.zero_grad()
        model(torch.randn(3, 16, device="cuda")).square().mean().backward()
        qopt.step()
    assert qopt.step_paths[0].path == "fused step", qopt.step_paths
    # hard-quantized per tensor: every weight is one of the stored levels
    assert torch.isin(model.weight.detach(), qopt.state[model.weight]["quants"]).all()


# ---------------------------------------------------------------------------
# BinaryConnect's latent clamp in the write pass, threshold ternary (SPEC.md §9).
# ---------------------------------------------------------------------------

BC = ProxConfig("binaryconnect", ProxKind.BINARYCONNECT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("qname", ["unif-b2", "unif-b3-center", "lsbq-b3", "ternary-thr-mean"])
def test_cuda_binaryconnect_clamps_in_the_write_pass(qname, dtype):
    """Weights and levels as HARD; the latent clamped to [gamma Q_0, gamma Q_{K-1}] as the
    reference clamps it, inside the range untouched; a NaN input keeps its old latent."""
    params = make_rows([(3, 7), (2, 1023), (1, 4097)], dtype=dtype, device="cuda", seed=12)
    params[1][0, 5] = float("nan")
    qc = QC[qname]
    for update, gamma in ((True, 1.0), (False, 1.0), (True, 1.5)):
        quants = None if update else run_op("reference", params, qc, BC, True, gamma).quants
        out = run_op("cuda", params, qc, BC, update, gamma, quants)
        hard = run_op("cuda", params, qc, PC["hard"], update, gamma, quants)
        ref = run_op("reference", params, qc, BC, update, gamma, quants)
        assert out.flags.tolist() == ref.flags.tolist() == [0, 1, 0]
        for i, p in enumerate(params):
            assert torch.equal(out.params[i], hard.params[i])
            assert torch.equal(out.quants[i], hard.quants[i])
            Q, lat = out.quants[i], out.latents[i].float()
            lo, hi = Q[:, :1] * gamma, Q[:, -1:] * gamma
            assert bool(((lat >= lo) & (lat <= hi)).all())
            old = expected_latent(p).float()
            inside = (old >= lo) & (old <= hi)
            assert torch.equal(lat[inside], old[inside])
            scale = Q.abs().amax(dim=1, keepdim=True)
            tol = 2 * LEVEL_RTOL * gamma * scale + 2 * torch.finfo(dtype).eps * lat.abs()
            assert bool(((lat - ref.latents[i].float()).abs() <= tol).all())


def test_cuda_binaryconnect_fused_step_clamps_the_stepped_latent():
    latents = make_rows([(3, 40), (1, 5000)], device="cuda", seed=13)
    for oc in ("sgd-mom-wd", "adamw"):
        assert_step_matches_reference("cuda", latents, OC[oc], QC["unif-b2"], BC, update=False)
        out = run_step("cuda", latents, *make_state(latents, OC[oc]), OC[oc], QC["unif-b2"], BC)
        for lat, Q in zip(out.latents, out.quants, strict=True):
            assert bool((lat >= Q[:, :1]).all() and (lat <= Q[:, -1:]).all())


@pytest.mark.parametrize("qname", ["ternary-thr-mean", "ternary-thr-max", "ternary-thr-center"])
def test_cuda_threshold_ternary_long_rows(qname):
    """Per-tensor groups of ~1e5 elements: D from the first pass, the side sums from a second."""
    params = make_rows([(1, 100_003), (2, 40_000)], device="cuda", seed=14)
    for pc in (PC["hard"], PC["parq-rho0.3"]):
        assert_matches_reference("cuda", params, QC[qname], pc, update=True)
    assert_step_matches_reference("cuda", params, OC["adamw"], QC[qname], PC["hard"])


@pytest.mark.parametrize("make_prox", ["binaryconnect", "parq"])
def test_cuda_optimizer_lockstep_threshold_ternary_and_binaryconnect(make_prox):
    from parq.optim import ProxBinaryConnect, ProxPARQ
    from parq.quant import TernaryThresholdQuantizer, UnifQuantizer

    if make_prox == "binaryconnect":
        assert_optimizer_matches_reference("cuda", UnifQuantizer, ProxBinaryConnect, steps=30,
                                           device="cuda", quant_period=3,
                                           quant_per_channel=True)  # fmt: skip
    else:
        assert_optimizer_matches_reference("cuda", TernaryThresholdQuantizer,
                                           lambda: ProxPARQ(3, 20), steps=30, device="cuda",
                                           bits=0, quant_period=2,
                                           quant_per_channel=True)  # fmt: skip

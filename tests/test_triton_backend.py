"""The Triton backend of ``quant_prox_`` against the reference (tests/kernel_harness.py).

Without a GPU the kernels run on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``, set by conftest.py); with a GPU they run on CUDA
tensors. The interpreter is slow, so shapes are small and the shapes of one
call share a tile class where possible (one launch per phase).
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_harness import (
    PROX_CONFIGS,
    QUANT_CONFIGS,
    assert_matches_reference,
    assert_optimizer_matches_reference,
    expected_latent,
    make_rows,
    run_op,
)

from parq_kernels import backends
from parq_kernels.ops import ProxKind, QuantKind
from parq_kernels.triton import launch, plan

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# the device the Triton backend serves here: CUDA if present, else CPU via the interpreter
TRITON_DEVICES = ["cuda"] if torch.cuda.is_available() else (["cpu"] if INTERPRET else [])

QC = {qc.name: qc for qc in QUANT_CONFIGS}
PC = {pc.name: pc for pc in PROX_CONFIGS}
# one tile class (BLOCK 16): 1, 7 and 13 columns, an empty tensor, empty rows, an all-zero row
SMALL = [(3, 7), (2, 1), (1, 13), (0, 5), (2, 0)]
# K <= 16 (compare-and-select) and K > 16 (binary search), arithmetic and binary levels
NON_UPDATE_QCS = ["unif-b8", "lsbq-b4", "ternary-unif", "lsbq-b8", "ternary-thr-max"]
# one config per QuantKind (+ center) for the costlier shape sets
PER_KIND = ["unif-b3-center", "maxunif-b4", "ternary-unif", "asym-b4", "lsbq-b3",
            "lsbq-ternary", "lsbq-opt-b0", "lsbq-opt-b2-center", "ternary-thr-mean",
            "ternary-thr-center"]  # fmt: skip


@pytest.fixture(params=TRITON_DEVICES)
def tdev(request) -> torch.device:
    return torch.device(request.param)


def test_triton_backend_is_available(tdev):
    assert backends.availability(tdev)["triton"] == ""
    assert backends.resolve(tdev, "triton") == "triton"


# every quantizer x prox map, except the slowest config (8 stats passes) with two maps only
UPDATE_GRID = [
    (qc, pc)
    for qc in QUANT_CONFIGS
    for pc in PROX_CONFIGS
    if qc.name != "lsbq-b8" or pc.name in ("hard", "soft-T5")
]


@pytest.mark.parametrize("qc,pc", UPDATE_GRID, ids=lambda c: c.name)
def test_update_step_matches_reference(tdev, qc, pc):
    """Fresh levels + prox, quantizer x prox map, several params in one call."""
    params = make_rows(SMALL, device=tdev, seed=3, zero_row=True)
    gamma = 1.25 if pc.kind in (ProxKind.HARD, ProxKind.PARQ) else 1.0
    assert_matches_reference("triton", params, qc, pc, update=True, gamma=gamma)


@pytest.mark.parametrize("pc", PROX_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("qname", NON_UPDATE_QCS)
def test_non_update_step_reuses_stored_levels(tdev, qname, pc):
    """Stored Q (from a reference update step) is read, not recomputed (the harness checks
    that ``quants`` keeps the reference's values)."""
    params = make_rows(SMALL, device=tdev, seed=4, zero_row=True)
    qc = QC[qname]
    ref = run_op("reference", params, qc, PC["none"], update=True, gamma=1.5)
    assert_matches_reference("triton", params, qc, pc, update=False, gamma=1.5, quants=ref.quants)


@pytest.mark.parametrize("qname", PER_KIND)
def test_wide_and_long_rows(tdev, qname):
    """1023 columns (one 1024-wide tile per few rows) and a 5000-column row (two chunks)."""
    params = make_rows([(2, 1023), (1, 5000), (2, 33)], device=tdev, seed=5)
    pc = PROX_CONFIGS[PER_KIND.index(qname) % len(PROX_CONFIGS)]
    assert_matches_reference("triton", params, QC[qname], pc, update=True, gamma=1.1)
    assert_matches_reference("triton", params, QC[qname], PC["hard"], update=False)


CHUNKED = ["unif-b3-center", "ternary-unif", "asym-b4", "lsbq-b3", "lsbq-opt-b2-center",
           "ternary-thr-mean", "ternary-thr-max", "ternary-thr-center"]  # fmt: skip


@pytest.mark.parametrize("qname", CHUNKED)
def test_rows_split_into_many_chunks(tdev, qname, monkeypatch):
    """Multi-pass reduction over chunks: rows of 40 and 70 columns cut into 16-column chunks."""
    monkeypatch.setattr(plan, "MAX_BLOCK", 16)
    monkeypatch.setattr(plan, "TILE", 64)
    monkeypatch.setattr(plan, "INTERPRET_TILE", 64)
    params = make_rows([(1, 70), (2, 40), (3, 5)], device=tdev, seed=6, zero_row=True)
    assert sum(tc.n_tiles for tc in _plan(params, QC[qname]).classes) == 5 + 6 + 1
    pc = PROX_CONFIGS[(CHUNKED.index(qname) + 1) % len(PROX_CONFIGS)]
    assert_matches_reference("triton", params, QC[qname], pc, update=True, gamma=1.5)


def _plan(params, qc):
    quants = [torch.empty(p.size(0), qc.K, device=p.device) for p in params]
    return plan.get_plan(params, [torch.empty_like(p) for p in params], quants, qc.K)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "qname,pname",
    [("unif-b4", "soft-T5"), ("lsbq-b2", "hard"), ("asym-b2", "parq-rho0.3"),
     ("lsbq-opt-b0", "relax-0.4"), ("ternary-unif", "none"), ("ternary-thr-mean", "hard")],
)  # fmt: skip
def test_half_precision(tdev, dtype, qname, pname):
    """bf16/fp16 storage, float32 compute: update and non-update steps."""
    params = make_rows(SMALL, dtype=dtype, device=tdev, seed=7, zero_row=True)
    assert_matches_reference("triton", params, QC[qname], PC[pname], update=True)
    assert_matches_reference("triton", params, QC[qname], PC[pname], update=False, gamma=2.0)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nonfinite_flags_only_bad_params(tdev):
    params = make_rows([(2, 7), (3, 7), (1, 7)], device=tdev, seed=8)
    params[1][2, 3] = float("nan")
    params[2][0, 0] = float("inf")
    for update in (True, False):
        out = run_op("triton", params, QC["lsbq-b2"], PC["hard"], update=update,
                     quants=None if update else _levels(params, QC["lsbq-b2"]))  # fmt: skip
        assert out.flags.tolist() == [1 if i else 0 for i in range(3)]
        for lat, p in zip(out.latents, params, strict=True):  # bad elements keep the old latent
            assert torch.equal(lat, expected_latent(p))
        ref = run_op("reference", params, QC["lsbq-b2"], PC["hard"], update=update,
                     quants=None if update else _levels(params, QC["lsbq-b2"]))  # fmt: skip
        for y, y_ref in zip(out.params, ref.params, strict=True):  # projected from the kept ones
            assert torch.allclose(y, y_ref, rtol=1e-5, atol=0)


def _levels(params, qc):
    return run_op("reference", params, qc, PC["none"], update=True).quants


@pytest.mark.parametrize("qname", ["unif-b2", "lsbq-opt-b0"])
def test_empty_first_param(tdev, qname):
    """An empty tensor (null address) as the base that the other tensors are addressed from."""
    params = make_rows([(0, 5), (2, 7), (3, 0)], device=tdev, seed=10)
    assert_matches_reference("triton", params, QC[qname], PC["parq-rho0.3"], update=True)
    assert_matches_reference("triton", params, QC[qname], PC["hard"], update=False)


def test_deterministic(tdev):
    params = make_rows([(2, 100), (1, 300)], device=tdev, seed=9)
    a = run_op("triton", params, QC["lsbq-b3"], PC["soft-T5"], update=True)
    b = run_op("triton", params, QC["lsbq-b3"], PC["soft-T5"], update=True)
    for x, y in zip(a.params + a.quants, b.params + b.quants, strict=True):
        assert torch.equal(x, y)


def test_bad_inputs_name_the_parameter(tdev):
    impl = backends.get_impl("triton")
    p = torch.randn(2, 4, device=tdev)
    good = ([p], [torch.empty_like(p)], [torch.empty(2, 4, device=tdev)],
            torch.zeros(1, dtype=torch.int32, device=tdev))  # fmt: skip
    scalars = (int(QuantKind.UNIFORM), 2, (0.0, 0.5, 0.5), False, True, int(ProxKind.HARD), 0.0)
    with pytest.raises(ValueError, match=r"quants\[0\]"):
        impl(*good[:2], [torch.empty(2, 3, device=tdev)], good[3], *scalars, 1.0)
    with pytest.raises(ValueError, match=r"latents\[0\]"):
        impl(good[0], [torch.empty(2, 5, device=tdev)], *good[2:], *scalars, 1.0)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        impl([p.t()], [p.t().clone()], [torch.empty(4, 4, device=tdev)], good[3], *scalars, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        impl(*good, *scalars, 0.0)
    with pytest.raises(ValueError, match="rho"):
        impl(*good, *scalars[:5], int(ProxKind.PARQ), 0.0, 1.0)


def _model_and_opt(n_layers: int, dev, quant_period: int):
    from parq.optim import ProxPARQ, QuantOptimizer
    from parq.quant import LSBQuantizer

    torch.manual_seed(0)
    widths = [7, 9, 11, 13, 15, 16]  # all rows 7..16 long: a single tile class
    layers = [torch.nn.Linear(widths[i % 6], 5).to(dev) for i in range(n_layers)]
    opt = torch.optim.SGD([{"params": [m.weight for m in layers], "quant_bits": 2}], lr=0.1)
    qopt = QuantOptimizer(opt, LSBQuantizer(), ProxPARQ(0, 10), quant_period=quant_period,
                          quant_per_channel=True, backend="triton")  # fmt: skip
    return layers, qopt


@pytest.mark.parametrize("n_layers", [2, 6])
def test_launches_per_step_do_not_grow_with_params(tdev, n_layers):
    """Update and non-update step cost a fixed number of launches, whatever the group size."""
    layers, qopt = _model_and_opt(n_layers, tdev, quant_period=2)
    counts = []
    for _ in range(3):  # steps 0 (update), 1, 2 (update)
        for m in layers:
            m.weight.grad = torch.ones_like(m.weight)
        before = launch.launch_count
        qopt.step()
        counts.append(launch.launch_count - before)
    # one tile class of whole rows: update = stats + levels + apply; otherwise apply only
    assert counts == [3, 1, 3]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, interpreter only
@pytest.mark.skipif(not TRITON_DEVICES, reason="no device for Triton (no GPU, no interpreter)")
@pytest.mark.parametrize(
    "case",
    ["lsbq-perchannel-parq-warmup", "unif-perblock-soft-adamw", "optimal-pertensor-relax",
     "thr-ternary-perchannel-parq", "thr-ternary-pertensor-hard-adamw"],
)  # fmt: skip
def test_optimizer_lockstep(case):
    """30 QuantOptimizer steps, triton vs reference in lockstep (phases: warmup, anneal, hard)."""
    from parq.optim import ProxBinaryRelax, ProxHardQuant, ProxPARQ, ProxSoftQuant
    from parq.quant import LSBQuantizer, TernaryThresholdQuantizer, UnifQuantizer

    dev = TRITON_DEVICES[0]
    if case == "lsbq-perchannel-parq-warmup":
        assert_optimizer_matches_reference(
            "triton", LSBQuantizer, lambda: ProxPARQ(6, 20), device=dev, warmup_steps=3,
            quant_period=4,
            quant_per_channel=True, quant_shrink=True, anneal_wd_frac=0.5,
        )  # fmt: skip
    elif case == "unif-perblock-soft-adamw":
        assert_optimizer_matches_reference(
            "triton", UnifQuantizer, lambda: ProxSoftQuant(2, 22), device=dev, base="adamw",
            block_size=16,
            quant_period=5, quant_per_channel=True,
        )  # fmt: skip
    elif case == "thr-ternary-perchannel-parq":
        assert_optimizer_matches_reference(
            "triton", TernaryThresholdQuantizer, lambda: ProxPARQ(4, 24), device=dev, bits=0,
            quant_period=2, quant_per_channel=True,
        )  # fmt: skip
    elif case == "thr-ternary-pertensor-hard-adamw":
        assert_optimizer_matches_reference(
            "triton", lambda: TernaryThresholdQuantizer(0.05, "max"), ProxHardQuant, device=dev,
            bits=0, base="adamw", quant_period=3,
        )  # fmt: skip
    else:
        assert_optimizer_matches_reference(
            "triton", lambda: LSBQuantizer(optimal=True), lambda: ProxBinaryRelax(4, 24),
            device=dev, quant_period=3,
        )  # fmt: skip

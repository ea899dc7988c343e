"""The C++ CPU backend (``parq_kernels._C``) against the reference, to SPEC.md §6.

Skipped only when the extension is not built (``make test`` builds it).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_harness import (
    DTYPES,
    PREVIOUS,
    PROX_CONFIGS,
    QUANT_CONFIGS,
    ProxConfig,
    QuantConfig,
    assert_matches_reference,
    assert_optimizer_matches_reference,
    expected_latent,
    make_rows,
    run_op,
)

from parq_kernels import backends
from parq_kernels.ops import ProxKind, QuantKind

_IMPL, _WHY = backends._load("cpu")
pytestmark = pytest.mark.skipif(_IMPL is None, reason=f"C++ CPU backend unavailable: {_WHY}")

QC = {qc.name: qc for qc in QUANT_CONFIGS}
PC = {pc.name: pc for pc in PROX_CONFIGS}
# every column count of the house grid, an all-zero first row, several params per call
GRID_SHAPES = [(3, 1), (2, 7), (5, 33), (2, 1023), (1, 4097)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qc", QUANT_CONFIGS, ids=lambda c: c.name)
def test_grid_matches_reference(qc: QuantConfig, dtype: torch.dtype):
    params = make_rows(GRID_SHAPES, dtype=dtype, seed=3, zero_row=True)
    for pc in PROX_CONFIGS:
        assert_matches_reference("cpu", params, qc, pc, update=True)
        assert_matches_reference("cpu", params, qc, pc, update=False)
    # the shrink divisor, on update and non-update steps
    assert_matches_reference("cpu", params, qc, PC["parq-rho0.3"], update=True, gamma=2.5)
    assert_matches_reference("cpu", params, qc, PC["hard"], update=False, gamma=1.7)
    assert_matches_reference("cpu", params, qc, PC["none"], update=True, gamma=3.0)


@pytest.mark.parametrize("qc", QUANT_CONFIGS, ids=lambda c: c.name)
def test_long_rows_match_reference(qc: QuantConfig):
    """Per-tensor groups: rows of ~1e5 elements take the chunk-parallel path."""
    params = make_rows([(1, 100_003), (2, 40_000)], seed=4)
    for pc in (PC["hard"], PC["parq-rho0.3"]):
        assert_matches_reference("cpu", params, qc, pc, update=True)
    assert_matches_reference("cpu", params, qc, PC["relax-0.4"], update=False, gamma=1.3)


@pytest.mark.parametrize("qc", QUANT_CONFIGS, ids=lambda c: c.name)
def test_empty_and_zero_rows(qc: QuantConfig):
    params = make_rows([(0, 5), (3, 0), (4, 9)], seed=5)
    params[2].zero_()  # all-zero rows: the scale clamps to tiny, outputs stay finite
    for pc in (PC["hard"], PC["soft-T5"], PC["parq-rho0.3"]):
        assert_matches_reference("cpu", params, qc, pc, update=True)
        out = run_op("cpu", params, qc, pc, update=True)
        assert torch.isfinite(out.params[2]).all() and torch.isfinite(out.quants[2]).all()
        assert out.quants[0].shape == (0, qc.K) and out.quants[1].shape == (3, qc.K)
        assert not out.flags.any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("cols", [9, 50_000])
@pytest.mark.parametrize("update", [True, False])
def test_nonfinite_flag_only_for_that_param(bad: float, cols: int, update: bool):
    params = make_rows([(3, 8), (2, cols), (1, 5)], seed=6)
    params[1][1, cols // 2] = bad
    for qc in (QC["unif-b2"], QC["lsbq-b2-center"], QC["lsbq-opt-b2"]):
        out = run_op("cpu", params, qc, PC["hard"], update=update,
                     quants=None if update else _levels(params, qc))  # fmt: skip
        assert out.flags.tolist() == [0, 1, 0], (qc.name, out.flags)
        # the bad element kept its previous latent, from which it is projected: all finite
        assert torch.equal(out.latents[1], expected_latent(params[1]))
        assert out.latents[1][1, cols // 2] == PREVIOUS
        assert all(torch.isfinite(y).all() for y in out.params + out.quants)
        ref = run_op("reference", params, qc, PC["hard"], update=update,
                     quants=None if update else _levels(params, qc))  # fmt: skip
        assert torch.equal(ref.flags, out.flags)
        for i in range(3):
            torch.testing.assert_close(out.params[i], ref.params[i], rtol=0, atol=1e-6)
            torch.testing.assert_close(out.quants[i], ref.quants[i], rtol=4e-6, atol=0)


def _levels(params, qc):
    return run_op("reference", params, qc, PC["none"], update=True).quants


def _run_cpu_bits(params, qc, pc, update, gamma=1.0, quants=None):
    out = run_op("cpu", params, qc, pc, update=update, gamma=gamma, quants=quants)
    return out.params + out.quants + [out.flags]


@pytest.mark.parametrize(
    "qname",
    ["unif-b4", "lsbq-b3", "lsbq-opt-b2-center", "asym-b2", "lsbq-ternary", "ternary-thr-mean"],
)
def test_deterministic_and_thread_count_independent(qname: str):
    """Bitwise: two runs agree, and 1 thread agrees with 2 (row- vs chunk-parallel path)."""
    qc = QC[qname]
    params = make_rows([(3, 40_000), (64, 257), (1, 70_001)], seed=7)
    before = torch.get_num_threads()
    try:
        for pc, update in ((PC["parq-rho0.3"], True), (PC["soft-T5"], False)):
            torch.set_num_threads(2)
            # stored levels computed once (torch's own sums depend on the thread count)
            qs = None if update else _levels(params, qc)
            a = _run_cpu_bits(params, qc, pc, update, gamma=1.25, quants=qs)
            b = _run_cpu_bits(params, qc, pc, update, gamma=1.25, quants=qs)
            torch.set_num_threads(1)
            c = _run_cpu_bits(params, qc, pc, update, gamma=1.25, quants=qs)
            for x, y, z in zip(a, b, c, strict=True):
                assert torch.equal(x, y), "two runs differ"
                assert torch.equal(x, z), "1 thread and 2 threads differ"
    finally:
        torch.set_num_threads(before)


def test_levels_and_q_are_exact_where_the_math_is_exact():
    """Uniform levels are arithmetic: hard-quantized values are bitwise levels of Q."""
    params = make_rows([(6, 301)], seed=8)
    for qc in QUANT_CONFIGS:
        out = run_op("cpu", params, qc, PC["hard"], update=True)
        Q, y = out.quants[0], out.params[0]
        member = (y.unsqueeze(-1) == Q.unsqueeze(1)).any(-1)
        assert member.all(), f"{qc.name}: a hard-quantized value is not one of the row's levels"
        assert torch.all(Q[:, 1:] >= Q[:, :-1]), f"{qc.name}: levels not sorted"


# ---------------------------------------------------------------------------
# Bad input: clear errors naming the argument.
# ---------------------------------------------------------------------------


def _args(**over):
    p = torch.randn(4, 8)
    args = {
        "params": [p],
        "latents": [torch.empty_like(p)],
        "quants": [torch.empty(4, 4)],
        "nonfinite": torch.zeros(1, dtype=torch.int32),
        "quant_kind": int(QuantKind.LSBQ_GREEDY),
        "bits": 2,
        "qargs": [],
        "center": False,
        "update": True,
        "prox_kind": int(ProxKind.HARD),
        "prox_arg": 0.0,
        "gamma": 1.0,
    }
    args.update(over)
    return list(args.values())


BAD_INPUTS = {
    "lengths": ({"latents": []}, "same length"),
    "not 2-D": ({"params": [torch.randn(32)], "latents": [torch.empty(32)]}, "must be 2-D"),
    "non-contiguous": (
        {"params": [torch.randn(8, 4).t()], "latents": [torch.empty(4, 8)]},
        "contiguous",
    ),
    "param dtype": (
        {"params": [torch.randn(4, 8).double()], "latents": [torch.empty(4, 8).double()]},
        "float32, bfloat16 or float16",
    ),
    "latent dtype": ({"latents": [torch.empty(4, 8, dtype=torch.bfloat16)]}, r"latents\[0\]"),
    "latent shape": ({"latents": [torch.empty(4, 9)]}, r"latents\[0\]"),
    "quants dtype": ({"quants": [torch.empty(4, 4, dtype=torch.float64)]}, r"quants\[0\]"),
    "quants shape": ({"quants": [torch.empty(4, 3)]}, r"quants\[0\].*\(4, 4\)"),
    "nonfinite dtype": ({"nonfinite": torch.zeros(1, dtype=torch.int64)}, "nonfinite"),
    "nonfinite length": ({"nonfinite": torch.zeros(2, dtype=torch.int32)}, "nonfinite"),
    "quant kind": ({"quant_kind": 9}, "quant_kind"),
    "bits": ({"bits": 0}, "bits of LSBQ_GREEDY"),
    "optimal bits": ({"quant_kind": int(QuantKind.LSBQ_OPTIMAL), "bits": 3}, "LSBQ_OPTIMAL"),
    "qargs": ({"quant_kind": int(QuantKind.UNIFORM), "qargs": [0.0]}, "qargs of UNIFORM"),
    "prox kind": ({"prox_kind": 8}, "prox_kind"),
    "rho": ({"prox_kind": int(ProxKind.PARQ), "prox_arg": 0.0}, "rho"),
    "temperature": ({"prox_kind": int(ProxKind.SOFT), "prox_arg": -1.0}, "temperature"),
    "gamma": ({"gamma": 0.0}, "gamma"),
    "aliasing": ({"latents": "same"}, "alias"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=str)
def test_bad_input_raises_clear_error(case: str):
    over, pattern = BAD_INPUTS[case]
    args = _args(**over)
    if over.get("latents") == "same":
        args[1] = list(args[0])
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.parq_kernels_C.quant_prox_(*args)


# ---------------------------------------------------------------------------
# Whole optimizer, and backend selection.
# ---------------------------------------------------------------------------


def _optimizer_cases():
    from parq.optim import ProxHardQuant, ProxPARQ, ProxSoftQuant
    from parq.quant import LSBQuantizer, TernaryThresholdQuantizer, UnifQuantizer

    return {
        "unif-parq-channel": dict(
            make_quantizer=UnifQuantizer, make_prox=lambda: ProxPARQ(3, 20),
            quant_per_channel=True, warmup_steps=2, quant_period=3,
        ),
        "lsbq-hard-tensor-shrink": dict(
            make_quantizer=LSBQuantizer, make_prox=ProxHardQuant, quant_shrink=True,
        ),
        "optimal-parq-block-bf16-adamw": dict(
            make_quantizer=lambda: LSBQuantizer(optimal=True), make_prox=lambda: ProxPARQ(0, 25),
            dtype=torch.bfloat16, base="adamw", block_size=8, quant_per_channel=True,
        ),
        # (center=True is covered at op level: the lockstep check compares levels
        # element-wise, and a centered level near 0 differs by 1 ulp of the row scale)
        "lsbq-soft-adamw": dict(
            make_quantizer=LSBQuantizer,
            make_prox=lambda: ProxSoftQuant(1, 20), base="adamw", quant_per_channel=True,
        ),
        "ternary-thr-parq-channel": dict(
            make_quantizer=TernaryThresholdQuantizer, make_prox=lambda: ProxPARQ(0, 25),
            bits=0, quant_per_channel=True, quant_period=2,
        ),
        "ternary-thr-max-hard-tensor-adamw": dict(
            make_quantizer=lambda: TernaryThresholdQuantizer(0.05, "max"),
            make_prox=ProxHardQuant, bits=0, base="adamw",
        ),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    ["unif-parq-channel", "lsbq-hard-tensor-shrink", "optimal-parq-block-bf16-adamw",
     "lsbq-soft-adamw", "ternary-thr-parq-channel", "ternary-thr-max-hard-tensor-adamw"],
)  # fmt: skip
def test_optimizer_matches_reference(case: str):
    kwargs = _optimizer_cases()[case]
    assert_optimizer_matches_reference("cpu", steps=30, **kwargs)


def test_forced_cpu_backend_without_extension_raises_build_hint(monkeypatch):
    real_import = importlib.import_module

    def no_extension(name, *args):
        if name == "parq_kernels._C":
            raise ImportError("simulated: no compiled extension")
        return real_import(name, *args)

    monkeypatch.setattr(backends.importlib, "import_module", no_extension)
    backends._load.cache_clear()
    try:
        monkeypatch.setenv(backends.ENV_VAR, "cpu")
        with pytest.raises(backends.BackendUnavailableError, match="pip install") as info:
            backends.resolve("cpu")
        assert "simulated: no compiled extension" in str(info.value)
        monkeypatch.delenv(backends.ENV_VAR)
        assert backends.resolve("cpu") == "reference"  # the automatic choice falls back quietly
    finally:
        monkeypatch.undo()
        backends._load.cache_clear()
    assert backends.resolve("cpu") == "cpu"


def test_cpu_backend_is_the_automatic_choice_and_serves_the_op():
    from parq_kernels.ops import quant_prox_

    assert backends.availability("cpu")["cpu"] == ""
    assert backends.resolve("cpu") == "cpu"
    qc, pc = QC["unif-b2"], PC["hard"]
    params = make_rows([(2, 16)], seed=9)
    p, lat, Q = params[0].clone(), torch.empty_like(params[0]), torch.empty(2, qc.K)
    flags = torch.zeros(1, dtype=torch.int32)
    quant_prox_([p], [lat], [Q], flags, int(qc.kind), qc.bits, list(qc.qargs), False, True,
                int(pc.kind), 0.0, 1.0)  # fmt: skip
    ref = run_op("reference", params, qc, pc)
    assert torch.equal(lat, params[0])
    assert torch.allclose(p, ref.params[0], rtol=0, atol=1e-6)
    assert torch.allclose(Q, ref.quants[0], rtol=1e-6, atol=0)


def test_prox_none_without_shrink_keeps_weights_bitwise():
    """ProxConfig NONE with gamma 1 leaves the weights bitwise unchanged."""
    params = make_rows([(3, 50), (1, 20_000)], dtype=torch.bfloat16, seed=10)
    out = run_op("cpu", params, QC["lsbq-b2"], ProxConfig("none", ProxKind.NONE), update=True)
    for p, y in zip(params, out.params, strict=True):
        assert torch.equal(p, y)

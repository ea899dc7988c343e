"""Every backend of the fused step (``fused_step_``, SPEC.md §8) against the reference.

Grid: each base-optimizer option set x a spread of quantizer x prox kinds x
layouts x dtypes, update and non-update steps, the shrink divisor, empty and
all-zero rows, long (chunked) rows, NaN/Inf inputs, bad arguments. Backends:
``cpu`` (the compiled extension), ``triton`` (under ``TRITON_INTERPRET=1`` on the
CPU, small shapes; on CUDA when a GPU is present), ``cuda`` (GPU only).
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import DTYPES, PROX_CONFIGS, QUANT_CONFIGS, make_rows
from step_harness import OC, OPTIM_CONFIGS, assert_step_matches_reference, make_state, run_step

from parq_kernels import backends
from parq_kernels.kinds import QuantKind

QC = {c.name: c for c in QUANT_CONFIGS}
PC = {c.name: c for c in PROX_CONFIGS}


def _usable(name: str) -> str:
    """Empty if backend ``name`` serves the fused step on its test device, else why not."""
    device = "cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU"
    why = backends.availability(device)[name]
    if why:
        return why
    try:
        backends.get_impl(name, "fused_step_")
    except backends.BackendUnavailableError as exc:
        return str(exc)
    return ""


BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(bool(_usable(b)), reason=_usable(b) or "ok"))
    for b in ("cpu", "triton", "cuda")
]


def _not_served(backend: str, qname: str) -> str:
    """Why ``backend`` does not serve quantizer ``qname`` by design ("" if it does)."""
    qc = QC[qname]
    if backend == "cuda" and qc.kind == QuantKind.LSBQ_OPTIMAL and qc.bits != 1:
        return (
            "the CUDA kernels do not implement optimal LSBQ with b in {0, 2} (it needs a "
            "per-row sort); test_cuda_backend checks that they raise a clear error"
        )
    return ""


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or torch.cuda.is_available() else "cpu"


def _shapes(backend: str) -> list[tuple[int, int]]:
    """Small shapes under the Triton interpreter; odd widths and a chunked row elsewhere."""
    if backend == "triton" and not torch.cuda.is_available():
        return [(3, 7), (2, 33), (1, 130)]
    return [(3, 1), (4, 7), (2, 1023), (1, 4097), (5, 33)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("oc", OPTIM_CONFIGS, ids=lambda c: c.name)
def test_every_base_update(backend, oc):
    """Each optimizer option set, uniform 2-bit + PARQ, update and non-update steps."""
    params = make_rows(_shapes(backend), device=_device(backend), zero_row=True)
    for update in (True, False):
        assert_step_matches_reference(backend, params, oc, QC["unif-b2"], PC["parq-rho0.3"],
                                      update=update)  # fmt: skip


QUANT_PROX = [
    ("unif-b4", "hard"),
    ("unif-b3-center", "soft-T5"),
    ("maxunif-b2", "relax-0.4"),
    ("ternary-unif", "parq-rho0.3"),
    ("asym-b2", "hard"),
    ("lsbq-b1", "relax-0.4"),
    ("lsbq-b3", "parq-rho0.3"),
    ("lsbq-b2-center", "hard"),
    ("lsbq-ternary", "soft-T5"),
    ("lsbq-opt-b0", "parq-rho0.3"),
    ("lsbq-opt-b2", "hard"),
    ("unif-b8", "none"),
    ("ternary-thr-mean", "parq-rho0.3"),
    ("ternary-thr-max", "hard"),
    ("ternary-thr-center", "relax-0.4"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("qname", "pname"), QUANT_PROX)
@pytest.mark.parametrize("oname", ["sgd-mom-wd", "adamw"])
def test_every_quantizer_and_prox(backend, qname, pname, oname):
    if why := _not_served(backend, qname):
        pytest.skip(why)
    params = make_rows(_shapes(backend), device=_device(backend), seed=3)
    for update in (True, False):
        assert_step_matches_reference(backend, params, OC[oname], QC[qname], PC[pname],
                                      update=update, gamma=1.5 if update else 1.0)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("oname", ["sgd-nesterov-max", "adam-amsgrad"])
def test_half_precision(backend, dtype, oname):
    """Latent and state stored in bf16 / fp16, the update computed in float32."""
    params = make_rows(_shapes(backend), dtype=dtype, device=_device(backend), seed=4)
    for update in (True, False):
        assert_step_matches_reference(backend, params, OC[oname], QC["lsbq-b2"],
                                      PC["parq-rho0.3"], update=update)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_parameters_and_rows(backend):
    device = _device(backend)
    params = [torch.zeros(0, 5, device=device), torch.zeros(3, 0, device=device),
              *make_rows([(2, 9)], device=device)]  # fmt: skip
    assert_step_matches_reference(backend, params, OC["adamw"], QC["unif-b2"], PC["hard"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("oname", ["sgd-mom-wd", "sgd-mom-first", "adam-amsgrad", "adamw"])
@pytest.mark.parametrize("update", [True, False])
# an Inf gradient makes Adam's m and v Inf, so the discarded update is Inf / Inf = NaN by
# design; the Triton interpreter computes it in numpy, which warns (4 warnings per run)
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_nonfinite_gradient_keeps_the_element(backend, bad, oname, update):
    """A NaN/Inf gradient: that element keeps its latent and state, is projected from
    them, and its parameter (only) is flagged, like the reference."""
    device = _device(backend)
    latents = make_rows([(2, 8), (3, 5), (2, 9)], device=device, seed=6)
    oc, qc, pc = OC[oname], QC["unif-b2"], PC["parq-rho0.3"]
    assert_step_matches_reference(backend, latents, oc, qc, pc, update=update,
                                  bad_grad=(1, 2, 3, bad))  # fmt: skip
    grads, bufs = make_state(latents, oc)
    grads[1][2, 3] = bad
    out = run_step(backend, latents, grads, bufs, oc, qc, pc, update=True)
    assert out.flags.tolist() == [0, 1, 0]
    assert out.latents[1][2, 3] == latents[1][2, 3]
    for k in range(oc.nbufs):  # what the buffer held (QuantOptimizer starts it at zeros)
        assert out.bufs[k][1][2, 3] == bufs[k][1][2, 3], k
    assert all(torch.isfinite(t).all() for t in out.params + out.latents + out.quants)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    params = make_rows(_shapes(backend), device=_device(backend), seed=8)
    oc, qc, pc = OC["adam-amsgrad"], QC["lsbq-b2"], PC["parq-rho0.3"]
    grads, bufs = make_state(params, oc)
    a = run_step(backend, params, grads, bufs, oc, qc, pc)
    b = run_step(backend, params, grads, bufs, oc, qc, pc)
    for x, y in zip(a.params + a.latents + a.quants, b.params + b.latents + b.quants, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_raise(backend):
    device = _device(backend)
    latents = make_rows([(2, 8)], device=device)
    qc, pc = QC["unif-b2"], PC["hard"]
    oc = OC["adam"]
    grads, bufs = make_state(latents, oc)
    with pytest.raises((RuntimeError, ValueError), match="hparams"):
        run_step(backend, latents, grads, bufs, type(oc)("x", oc.kind, oc.hparams[:-1]), qc, pc)
    with pytest.raises((RuntimeError, ValueError), match="bufs2|exp_avg_sq"):
        run_step(backend, latents, grads, [bufs[0], [], []], oc, qc, pc)
    with pytest.raises((RuntimeError, ValueError), match="grads"):
        wrong = [torch.zeros(2, 7, device=device)]
        run_step(backend, latents, wrong, bufs, oc, qc, pc)

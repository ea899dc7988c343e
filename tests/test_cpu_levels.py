"""The CPU kernels' instruction-set levels (SPEC.md §14): one build, each level compiled
into it, chosen at run time.

* The level API: which level serves, which levels this CPU runs, forcing one.
* Every level this machine runs gives the **same bits** as the baseline level on every op
  (they share one source and its float operations; the reductions keep the same 64
  partials on every level), over a grid of optimizers, quantizers, prox maps, dtypes,
  shapes (odd lengths put elements in vector bodies, heads and tails) and non-finite
  inputs. The baseline level itself is compared with the reference by the rest of the
  suite (run under ``ATEN_CPU_CAPABILITY=default``, see ``.ci/run``) and here once.
* ``ATEN_CPU_CAPABILITY=default`` in a fresh process: the extension loads at the
  baseline level and its fused step matches the reference.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from child_process import run_child
from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS, ProxConfig, make_rows, run_op
from step_harness import OC, run_step

from parq_kernels import backends
from parq_kernels.kinds import ProxKind

_WHY = backends.availability("cpu")["cpu"]
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
QC = {c.name: c for c in QUANT_CONFIGS}
PC = {c.name: c for c in PROX_CONFIGS} | {
    "pq-l1": ProxConfig("pq-l1", ProxKind.PROXQUANT_L1, 0.02),
    "pq-l2": ProxConfig("pq-l2", ProxKind.PROXQUANT_L2, 0.5),
    "binaryconnect": ProxConfig("binaryconnect", ProxKind.BINARYCONNECT),
}
# per channel (short rows: the row loop and the pipelined update rows), per tensor (one
# long row: the chunked passes and the direct write), odd lengths (heads and tails)
SHAPES = [[(5, 64), (3, 37)], [(1, 9000)], [(2, 4096 * 4 + 3)]]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split()[2:])
    except (OSError, StopIteration):
        return set()


def _higher_levels() -> list[str]:
    return [lv for lv in backends.cpu_levels() if lv != "default"]


def test_level_api():
    levels = backends.cpu_levels()
    assert levels[0] == "default" and list(levels) == sorted(levels, key=backends.CPU_LEVELS.index)
    assert backends.cpu_level() in levels
    flags = _cpu_flags()
    if {"avx2", "fma", "f16c"} <= flags:
        assert "avx2" in levels
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        assert "avx512" not in levels
    before = backends.cpu_level()
    with backends.forced_cpu_level("default"):
        assert backends.cpu_level() == "default"
    assert backends.cpu_level() == before
    with pytest.raises(ValueError, match="level must be one of"), backends.forced_cpu_level("sse9"):
        pass
    assert backends.cpu_level() == before


def test_level_follows_torch():
    """At load the level is torch's own (so both step at the same level), capped by what
    the build has: with both AVX levels built, exactly torch's."""
    cap = torch.backends.cpu.get_cpu_capability()
    want = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "default")
    if want in backends.cpu_levels():
        assert backends.cpu_level() == want


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, what
    # bitwise, NaN where NaN (a NaN's payload may differ between conversions)
    same = (a == b) | (a.isnan() & b.isnan())
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ"


def _same_results(a, b, ctx: str, nbufs: int = 0) -> None:
    """Two runs' flags, weights, latents, levels (and ``nbufs`` state buffers) bitwise equal."""
    _equal(a.flags, b.flags, f"{ctx} flags")
    for i in range(len(a.params)):
        _equal(a.params[i], b.params[i], f"{ctx} params[{i}]")
        _equal(a.latents[i], b.latents[i], f"{ctx} latent[{i}]")
        _equal(a.quants[i], b.quants[i], f"{ctx} quants[{i}]")
        for k in range(nbufs):
            _equal(a.bufs[k][i], b.bufs[k][i], f"{ctx} bufs{k + 1}[{i}]")


def _step_at(level, latents, grads, bufs, oc, qc, pc, update, quants):
    with backends.forced_cpu_level(level):
        return run_step("cpu", latents, grads, bufs, oc, qc, pc, update, 1.0, quants)


def _state(latents, oc, seed=3):
    g = torch.Generator().manual_seed(seed)
    rand = lambda p, s: (torch.randn(p.shape, generator=g) * s).to(p.dtype)  # noqa: E731
    grads = [rand(p, 0.3) for p in latents]
    grads[0].view(-1)[5] = float("nan")  # a rejected element (keeps its old values)
    grads[-1].view(-1)[-2] = float("inf")
    nb = oc.nbufs
    bufs = [[rand(p, 0.05) for p in latents] if nb else [],
            [rand(p, 0.02).square() for p in latents] if nb > 1 else [],
            [rand(p, 0.02).square() for p in latents] if nb > 2 else []]  # fmt: skip
    return grads, bufs


@pytest.mark.parametrize("level", _higher_levels() or ["(none)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "optim", ["sgd", "sgd-mom-wd", "sgd-mom-first", "sgd-nesterov-max", "adamw", "adam-amsgrad"]
)
def test_fused_step_same_bits_on_every_level(level, dtype, optim):
    if level == "(none)":
        pytest.skip("this CPU runs the baseline level only")
    oc = OC[optim]
    cases = [("unif-b2", "parq-rho0.3"), ("unif-b2", "hard"), ("maxunif-b4", "hard"),
             ("lsbq-b2", "parq-rho0.3"), ("ternary-unif", "relax-0.4"), ("unif-b1", "pq-l1"),
             ("lsbq-ternary", "pq-l2"), ("asym-b2", "soft-T5"), ("unif-b2", "none"),
             ("ternary-thr-mean", "binaryconnect")]  # fmt: skip
    for shapes in SHAPES:
        latents = make_rows(shapes, dtype, seed=len(shapes))
        grads, bufs = _state(latents, oc)
        for qname, pname in cases:
            qc, pc = QC[qname], PC[pname]
            quants = run_op("reference", latents, qc, PC["none"], True).quants
            for update in (True, False):
                q = None if update else quants
                a = _step_at("default", latents, grads, bufs, oc, qc, pc, update, q)
                b = _step_at(level, latents, grads, bufs, oc, qc, pc, update, q)
                ctx = f"{level} {optim} {qname} {pname} {shapes} update={update}"
                _same_results(a, b, ctx, oc.nbufs)


@pytest.mark.parametrize("level", _higher_levels() or ["(none)"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quant_prox_same_bits_on_every_level(level, dtype):
    if level == "(none)":
        pytest.skip("this CPU runs the baseline level only")
    for shapes in SHAPES:
        params = make_rows(shapes, dtype, seed=7, zero_row=True)
        params[-1].view(-1)[3] = float("nan")
        for qc in QUANT_CONFIGS:
            for pc in PROX_CONFIGS:
                quants = run_op("reference", params, qc, PC["none"], True).quants
                for update in (True, False):
                    q = None if update else quants
                    with backends.forced_cpu_level("default"):
                        a = run_op("cpu", params, qc, pc, update, 1.0, q)
                    with backends.forced_cpu_level(level):
                        b = run_op("cpu", params, qc, pc, update, 1.0, q)
                    ctx = f"{level} {qc.name} {pc.name} {shapes} update={update}"
                    _same_results(a, b, ctx)


def test_baseline_level_in_a_fresh_process():
    """``ATEN_CPU_CAPABILITY=default``: torch and parq both at the baseline level, and the
    fused step still matches the reference."""
    code = textwrap.dedent(
        """
        import torch
        from kernel_harness import make_rows, PROX_CONFIGS, QUANT_CONFIGS
        from step_harness import OC, assert_step_matches_reference
        from parq_kernels import backends
        print(torch.backends.cpu.get_cpu_capability(), backends.cpu_level())
        qc = next(c for c in QUANT_CONFIGS if c.name == "unif-b2")
        for pc in PROX_CONFIGS[1:4]:
            for dtype in (torch.float32, torch.bfloat16):
                lat = make_rows([(4, 70), (1, 20000)], dtype)
                for oc in (OC["sgd-mom-wd"], OC["adamw"]):
                    for update in (True, False):
                        assert_step_matches_reference("cpu", lat, oc, qc, pc, update)
        print("ok")
        """
    )
    out = run_child(code, timeout=300, ATEN_CPU_CAPABILITY="default", PYTHONOPTIMIZE="")
    first, last = out.split("\n")[0], out.strip().split("\n")[-1]
    assert first.split()[-1] == "default", first
    assert last == "ok"

"""The Triton fused step's own design (parq_kernels/triton/step.py), beyond the backend grid.

* gradient offsets: a per-call table cached by the gradients' addresses (LRU),
  followed across steps whose gradients are reallocated, reordered in memory,
  or misaligned (16-byte vector hints off), with the optimizer state misaligned too;
* long rows split into chunks on update steps, every OptimKind: the base update
  is folded into the first statistics pass only (a second application would
  move the latent twice);
* launches: a fused step costs exactly the launches of ``quant_prox_`` on the
  same parameters (one per tile class on non-update steps);
* argument errors name the argument.

Small shapes: under the Triton interpreter every program costs milliseconds.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_harness import (
    LEVEL_RTOL,
    PROX_CONFIGS,
    QUANT_CONFIGS,
    _assert_params_close,
    _assert_rounding_close,
    make_rows,
    run_op,
)
from step_harness import OC, OptimConfig, StepResult, assert_step_matches_reference, make_state

from parq_kernels import backends
from parq_kernels.kinds import OptimKind
from parq_kernels.ops import fused_step_
from parq_kernels.triton import launch, plan, step

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and not INTERPRET, reason="no device for Triton (no GPU, no interpreter)"
)

QC = {c.name: c for c in QUANT_CONFIGS}
PC = {c.name: c for c in PROX_CONFIGS}


def _new_state(latents, bufs, K):
    return StepResult(
        params=[torch.full_like(p, float("nan")) for p in latents],
        latents=[p.clone() for p in latents],
        bufs=[[b.clone() for b in group] for group in bufs],
        quants=[torch.full((p.size(0), K), float("nan"), device=p.device) for p in latents],
        flags=torch.zeros(len(latents), dtype=torch.int32, device=latents[0].device),
    )


def _run(backend, st: StepResult, grads, oc: OptimConfig, hparams, qc, pc, update, gamma):
    """One fused step of ``backend`` in place on ``st``, with exactly these gradient tensors."""
    impl = backends.get_impl(backend, "fused_step_")
    impl(st.params, st.latents, grads, *st.bufs, st.quants, st.flags, int(oc.kind), hparams,
         int(qc.kind), qc.bits, qc.qargs, qc.center, update, int(pc.kind), pc.arg,
         gamma)  # fmt: skip


def _assert_same_step(fast, ref, oc, qc, pc, update, gamma, quants_in, where):
    """Like step_harness: state to float32 rounding, prox judged on the backend's latent."""
    assert torch.equal(fast.flags.cpu(), ref.flags.cpu()), f"{where} flags"
    again = run_op("reference", fast.latents, qc, pc, update, gamma, quants_in)
    for i in range(len(fast.latents)):
        _assert_rounding_close(fast.latents[i], ref.latents[i], f"{where} latent {i}")
        for k in range(oc.nbufs):
            _assert_rounding_close(fast.bufs[k][i], ref.bufs[k][i], f"{where} bufs{k + 1}[{i}]")
        Qo, Qr = fast.quants[i].cpu(), again.quants[i].cpu()
        scale = Qr.abs().amax(dim=1, keepdim=True) if Qr.numel() else Qr
        assert torch.all((Qo - Qr).abs() <= LEVEL_RTOL * scale + 1e-30), f"{where} levels {i}"
        _assert_params_close("triton", f"{where} param {i}", fast.latents, i, qc, pc, update,
                             gamma, quants_in, fast, again)  # fmt: skip


def _grads_for(latents, kind: str, seed: int):
    """Fresh gradient tensors, placed in memory according to ``kind``."""
    g = torch.Generator().manual_seed(seed)
    vals = [torch.randn(p.shape, generator=g) * 0.1 for p in latents]
    if kind == "reversed":  # later parameters at lower addresses: negative offsets likely
        out = [None] * len(vals)
        for i in reversed(range(len(vals))):
            out[i] = vals[i].to(DEV)
        return out
    if kind == "misaligned":  # views into one buffer at odd element offsets
        flat = torch.zeros(sum(v.numel() + 1 for v in vals) + 1, device=DEV)
        out, o = [], 0
        for v in vals:
            out.append(flat[o : o + v.numel()].view(v.shape))
            out[-1].copy_(v)
            o += v.numel() + 1
        return out
    return [v.to(DEV) for v in vals]


@pytest.mark.parametrize("oname", ["adam-amsgrad", "sgd-mom-wd"])
def test_gradient_offsets_follow_reallocated_grads(oname):
    """Six steps, each with its own gradient tensors (set_to_none-style), some seen before:
    the offset table is rebuilt for new addresses only, and every step matches the
    reference on equal inputs (lockstep). Misaligned gradients (and, for SGD, state
    buffers) turn the 16-byte vector hints off: a wrong hint would misaddress them."""
    oc = OC[oname]
    qc, pc = QC["lsbq-b2"], PC["hard"]
    latents = make_rows([(3, 8), (2, 8), (1, 40)], device=DEV, seed=11)
    _, bufs = make_state(latents, oc)
    if oc.kind == OptimKind.SGD:
        bufs = [_misaligned_copy(group) if group else [] for group in bufs]
    step.GRAD_TABLES.cache.clear()  # addresses of earlier tests' gradients may come back
    fast, ref = _new_state(latents, bufs, qc.K), _new_state(latents, bufs, qc.K)
    assert [tc.align for tc in plan.get_plan(fast.params, fast.latents, fast.quants,
                                             qc.K).classes] == [4, 4]  # fmt: skip
    kept = {}
    schedule = ["plain", "reversed", "plain", "misaligned", "reversed", "plain"]
    builds = []
    for s, kind in enumerate(schedule):
        grads = kept.setdefault(kind, _grads_for(latents, kind, seed=s))
        hp = list(oc.hparams)
        if oc.kind != OptimKind.SGD:
            hp[7] = float(s + 1)  # the step count: bias corrections change every call
        update = s % 3 == 0
        quants_in = None if update else [Q.clone() for Q in ref.quants]
        before = step.GRAD_TABLES.builds
        _run("triton", fast, grads, oc, tuple(hp), qc, pc, update, 1.25)
        builds.append(step.GRAD_TABLES.builds - before)
        _run("reference", ref, grads, oc, tuple(hp), qc, pc, update, 1.25)
        _assert_same_step(fast, ref, oc, qc, pc, update, 1.25, quants_in, f"[{oname} step {s}]")
        for a, b in zip(_tensors(fast), _tensors(ref), strict=True):  # lockstep
            a.copy_(b)
    assert builds == [1, 1, 0, 1, 0, 0]
    table, aligned = step.GRAD_TABLES.get((kept["misaligned"],), 3, ("grads",), latents[0])
    assert not aligned and table[:, 0].tolist() == [0, 25, 42]


def _misaligned_copy(group):
    """The tensors of ``group`` copied into one buffer at odd element offsets."""
    flat = torch.zeros(sum(t.numel() + 1 for t in group) + 1, dtype=group[0].dtype, device=DEV)
    out, o = [], 1
    for t in group:
        out.append(flat[o : o + t.numel()].view(t.shape))
        out[-1].copy_(t)
        o += t.numel() + 1
    return out


def _tensors(st: StepResult):
    return [*st.latents, *(b for group in st.bufs for b in group), *st.quants]


CHUNKED_QUANT = ["unif-b3-center", "lsbq-b3", "lsbq-opt-b2-center"]  # passes 0+1, 1-3, 0+gather


@pytest.mark.parametrize("qname", CHUNKED_QUANT)
@pytest.mark.parametrize("oname", ["sgd-nesterov-max", "adam-wd-max", "adamw-ams-beta0.3"])
def test_chunked_rows_every_optim_kind(monkeypatch, oname, qname):
    """Rows of 70 and 40 columns cut into 16-column chunks: the base update happens in the
    first statistics pass (update steps) or the apply pass (other steps), once."""
    monkeypatch.setattr(plan, "MAX_BLOCK", 16)
    monkeypatch.setattr(plan, "TILE", 64)
    monkeypatch.setattr(plan, "INTERPRET_TILE", 64)
    latents = make_rows([(1, 70), (2, 40), (3, 5)], device=DEV, seed=12, zero_row=True)
    for update in (True, False):
        assert_step_matches_reference("triton", latents, OC[oname], QC[qname], PC["parq-rho0.3"],
                                      update=update, gamma=1.5 if update else 1.0)  # fmt: skip


def _count(fn) -> int:
    before = launch.launch_count
    fn()
    return launch.launch_count - before


@pytest.mark.parametrize(
    "qname,chunked,want",
    [("unif-b2", False, (2, 5)), ("lsbq-b3", True, (1, 8)), ("lsbq-opt-b2-center", True, (1, 5))],
)
def test_launches_equal_quant_prox(monkeypatch, qname, chunked, want):
    """The base update adds no launch: a fused step costs what quant_prox_ costs on the same
    parameters, i.e. one launch per tile class on non-update steps. Rows of 7 and 33 columns:
    two classes of whole rows, or one class of 16-column tiles when rows longer than 16 are
    chunked (update: 3 passes of partials + finalize for 3-bit greedy LSBQ, center pass +
    gather for optimal LSBQ; then levels and apply)."""
    if chunked:
        monkeypatch.setattr(plan, "MAX_BLOCK", 16)
        monkeypatch.setattr(plan, "TILE", 64)
        monkeypatch.setattr(plan, "INTERPRET_TILE", 64)
    qc, pc, oc = QC[qname], PC["hard"], OC["adamw"]
    latents = make_rows([(3, 7), (2, 33)], device=DEV, seed=13)
    grads, bufs = make_state(latents, oc)
    quants = run_op("reference", latents, qc, PC["none"], True).quants
    got = []
    for update in (False, True):
        st = _new_state(latents, bufs, qc.K)
        st.quants = [Q.clone() for Q in quants]
        n_step = _count(lambda st=st, u=update: _run("triton", st, grads, oc, oc.hparams, qc, pc,
                                                      u, 1.0))  # fmt: skip
        n_prox = _count(lambda u=update: run_op("triton", latents, qc, pc, u, 1.0, quants))
        assert n_step == n_prox, f"update={update}: fused step {n_step}, quant_prox_ {n_prox}"
        got.append(n_step)
    assert tuple(got) == want


def test_quant_optimizer_adamw_takes_the_fused_step():
    """QuantOptimizer over AdamW (amsgrad) routes the group through the Triton fused step:
    update steps cost stats + levels + apply launches, other steps one launch."""
    from parq.optim import ProxHardQuant, QuantOptimizer
    from parq.quant import UnifQuantizer

    torch.manual_seed(0)
    layers = [torch.nn.Linear(w, 4).to(DEV) for w in (7, 9, 12)]
    base = torch.optim.AdamW([{"params": [m.weight for m in layers], "quant_bits": 2}], lr=0.01,
                             amsgrad=True)  # fmt: skip
    qopt = QuantOptimizer(base, UnifQuantizer(), ProxHardQuant(), quant_period=2,
                          quant_per_channel=True, backend="triton")  # fmt: skip
    counts = []
    for _ in range(3):
        qopt.zero_grad()
        for m in layers:
            m.weight.grad = torch.randn_like(m.weight)
        counts.append(_count(qopt.step))
    assert qopt.step_paths[0].path == "fused step"
    assert counts == [3, 1, 3]
    assert float(base.state[layers[0].weight]["step"]) == 3.0


def test_dispatcher_reaches_triton():
    """``parq_kernels.ops.fused_step_(..., backend="triton")`` runs this backend."""
    oc, qc, pc = OC["sgd-mom-first"], QC["unif-b2"], PC["soft-T5"]
    latents = make_rows([(2, 9)], device=DEV, seed=14)
    grads, bufs = make_state(latents, oc)
    a, b = _new_state(latents, bufs, qc.K), _new_state(latents, bufs, qc.K)
    _run("triton", a, grads, oc, oc.hparams, qc, pc, True, 1.0)
    before = launch.launch_count
    fused_step_(b.params, b.latents, grads, *b.bufs, b.quants, b.flags, int(oc.kind),
                list(oc.hparams), int(qc.kind), qc.bits, list(qc.qargs), qc.center, True,
                int(pc.kind), pc.arg, 1.0, backend="triton")  # fmt: skip
    assert launch.launch_count - before == 3
    for x, y in zip(_tensors(a) + a.params, _tensors(b) + b.params, strict=True):
        assert torch.equal(x, y)


def _bad_call(oc, latents, grads, bufs, hparams=None, optim_kind=None):
    qc, pc = QC["unif-b2"], PC["hard"]
    st = _new_state(latents, [[b.clone() for b in g] for g in bufs], qc.K)
    grads = st.params if grads == "params" else grads
    impl = backends.get_impl("triton", "fused_step_")
    impl(st.params, st.latents, grads, *bufs, st.quants, st.flags,
         int(oc.kind) if optim_kind is None else optim_kind,
         oc.hparams if hparams is None else hparams, int(qc.kind), qc.bits, qc.qargs, qc.center,
         True, int(pc.kind), pc.arg, 1.0)  # fmt: skip


def test_bad_arguments_name_the_argument():
    latents = make_rows([(2, 8), (1, 8)], device=DEV, seed=15)
    sgd, adam = OC["sgd-mom-wd"], OC["adam-amsgrad"]
    g_sgd, b_sgd = make_state(latents, sgd)
    g_adam, b_adam = make_state(latents, adam)
    sgd_args = dict(oc=sgd, grads=g_sgd, bufs=b_sgd)
    adam_args = dict(oc=adam, grads=g_adam, bufs=b_adam)
    bad_bufs2 = [b_adam[0], [b_adam[1][0].t(), b_adam[1][1]], b_adam[2]]
    cases = [
        ("optim_kind", dict(sgd_args, optim_kind=7)),
        ("hparams nesterov", dict(sgd_args, hparams=(0.1, 0.9, 0.0, 0.0, 0.5, 0, 0))),
        ("finite", dict(sgd_args, hparams=(float("nan"), 0.9, 0.0, 0.0, 0, 0, 0))),
        ("hparams step", dict(adam_args, hparams=(*adam.hparams[:7], 0.0))),
        (r"bufs1 \(momentum buffers\) must hold 2", dict(sgd_args, bufs=[[], [], []])),
        ("bufs1 .* must hold 0", dict(sgd_args, oc=OC["sgd"])),
        (r"bufs3 \(max_exp_avg_sq\)", dict(adam_args, bufs=[*b_adam[:2], []])),
        (r"grads must hold 2", dict(sgd_args, grads=g_sgd[:1])),
        (r"grads\[1\] must be a contiguous", dict(sgd_args, grads=[g_sgd[0], g_sgd[1].double()])),
        (r"bufs2\[0\] must be a contiguous", dict(adam_args, bufs=bad_bufs2)),
        (r"grads\[0\] must not alias", dict(sgd_args, grads="params")),
    ]
    for match, kw in cases:
        with pytest.raises(ValueError, match=match):
            _bad_call(latents=latents, **kw)

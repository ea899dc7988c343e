"""The CPU kernels' fast paths of update steps give the same bits as the general code.

* The fused step's pipelined rows (csrc/cpu/step_update.h: float32 rows of a multiple
  of the vector width, p aligned for streaming stores, prox NONE, PARQ with K <= 16 or
  HARD with a fresh uniform quantizer) against the general
  path (statistics pass, then write pass): the same call is made on aligned storage
  (pipelined) and with p one float past a 64-byte boundary (the general path runs).
* The write pass straight from the latent (csrc/cpu/write_direct.h: uniform HARD, PARQ
  with K <= 16) in its two forms, per element (the head until p is aligned, the tail) and
  a vector at a time: a row whose values repeat with a period of 47 puts the same inputs at
  both kinds of position (test_cpu_step_loop.py does the same for non-update steps).
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS, ProxConfig, placed, run_op
from step_harness import OPTIM_CONFIGS, make_state

from parq_kernels import backends
from parq_kernels.kinds import ProxKind, num_levels

_WHY = backends.availability("cpu")["cpu"]  # "" when the extension is built
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")

# several rows per task (the pipeline's prologue, middle and last row), and the
# largest row it serves (one statistics chunk)
SHAPES = [(7, 64), (3, 4096), (1, 32)]
PROX = [(ProxKind.PARQ, 0.3), (ProxKind.PARQ, 1.0), (ProxKind.NONE, 0.0), (ProxKind.HARD, 0.0)]


def _call(oc, qc, prox, shape, misalign: bool, nan_at: tuple[int, int] | None):
    g = torch.Generator().manual_seed(11)
    scale = 0.2 * torch.arange(1, shape[0] + 1, dtype=torch.float32)[:, None]
    lat = [torch.randn(shape, generator=g) * scale]  # rows of different scales
    grads, bufs = make_state(lat, oc)
    if nan_at is not None:
        grads[0][nan_at] = float("nan")  # that element keeps its latent and state
    quants = run_op("reference", [lat[0].clone()], qc, PROX_CONFIGS[0], True, 1.0).quants
    params = [placed(torch.full(shape, float("nan")), misalign)]
    lat = [placed(lat[0], False)]
    bufs = [[placed(b, False) for b in bs] for bs in bufs]
    quants = [torch.zeros_like(q) for q in quants]
    flags = torch.zeros(1, dtype=torch.int32)
    backends.get_impl("cpu", "fused_step_")(
        params, lat, grads, *bufs, quants, flags, int(oc.kind), oc.hparams, int(qc.kind),
        qc.bits, qc.qargs, qc.center, True, int(prox[0]), prox[1], 1.0)  # fmt: skip
    assert (params[0].data_ptr() % 64 == 4) == misalign
    out = {"params": params[0], "latent": lat[0], "quants": quants[0], "flags": flags}
    out.update({f"bufs{k + 1}": bs[0] for k, bs in enumerate(bufs) if bs})
    return out


# K <= 4: every quantizer kind; and 3- and 4-bit level sets (8 and 16 levels, padded)
QCS = [
    c for c in QUANT_CONFIGS if c.bits <= 2 or c.name in ("unif-b3-center", "maxunif-b4", "lsbq-b4")
]


@pytest.mark.parametrize("oc", [c for c in OPTIM_CONFIGS if c.name != "sgd-mom-first"],
                         ids=lambda c: c.name)  # fmt: skip
@pytest.mark.parametrize("qc", QCS, ids=lambda c: c.name)
@pytest.mark.parametrize("prox", PROX, ids=lambda p: f"{p[0].name}-{p[1]}")
def test_pipelined_update_equals_general_path(oc, qc, prox):
    for shape in SHAPES:
        nan_at = (shape[0] // 2, 5) if shape[0] > 1 else None
        fast = _call(oc, qc, prox, shape, False, nan_at)
        slow = _call(oc, qc, prox, shape, True, nan_at)
        for name, t in slow.items():
            assert torch.equal(fast[name], t), f"{shape}: {name} differs from the general path"
        assert int(fast["flags"][0]) == (nan_at is not None)


def test_pipelined_rows_are_not_shared():
    """Each row gets its own levels (row r has scale r + 1), from its updated latent."""
    oc = next(c for c in OPTIM_CONFIGS if c.name == "sgd-mom-wd")
    qc = next(c for c in QUANT_CONFIGS if c.name == "unif-b2")
    out = _call(oc, qc, (ProxKind.NONE, 0.0), (7, 64), False, None)
    amax = out["latent"].abs().amax(dim=1)
    top = out["quants"].amax(dim=1)
    assert torch.all(top <= amax * (1 + 1e-6)) and torch.all(top > 0)
    ratio = top / top[0]
    assert torch.allclose(ratio, torch.arange(1.0, 8.0), rtol=0.35), ratio
    assert torch.equal(out["params"], out["latent"])  # NONE: p = the updated latent


PERIOD, REPEATS = 47, 100  # 4700 elements: longer than a chunk (4096), so two chunks


def _periodic_row(seed: int, scale: float, reps: int, square: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(PERIOD, generator=g) * scale
    row = (v.square() if square else v).repeat(reps).view(1, -1)
    return placed(row, True)  # one float past a 64-byte boundary


def _assert_periodic(name: str, t: torch.Tensor) -> None:
    per = t.view(-1, PERIOD)
    assert torch.equal(per, per[:1].expand_as(per)), f"{name} differs between positions"


DIRECT = [ProxConfig("hard", ProxKind.HARD), ProxConfig("parq-rho0.3", ProxKind.PARQ, 0.3)]
DIRECT_Q = [c for c in QUANT_CONFIGS if c.name in ("unif-b2", "maxunif-b4", "lsbq-b2")]


@pytest.mark.parametrize("reps", [4, REPEATS], ids=["row", "two-chunks"])
@pytest.mark.parametrize("pc", DIRECT, ids=lambda c: c.name)
@pytest.mark.parametrize("qc", DIRECT_Q, ids=lambda c: c.name)
@pytest.mark.parametrize("op", ["fused_step_", "quant_prox_"])
def test_direct_write_scalar_and_vector_positions_agree(op, qc, pc, reps):
    oc = next(c for c in OPTIM_CONFIGS if c.name == "adamw")
    lat = [_periodic_row(0, 0.2, reps)]
    params = [placed(torch.full_like(lat[0], float("nan")), True)]
    if op == "quant_prox_":
        params[0].copy_(lat[0])
    quants = [torch.zeros(1, num_levels(qc.kind, qc.bits, qc.qargs))]
    flags = torch.zeros(1, dtype=torch.int32)
    impl = backends.get_impl("cpu", op)
    tail = (int(qc.kind), qc.bits, qc.qargs, qc.center, True, int(pc.kind), pc.arg, 1.0)
    if op == "fused_step_":
        grads = [_periodic_row(1, 2.0, reps)]
        grads[0][0, 3::PERIOD] = float("nan")  # a rejected element at every position class
        bufs = [[_periodic_row(2, 0.02, reps)], [_periodic_row(3, 0.02, reps, True)], []]
        impl(params, lat, grads, *bufs, quants, flags, int(oc.kind), oc.hparams, *tail)
        assert int(flags[0]) == 1
    else:
        impl(params, lat, quants, flags, *tail)
        assert int(flags[0]) == 0
    assert params[0].data_ptr() % 64 == 4
    _assert_periodic("params", params[0])
    _assert_periodic("latent", lat[0])
    levels = quants[0][0]
    on_level = (params[0][0, :, None] == levels).any(dim=1)
    if pc.kind == ProxKind.HARD:
        assert bool(on_level.all()), "hard: every weight on a level"
    else:
        assert bool(on_level.any()) and not bool(on_level.all()), "PARQ: some on, some between"

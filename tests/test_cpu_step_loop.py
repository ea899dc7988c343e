"""The CPU fused step's non-update loop gives the same bits in its two forms: the
per-element code (the head of a row, until the weights are aligned for streaming stores,
and its tail) and the vector body (simd.h at every level; bf16 at AVX2 / AVX-512 through
step_bf16.h, whose blocks with a rejected lane also run per element). A row whose values
repeat with a period of 47 puts the same inputs at scalar and vector positions."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS, placed, run_op
from step_harness import OPTIM_CONFIGS

from parq_kernels import backends
from parq_kernels.kinds import ProxKind

_WHY = backends.availability("cpu")["cpu"]  # "" when the extension is built
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")
PERIOD, REPEATS = 47, 4  # 188 elements: a head of 15, vector blocks, a tail of 13


def _offset_rows(values: torch.Tensor) -> torch.Tensor:
    """``values`` (1-D) as a contiguous (1, n) tensor one float past a 64-byte boundary."""
    return placed(values.view(1, -1), True)


def _periodic(seed: int, scale: float, square: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(PERIOD, generator=g) * scale
    return (v.square() if square else v).repeat(REPEATS)


# the first step of a momentum buffer takes the general path: not this loop
@pytest.mark.parametrize("oc", [c for c in OPTIM_CONFIGS if c.name != "sgd-mom-first"],
                         ids=lambda c: c.name)  # fmt: skip
@pytest.mark.parametrize("pc", [c for c in PROX_CONFIGS if c.kind != ProxKind.SOFT],
                         ids=lambda c: c.name)  # fmt: skip
@pytest.mark.parametrize("qname", ["unif-b2", "unif-b3-center", "lsbq-b4"])  # 4, 8, 16 levels
def test_scalar_and_vector_positions_agree(oc, pc, qname):
    lat = [_offset_rows(_periodic(0, 0.2))]
    grad = _periodic(1, 2.0)  # updates as large as the weights: every rounding shows
    grad[3::PERIOD] = float("nan")  # a rejected element at every position class
    grads = [_offset_rows(grad)]
    bufs = [[], [], []]
    for k in range(oc.nbufs):
        bufs[k].append(_offset_rows(_periodic(2 + k, 0.02, square=k > 0)))
    qc = next(c for c in QUANT_CONFIGS if c.name == qname)
    quants = run_op("reference", lat, qc, PROX_CONFIGS[0], True, 1.0).quants
    # the op itself (a harness would copy the rows to aligned storage)
    params = [_offset_rows(torch.full((PERIOD * REPEATS,), float("nan")))]
    flags = torch.zeros(1, dtype=torch.int32)
    backends.get_impl("cpu", "fused_step_")(
        params, lat, grads, *bufs, quants, flags, int(oc.kind), oc.hparams, int(qc.kind),
        qc.bits, qc.qargs, qc.center, False, int(pc.kind), pc.arg, 1.0)  # fmt: skip
    assert params[0].data_ptr() % 64 == 4
    rows = [("params", params[0]), ("latent", lat[0])]
    rows += [(f"bufs{k + 1}", bufs[k][0]) for k in range(oc.nbufs)]
    for name, t in rows:
        per = t.view(REPEATS, PERIOD)
        assert torch.equal(per, per[:1].expand_as(per)), f"{name} differs between positions"
    assert int(flags[0]) == 1

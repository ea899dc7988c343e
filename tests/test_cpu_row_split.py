"""The CPU ops work the rows of all a call's parameters in one parallel region
(csrc/cpu/row_split.h): many parameters in one call give the same bits as one call per
parameter, on one thread as on two, and a non-finite value flags its own parameter only."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import PROX_CONFIGS, QUANT_CONFIGS, make_rows
from step_harness import OC, make_state, run_step

from parq_kernels import backends

_WHY = backends.availability("cpu")["cpu"]  # "" when the extension is built
pytestmark = pytest.mark.skipif(bool(_WHY), reason=_WHY or "ok")

QC = {c.name: c for c in QUANT_CONFIGS}
PC = {c.name: c for c in PROX_CONFIGS}
# a model's mix: short rows of many sizes, a row longer than the split's grain, empty
# parameters, a few long rows (per-tensor: worked over its chunks, outside the split)
SHAPES = [(16, 144), (16, 1), (4, 0), (0, 8), (64, 576), (1, 10), (3, 40_000), (128, 27),
          (1, 70_001), (10, 10), (2, 33_000)]  # fmt: skip


def _split_and_alone(dtype, oc, qc, pc, update, threads):
    latents = make_rows(SHAPES, dtype=dtype, seed=3)
    grads, bufs = make_state(latents, oc)
    grads[5][0, 3] = float("nan")  # parameter 5 only
    quants = None
    if not update:  # stored levels: from an update step
        quants = run_step("cpu", latents, grads, bufs, oc, qc, pc, update=True).quants
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        together = run_step("cpu", latents, grads, bufs, oc, qc, pc, update, quants=quants)
        alone = []
        for i in range(len(latents)):
            one_bufs = [[b[i]] if b else [] for b in bufs]
            qs = None if quants is None else [quants[i]]
            alone.append(run_step("cpu", [latents[i]], [grads[i]], one_bufs, oc, qc, pc, update,
                                  quants=qs))  # fmt: skip
    finally:
        torch.set_num_threads(before)
    return together, alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("update", [True, False], ids=["update", "stored-levels"])
@pytest.mark.parametrize("qname,pname", [("unif-b2", "parq-rho0.3"), ("maxunif-b4", "hard"),
                                         ("lsbq-b3", "parq-rho0.3")])  # fmt: skip
def test_one_call_equals_a_call_per_parameter(dtype, update, qname, pname):
    oc, qc, pc = OC["adamw"], QC[qname], PC[pname]
    results = {t: _split_and_alone(dtype, oc, qc, pc, update, t) for t in (1, 2)}
    ref_together, _ = results[1]
    for threads, (together, alone) in results.items():
        assert together.flags.tolist() == [int(i == 5) for i in range(len(SHAPES))]
        for i, one in enumerate(alone):
            assert one.flags.tolist() == [int(i == 5)]
            pairs = [("params", together.params[i], one.params[0]),
                     ("latent", together.latents[i], one.latents[0]),
                     ("quants", together.quants[i], one.quants[0]),
                     ("params (1 thread)", together.params[i], ref_together.params[i])]  # fmt: skip
            pairs += [
                (f"bufs{k + 1}", b[i], one.bufs[k][0]) for k, b in enumerate(together.bufs) if b
            ]
            for what, x, y in pairs:
                assert torch.equal(x, y), f"{threads} threads, parameter {i} {SHAPES[i]}: {what}"

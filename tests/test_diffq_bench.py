"""The DiffQ step benchmark (``benchmarks/diffq_bench.py``): its per-parameter baseline
computes what the fused ops compute, and a case yields every variant."""

from __future__ import annotations

import torch
from torch import nn

from benchmarks import diffq_bench
from parq.diffq import DiffQuantizer


def test_per_parameter_baseline_matches_the_fused_ops():
    outs = []
    for cls in (DiffQuantizer, diffq_bench.PerParamDiffQ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(30, 20), nn.Linear(20, 5))
        q = cls(model, min_size=0, group_size=4)
        q.no_optimizer()
        q.generator = torch.Generator().manual_seed(1)
        weights = q._train_weights()
        sum((w * w).sum() for w in weights).backward()
        outs.append(([w.detach() for w in weights], [qp.logit.grad for qp in q._qparams]))
    for a, b in zip(outs[0][0] + outs[0][1], outs[1][0] + outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_case_yields_every_variant():
    case = diffq_bench.smoke_cases()[0]
    got = list(diffq_bench.run_case(case, torch.device("cpu"), ["reference"], repeats=1,
                                    warmup=0))  # fmt: skip
    assert [v for v, _, _ in got] == ["base", "generic", "diffq:reference"]
    assert all(t.median > 0 for _, t, _ in got)

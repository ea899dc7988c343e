"""pytest-benchmark view of the fake-quantization cases (``benchmarks/fakequant_bench.py``):
forward + backward of a wrapped CIFAR ResNet-20 and its float model, and the fake-quantize
op (composed ops, torch's kernel). Run with ``pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import fakequant_bench
from benchmarks.op_bench import STREAM
from benchmarks.timing import synchronizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PARAMS = [
    pytest.param(case, variant, id=f"{case.name}-{variant}")
    for case in fakequant_bench.quick_cases()
    for variant in case.variants(compile_baseline=False)
    if variant != STREAM
]


@pytest.mark.parametrize("case, variant", PARAMS)
def test_fakequant(benchmark, case, variant):
    build = fakequant_bench._model_fns if case.kind == "model" else fakequant_bench._op_fns
    fn = build(case, DEVICE, [variant])[variant]
    sync = synchronizer(DEVICE)

    def run():
        fn()
        sync()

    benchmark.extra_info.update(bytes=case.bytes(), numel=case.numel, variant=variant)
    benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)

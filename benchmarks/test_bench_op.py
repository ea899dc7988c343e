"""pytest-benchmark view of the op micro-benchmarks (``benchmarks/op_bench.py``,
``benchmarks/pack_bench.py``): ``quant_prox_``, ``fused_step_`` and the packed-export cases.

Run with ``pytest benchmarks --benchmark-only`` (never part of ``pytest tests``).
Cases: the quick grid, on every backend that can serve CPU tensors here (and
CUDA tensors when a GPU is present). ``extra_info`` carries the byte model.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import environment, op_bench, pack_bench
from benchmarks.timing import synchronizer
from parq_kernels.ops import fused_step_, quant_prox_

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPE = (2, 256, 1024)  # tensors, rows, cols: the quick mode's op shape
PARAMS = [
    pytest.param(device, backend, case, id=f"{device}-{backend}-{case.name}")
    for device in DEVICES
    for backend in environment.benchmark_backends(torch.device(device))[0]
    for case in op_bench.quick_grid()
]


@pytest.mark.parametrize("device, backend, case", PARAMS)
def test_op(benchmark, device, backend, case):
    dev = torch.device(device)
    inputs = op_bench.OpInputs(case, dev, *SHAPE)
    sync = synchronizer(dev)
    op = fused_step_ if case.optim else quant_prox_

    def run():
        inputs.call(case, op, backend=backend)
        sync()

    benchmark.extra_info.update(bytes=inputs.bytes, numel=inputs.numel, backend=backend)
    benchmark.pedantic(run, setup=inputs.reset, rounds=7, iterations=1, warmup_rounds=1)
    assert torch.isfinite(inputs.params[0].float()).all()


@pytest.mark.parametrize("case", [c for c in op_bench.quick_grid() if c.compile], ids=str)
def test_op_compiled_reference(benchmark, case):
    compiled, why = op_bench.compiled_reference(case)
    if compiled is None:
        pytest.skip(why)
    inputs = op_bench.OpInputs(case, torch.device("cpu"), *SHAPE)
    inputs.call(case, compiled)  # compile outside the timed rounds
    benchmark.extra_info.update(bytes=inputs.bytes, numel=inputs.numel, backend=op_bench.COMPILED)
    benchmark.pedantic(
        lambda: inputs.call(case, compiled), setup=inputs.reset, rounds=7, iterations=1
    )


PACK_PARAMS = [
    pytest.param(device, backend, case, id=f"{device}-{backend}-{case.name}")
    for device in DEVICES
    for backend in environment.benchmark_backends(torch.device(device))[0]
    for case in pack_bench.quick_grid()
]


@pytest.mark.parametrize("device, backend, case", PACK_PARAMS)
def test_pack_op(benchmark, device, backend, case):
    """The packed-export ops (pack_ / unpack_ / dequantize_)."""
    dev = torch.device(device)
    inputs = pack_bench.PackInputs(case, dev, *SHAPE)
    sync = synchronizer(dev)
    op = pack_bench.OPS[case.op]

    def run():
        inputs.call(op, backend=backend)
        sync()

    benchmark.extra_info.update(bytes=inputs.bytes, numel=inputs.numel, backend=backend)
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)

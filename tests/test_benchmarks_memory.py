"""The step suite's memory numbers (``benchmarks/memory.py``): exact state bytes on tiny
sets, and the peak-of-one-step method checked on steps and ops whose allocations are
known."""

from __future__ import annotations

import pytest
import torch

from benchmarks import memory, report, shapes, step_bench

CPU = torch.device("cpu")
SPECS = tuple(shapes.linear_stack(2, 64))  # 2 x Linear(64, 64): 8192 weights, 128 biases
WEIGHTS, BIASES = 2 * 64 * 64, 2 * 64


def _case(**kw) -> step_bench.StepCase:
    return step_bench.StepCase("2xLinear64", SPECS, **{"period": 10, **kw})


def test_state_bytes_sgd_momentum_latent_levels():
    row = memory.measure_case(_case(base="sgd"), CPU, "cpu")
    numel = WEIGHTS + BIASES
    assert (row["numel"], row["quantized"]) == (numel, WEIGHTS)
    # torch's fused SGD alone: one float32 momentum buffer per parameter element
    assert row["torch_fused"]["state"] == {"latent": 0, "levels": 0, "moments": 4 * numel,
                                           "other": 0, "total": 4 * numel}  # fmt: skip
    # QuantOptimizer: the same momentum, a float32 latent per weight, and per channel
    # (128 rows) 4 float32 levels (2 bits)
    q = row["quantopt"]["state"]
    want = {"latent": 4 * WEIGHTS, "levels": 128 * 4 * 4, "moments": 4 * numel, "other": 0}
    assert q == {**want, "total": sum(want.values())}
    assert memory.per_element(row, q["total"]) == pytest.approx((4 * WEIGHTS + 2048) / numel + 4)


def test_state_bytes_adamw_per_tensor_bf16_and_4bit_maxunif():
    row = memory.measure_case(_case(base="adamw", per_channel=False, dtype=torch.bfloat16), CPU,
                              "cpu")  # fmt: skip
    numel = WEIGHTS + BIASES
    # bf16 moments and latent (as torch keeps them), a float32 step scalar per parameter
    assert row["torch_fused"]["state"]["moments"] == 2 * 2 * numel
    assert row["torch_fused"]["state"]["other"] == 4 * 4
    q = row["quantopt"]["state"]
    assert (q["latent"], q["levels"], q["moments"]) == (2 * WEIGHTS, 2 * 4 * 4, 2 * 2 * numel)
    recipe = memory.measure_case(_case(base="adamw95", quantizer="maxunif", bits=4,
                                       prox="hard"), CPU, "cpu")  # fmt: skip
    assert recipe["quantopt"]["state"]["levels"] == 128 * 15 * 4  # 2**4 - 1 levels per row


def test_state_bytes_counts_a_shared_storage_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    buf = torch.zeros(6)
    opt.state[p] = {"exp_avg": buf, "exp_avg_sq": buf[2:], "latent": torch.zeros(3), "n": 1}
    assert memory.state_bytes(opt) == {"latent": 12, "levels": 0, "moments": 24, "other": 0,
                                       "total": 36}  # fmt: skip


def test_peak_of_a_trace():
    assert memory.peak_of([10, 5, -10, 20, -25]) == (25, 0)
    assert memory.peak_of([-8, 4]) == (0, -4)  # frees what was held before: no extra
    assert memory.peak_of([]) == (0, 0)


def test_peak_sees_the_temporaries_of_a_known_op():
    n = 1 << 18
    a = torch.randn(n)
    peak, retained = memory.peak_step_bytes(lambda: (a * 2 + 1).sum(), CPU)
    # a * 2 and (a * 2) + 1 live together (2 n floats), then the scalar sum
    assert 2 * 4 * n <= peak <= 2 * 4 * n + 64 and retained <= 64
    kept = []
    peak, retained = memory.peak_step_bytes(lambda: kept.append(a + 1), CPU)
    assert retained == 4 * n and 4 * n <= peak <= 4 * n + 64  # the output outlives the call


def test_peak_of_torch_steps():
    p = torch.nn.Parameter(torch.randn(256, 256))
    p.grad = torch.randn_like(p)
    fused = torch.optim.SGD([p], lr=0.01, momentum=0.9, fused=True)
    fused.step()  # the momentum buffer exists from here on
    assert memory.peak_step_bytes(fused.step, CPU) == (0, 0)  # in place: nothing extra
    foreach = torch.optim.AdamW([p], lr=1e-3, foreach=True)
    foreach.step()
    peak, retained = memory.peak_step_bytes(foreach.step, CPU)
    assert peak >= 4 * p.numel() and abs(retained) <= 64  # its temporaries, freed again


def test_quantoptimizer_step_peaks_are_measured_between_and_on_update():
    row = memory.measure_case(_case(base="sgd"), CPU, "cpu")
    q = row["quantopt"]
    assert set(q) == {"variant", "state", "between", "update"} and q["variant"] == "fused:cpu"
    assert "between" not in row["torch_fused"]  # torch's step has no level updates
    for peak, _ in (q["between"], q["update"], row["torch_fused"]["update"]):
        assert 0 <= peak < 4 * (WEIGHTS + BIASES)  # less than one more copy of the weights
    one = memory.measure_case(_case(base="sgd", period=1), CPU, "cpu")
    assert "between" not in one["quantopt"]


def test_memory_table_and_markdown(tmp_path):
    rows = [memory.measure_case(_case(base="sgd"), CPU, "cpu")]
    text = memory.table(rows)
    line = next(s for s in text.splitlines() if s.startswith("2xLinear64"))
    assert "uniform2+parq" in line and " 8.18 " in line  # (4 * 8192 + 2048) / 8320 + 4
    assert memory.table(rows, markdown=True).count("\n|---|") == 1
    assert [memory.human_bytes(b) for b in (12, 1536, 3 << 20, 5 << 30)] == [
        "12 B", "1.5 KiB", "3.00 MiB", "5.00 GiB"
    ]  # fmt: skip
    env = {"device_name": "cpu", "device": "cpu", "cpu_threads": 1, "cpu_count": 1,
           "python": "3", "torch": "2", "triton": "-", "backends_available": ["cpu"],
           "backends_missing": {}}  # fmt: skip
    step = [report.make_row("step", "c", "base(fused=True)", 1, 1, None)]
    report.write_markdown(step, env, 1.0, tmp_path / "r.md", rows)
    md = (tmp_path / "r.md").read_text()
    assert md.index("### QuantOptimizer.step()") < md.index("### Memory") and "2xLinear64" in md

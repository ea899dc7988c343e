"""Smoke tests of the benchmark suite (``python -m benchmarks --smoke``) and its parts.

One in-process smoke run (tiny shapes, a few repeats) is shared by the checks on
its outputs; the torch.compile baseline is replaced by the uncompiled reference
so that no compilation runs here (``benchmarks/README.md`` covers the real one).
"""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest
import torch

from benchmarks import cli, environment, fakequant_bench, op_bench, report, shapes, step_bench
from benchmarks.timing import measure, measure_interleaved, summarize
from parq_kernels import backends, reference, reference_step


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setattr(
        op_bench,
        "compiled_reference",
        lambda case: (reference_step.fused_step_ if case.optim else reference.quant_prox_, ""),
    )
    try:
        torch.manual_seed(0)
        assert cli.main(["--smoke", "--out", str(out), "--no-progress"]) == 0
    finally:
        mp.undo()
    stems = {p.stem for p in out.iterdir()}
    assert len(stems) == 1, stems
    stem = out / stems.pop()
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    payload = json.loads(stem.with_suffix(".json").read_text())
    return stem, rows, payload


def _f(value: str) -> float | None:
    return float(value) if value != "" else None


def test_smoke_writes_all_outputs(smoke_run):
    stem, rows, payload = smoke_run
    assert stem.name.startswith("cpu-") and stem.name.endswith("_smoke")
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = stem.with_suffix(".md").read_text()
    assert "copy bandwidth" in md and "| case | variant | median ms |" in md
    assert list(rows[0]) == report.COLUMNS
    assert {r["suite"] for r in rows} == {"op", "step", "fakequant"}
    assert "### Fake quantization" in md
    assert payload["mode"] == "smoke" and len(payload["rows"]) == len(rows)
    assert payload["copy_bandwidth_gbps"] > 0
    assert "3 * itemsize" in payload["byte_models"]["op"]
    assert [m["set"] for m in payload["memory"]] == ["2xLinear64"] and "### Memory" in md


def test_smoke_times_the_packed_export_ops(smoke_run):
    _, rows, payload = smoke_run
    deq = [r for r in rows if r["suite"] == "op" and r["case"].startswith("dequantize/")]
    assert {r["variant"] for r in deq} >= {"reference", "stream"}
    assert all(_f(r["gbps"]) > 0 for r in deq)
    assert "ceil(n*w/8)" in payload["byte_models"]["pack"]


def test_smoke_reports_every_backend(smoke_run):
    _, rows, payload = smoke_run
    env = payload["environment"]
    assert env["torch"] == torch.__version__
    available, missing = env["backends_available"], env["backends_missing"]
    assert "reference" in available
    assert set(available) | set(missing) == set(backends.BACKENDS)
    assert all(isinstance(why, str) and why for why in missing.values())
    # TRITON_INTERPRET=1 is set by conftest on CPU: the interpreter is never timed
    assert "triton" not in available
    op_variants = {r["variant"] for r in rows if r["suite"] == "op"}
    assert op_variants == set(available) | {op_bench.COMPILED, op_bench.STREAM}
    step_variants = {r["variant"] for r in rows if r["suite"] == "step"}
    assert step_variants == {"base", "base(fused=True)", "generic", "stream"} | {
        f"{path}:{b}" for b in available for path in ("fused", "fused-prox")
    }


def test_smoke_derived_columns_are_ratios_of_measured_medians(smoke_run):
    _, rows, payload = smoke_run
    copy_gbps = payload["copy_bandwidth_gbps"]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["suite"], r["case"]), {})[r["variant"]] = r
    checked = 0
    for r in rows:
        if r["suite"] == "fakequant":
            continue  # below
        med = _f(r["median_ms"])
        assert med is not None and med > 0
        assert _f(r["min_ms"]) <= _f(r["q1_ms"]) <= med <= _f(r["q3_ms"]) <= _f(r["max_ms"])
        gbps = int(r["bytes"]) / (med * 1e-3) / 1e9
        assert math.isclose(_f(r["gbps"]), gbps, rel_tol=1e-9)
        peers = by_case[(r["suite"], r["case"])]
        stream = peers["stream"]  # the case's own working-set stream, timed in its round-robin
        own = int(stream["bytes"]) / (_f(stream["median_ms"]) * 1e-3) / 1e9
        best = max([own] + [_f(p["gbps"]) for p in peers.values() if p["gbps"]])
        assert copy_gbps > 0 and math.isclose(_f(r["frac_copy_bw"]), gbps / best, rel_tol=1e-9)
        assert _f(r["frac_copy_bw"]) <= 1.0  # of the best bandwidth seen on this working set
        if r["variant"] == "stream":
            assert r["speedup_vs_reference"] == ""
            continue
        if r["suite"] == "op":
            ref = _f(peers["reference"]["median_ms"])
            if op_bench.COMPILED in peers:
                comp = _f(peers[op_bench.COMPILED]["median_ms"])
                assert math.isclose(_f(r["speedup_vs_compile"]), comp / med, rel_tol=1e-9)
                checked += 1
            else:
                assert r["speedup_vs_compile"] == ""
        else:
            ref = _f(peers["generic"]["median_ms"])
            base = _f(peers["base(fused=True)"]["median_ms"])  # torch's fused=True step
            assert math.isclose(_f(r["time_vs_base"]), med / base, rel_tol=1e-9)
        if r["variant"].startswith("base"):
            assert r["speedup_vs_reference"] == ""
        else:
            assert math.isclose(_f(r["speedup_vs_reference"]), ref / med, rel_tol=1e-9)
            checked += 1
    assert checked >= 6
    fq = [r for r in rows if r["suite"] == "fakequant"]
    model_case, op_case = (c.name for c in fakequant_bench.smoke_cases())
    assert {r["variant"] for r in fq if r["case"] == model_case} == {
        "float", "bypassed", "qat:w8a8", "qat:w8a8+fold_bn"
    }  # fmt: skip
    assert {r["variant"] for r in fq if r["case"] == op_case} == {
        "composed", "torch kernel", "stream"
    }  # fmt: skip
    for r in fq:
        peers = by_case[("fakequant", r["case"])]
        med = _f(r["median_ms"])
        if r["variant"] == "stream":
            assert r["time_vs_base"] == ""
            continue
        base = _f((peers.get("float") or peers["composed"])["median_ms"])
        assert math.isclose(_f(r["time_vs_base"]), med / base, rel_tol=1e-9)
        assert r["speedup_vs_reference"] == "" and r["speedup_vs_compile"] == ""
        if r["case"] == model_case:
            assert r["bytes"] == "" and r["gbps"] == ""  # no byte model for a model
        else:
            assert int(r["bytes"]) == 2 * 2 * 4 * 8 * 8 * 4  # read + write, float32


def test_fakequant_compile_failure_is_reported_not_fatal(monkeypatch):
    def broken(fn):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fakequant_bench, "compiled", broken)
    case = fakequant_bench.FakeQuantCase("op", (2, 3), compile=True)
    out = list(fakequant_bench.run_case(case, torch.device("cpu"), compile_baseline=True,
                                        repeats=1, warmup=0))  # fmt: skip
    assert [(v, t is None) for v, t, _ in out] == [
        ("composed", False), ("torch kernel", False), ("composed(compile)", True), ("stream", False)
    ]  # fmt: skip
    assert "torch.compile failed: RuntimeError: no compiler here" in out[2][2]
    no_compile = fakequant_bench.FakeQuantCase("model", (1, 3, 8, 8), compile=True)
    assert "qat:w8a8(compile)" not in no_compile.variants(compile_baseline=False)


def test_fakequant_variants_share_the_initial_weights():
    cpu = torch.device("cpu")
    ref = [p.detach().clone() for p in fakequant_bench.build_model("float", cpu).parameters()]
    for variant in ("bypassed", "qat:w8a8+fold_bn"):
        params = list(fakequant_bench.build_model(variant, cpu).parameters())
        assert all(torch.equal(a, b) for a, b in zip(ref, params, strict=True))


def test_smoke_byte_models(smoke_run):
    _, rows, _ = smoke_run
    op = next(r for r in rows if r["case"] == "uniform2/parq/channel/fp32")
    # one 8 x 64 fp32 tensor, per channel, K = 4: read p + write latent + write p, plus Q
    assert int(op["numel"]) == 512 and int(op["bytes"]) == 3 * 512 * 4 + 8 * 4 * 4
    block = next(r for r in rows if r["case"] == "lsbq2/hard/block32/fp32")
    assert int(block["bytes"]) == 3 * 512 * 4 + 16 * 4 * 4  # 16 blocks of 32
    fstep = next(r for r in rows if r["case"] == "step:adamw/uniform2/parq/channel/fp32")
    # read latent, grad, exp_avg, exp_avg_sq; write them but grad, and p: 8 per element
    assert int(fstep["bytes"]) == 8 * 512 * 4 + 8 * 4 * 4
    step = [r for r in rows if r["suite"] == "step"]
    weights, biases = 2 * 64 * 64, 2 * 64
    for r in step:
        size = 2 if r["case"].endswith("/bf16") else 4
        base = 5 * (weights + biases) * size  # SGD with momentum
        if r["variant"].startswith("base"):
            want = base
        elif r["variant"].startswith("fused:") or r["variant"] == "stream":
            want = base + 1 * weights * size  # the fused step also writes the projected weights
        else:
            want = base + 5 * weights * size  # restore + base step + quantize/prox pass
        assert int(r["bytes"]) == want, r["variant"]


def test_compile_failure_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(op_bench, "compiled_reference", lambda case: (None, "no compiler here"))
    case = op_bench.OpCase("ternary", 0, "hard", "tensor", compile=True)
    out = list(
        op_bench.run_case(
            case, torch.device("cpu"), ["reference"], True,
            n_tensors=1, rows=4, cols=8, repeats=1, warmup=0,
        )
    )  # fmt: skip
    assert [(v, t is None, note) for v, t, _, note in out] == [
        ("reference", False, ""),
        (op_bench.COMPILED, True, "no compiler here"),
        (op_bench.STREAM, False, ""),
    ]
    rows = [report.make_row("op", case.name, v, 32, 400, t, note) for v, t, _, note in out]
    report.derive(rows, copy_gbps=10.0)
    assert rows[1]["median_ms"] is None and rows[0]["speedup_vs_compile"] is None
    assert "n/a" in report.table(rows, "op") and "no compiler here" in report.table(rows, "op")


def test_derive_exact_ratios():
    class T:  # a Timing stand-in with exact values
        def __init__(self, s):
            self.median = self.q1 = self.q3 = self.min = self.max = s
            self.repeats = 1

    rows = [
        report.make_row("step", "c", "base", 10, 2000, T(0.001)),
        report.make_row("step", "c", "generic", 10, 4000, T(0.008)),
        report.make_row("step", "c", "fused:cpu", 10, 4000, T(0.002)),
        report.make_row("step", "d", "base", 10, 2000, T(0.002)),
        report.make_row("step", "d", "base(fused=True)", 10, 2000, T(0.001)),
        report.make_row("step", "d", "fused:cpu", 10, 2400, T(0.0012)),
        report.make_row("step", "d", "stream", 10, 2400, T(0.0006)),
        report.make_row("step", "e", "base(fused=True)", 10, 3000, T(0.001)),
        report.make_row("step", "e", "stream", 10, 2400, T(0.0012)),
    ]
    report.derive(rows, copy_gbps=4.0)
    fused = rows[2]
    assert fused["speedup_vs_reference"] == pytest.approx(4.0)
    assert fused["time_vs_base"] == pytest.approx(2.0)  # no fused base row: the plain base
    assert fused["gbps"] == pytest.approx(4000 / 0.002 / 1e9)
    assert fused["frac_copy_bw"] == pytest.approx(fused["gbps"] / 4.0)  # no stream row: global
    assert rows[0]["speedup_vs_reference"] is None and rows[0]["time_vs_base"] == 1.0
    assert rows[3]["time_vs_base"] == pytest.approx(2.0)  # vs torch's fused=True step
    assert rows[5]["time_vs_base"] == pytest.approx(1.2)
    assert rows[5]["frac_copy_bw"] == pytest.approx(0.5)  # vs the case's own stream row
    assert rows[6]["frac_copy_bw"] == pytest.approx(1.0) and rows[6]["time_vs_base"] is None
    # torch's step outran the stream: it is the yardstick (no fraction above 100 %)
    assert rows[7]["frac_copy_bw"] == pytest.approx(1.0)
    assert rows[8]["frac_copy_bw"] == pytest.approx(2.0 / 3.0)


def test_summarize_and_measure():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.q1, t.q3, t.min, t.max, t.repeats) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    calls = []
    m = measure(lambda: calls.append("run"), repeats=3, warmup=2, setup=lambda: calls.append("s"))
    assert calls == ["s", "run"] * 5 and m.repeats == 3 and m.min >= 0
    with pytest.raises(ValueError, match="repeats"):
        measure(lambda: None, repeats=0)
    calls.clear()
    out = measure_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        repeats=2, warmup=1, setup=lambda: calls.append("s"),
    )  # fmt: skip
    # round-robin, warm-up round included, each round starting one callable later
    assert calls == ["s", "a", "s", "b", "s", "b", "s", "a", "s", "a", "s", "b"]
    assert {k: t.repeats for k, t in out.items()} == {"a": 2, "b": 2}


def test_step_variants_and_memory_skip(monkeypatch):
    case = step_bench.smoke_cases()[0]
    cpu = torch.device("cpu")
    run = list(step_bench.run_case(case, cpu, ["reference"], repeats=1, warmup=0,
                                   fused_reference=False))  # fmt: skip
    # fused:reference is kept when it is the only backend
    assert [v for v, t, _ in run if t is not None] == [
        "base", "base(fused=True)", "generic", "fused-prox:reference", "fused:reference", "stream"
    ]  # fmt: skip
    period10 = step_bench.StepCase("x", case.specs, period=10)
    assert "generic" not in step_bench.variants(period10, ["cpu"], fused_reference=False)
    monkeypatch.setattr(step_bench, "available_memory", lambda device: 1000)
    run = list(step_bench.run_case(case, cpu, ["reference"], repeats=1, warmup=0))
    assert all(t is None and note.startswith("skipped: needs") for _, t, note in run)


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--quick", "--full"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--smoke", "--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--smoke", "--suites", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_grids_are_valid_and_quick_grid_covers_each_axis():
    full = op_bench.full_grid()
    for case in full:  # every case's bits are valid for its quantizer
        kind, qargs = case.kind
        assert op_bench.num_levels(kind, case.bits, qargs) >= 2
    assert {(c.quantizer, c.bits) for c in full} == {
        (q, b) for q, by_bits in op_bench.QUANTIZERS.items() for b in by_bits
    }
    quick = op_bench.quick_grid()
    assert set(quick) <= set(full) | {c for c in quick if not c.compile}
    for axis in ("quantizer", "prox", "granularity", "dtype", "update"):
        assert len({getattr(c, axis) for c in quick}) >= 2, axis


def test_model_shapes_match_known_parameter_counts():
    assert shapes.count(shapes.resnet20()) == 269_722
    assert shapes.count(shapes.resnet50()) == 25_557_032  # torchvision resnet50
    assert shapes.count(shapes.vit_b16()) == 86_567_656  # torchvision vit_b_16
    assert 1.23e9 < shapes.count(shapes.llama_1b()) < 1.24e9  # Llama-3.2-1B, tied embeddings
    stack = shapes.linear_stack(8, 1024)
    assert shapes.count(stack, quantized=True) == 8 * 1024 * 1024
    assert shapes.count(stack, quantized=False) == 8 * 1024


def test_issue4_cases():
    cases = step_bench.issue4_cases()
    assert {(c.quantizer, c.prox, c.per_channel) for c in cases} == {
        ("uniform", "parq", True), ("lsbq", "parq", True), ("uniform", "hard", False)
    }  # fmt: skip
    assert {c.base for c in cases} == {"sgd", "adamw"} and all(c.bits == 2 for c in cases)
    assert {c.period for c in cases} == {1, 10}


def test_device_slug_is_file_name_safe():
    slug = environment.device_slug(torch.device("cpu"))
    assert slug.startswith("cpu") and all(c.isalnum() or c == "-" for c in slug)


def test_without_tqdm_and_matplotlib_plain_output_no_chart(tmp_path, monkeypatch, capsys):
    """Missing optional packages: one note each, before any work; plain progress lines,
    every table but the chart, exit status 0."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["--smoke", "--suites", "op", "--repeats", "1", "--no-compile", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("note:")] == [
        "note: tqdm is not installed: plain progress lines (pip install tqdm)",
        "note: matplotlib is not installed: no chart (.png) (pip install matplotlib)",
    ]
    assert any(line.startswith("[1/") for line in err)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json", ".md"]
    # a partial run is named after its suites, so it never overwrites a whole run's files
    assert all(p.stem.endswith("_smoke_op") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device", "bogus"], "--device 'bogus' is not a device"),
        (["--device", "meta"], "only cpu and cuda[:i] are supported"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda:0"], "CUDA is not available")]),
)
def test_cli_device_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--smoke", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_unwritable_out_fails_before_any_work(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(environment, "environment", no_work)
    with pytest.raises(SystemExit) as exc:
        cli.main(["--smoke", "--out", str(blocker / "results")])
    assert exc.value.code == 2
    assert "not a writable directory" in capsys.readouterr().err


def test_quick_mode_times_the_headline_step_cases_more():
    cases = cli.mode_config("quick").step_cases
    headline = [c for c in cases if c in step_bench.issue4_cases(repeats=9)]
    assert len(headline) == 12 and all(c.repeats == 9 for c in headline)
    added = [c for c in cases if c.model == "8xLinear1024" and c not in headline]
    assert len(added) == 44 and all(c.repeats == cli.QUICK_ADDED_REPEATS for c in added)
    models = [c for c in cases if c.model not in ("8xLinear1024", step_bench.HOST)]
    assert {c.repeats for c in models} == {cli.QUICK_MODEL_REPEATS, None}  # headline's: 5
    host = [c for c in cases if c.model == step_bench.HOST]
    assert len(host) == 2 and all(c.repeats == cli.QUICK_HOST_REPEATS for c in host)

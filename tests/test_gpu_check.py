"""The GPU check's dry run (``python -m benchmarks.gpu_check --dry-run``) on the CPU.

Every stage runs as it would on a GPU, with the CPU stand-ins of the module's docstring:
the existing extension instead of a build, the warm-up arguments checked against the
recorded launches, a Triton test under the interpreter, the smoke benchmark. The test
reads the files it writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check
from benchmarks.triton_aot import LAUNCHES

ROOT = Path(__file__).resolve().parent.parent


def test_budget_fits_eight_minutes_on_an_h100():
    assert sum(gpu_check.BUDGET_S.values()) <= 8 * 60
    assert list(gpu_check.BUDGET_S) == ["build", "warm", "tests", "bench"]


def test_gpu_stages_build_for_the_present_arch_and_select_gpu_tests(tmp_path):
    build, warm, tests, bench = gpu_check.stages(False, tmp_path, "9.0", LAUNCHES)
    assert build.env["TORCH_CUDA_ARCH_LIST"] == "9.0" and build.env["PARQ_FORCE_CUDA"] == "1"
    assert "--no-build-isolation" in build.command[-1] and "--dry-run" not in warm.command
    assert "-k 'cuda or triton'" in tests.command[-1]
    assert "tests/test_cpu_backend.py" not in tests.command[-1]
    assert bench.command[3:8] == ["--quick", "--device", "cuda", "--suites", "op"]


def test_dry_run_runs_every_stage_and_writes_its_summary(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("total ")  # summary printed last
    (result_file,) = tmp_path.glob("gpu-check_cpu-*_dry-run.json")
    result = json.loads(result_file.read_text())
    assert result["dry_run"] is True
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["build", "warm", "tests", "bench"]
    assert all(s["status"] == "ok" for s in stages.values()), stages
    assert all(s["seconds"] <= s["budget_s"] for s in stages.values())
    n = len(json.loads(LAUNCHES.read_text()))
    assert f"checked {n}/{n} launches" in stages["warm"]["detail"]
    assert "1 passed" in stages["tests"]["detail"]
    (bench_json,) = tmp_path.glob("cpu-*_smoke_op.json")
    assert json.loads(bench_json.read_text())["rows"]
    assert any(line.startswith("op cpu: median") for line in result["headline"])
    assert result_file.with_suffix(".md").read_text().count("\n") < 30  # one screen
    assert "===== tests:" in result_file.with_suffix(".log").read_text()

"""The first GPU minutes: build, test and time the CUDA and Triton paths in one command.

``python -m benchmarks.gpu_check [--dry-run] [--out DIR]`` (``make gpu-check``,
``make gpu-check DRY_RUN=1``). Stages, each a child process with its own time limit;
a stage that fails or runs out of time is reported and the next one runs anyway:

======  ==========  ==========================================================
stage   budget (s)  what (on a CUDA machine; ``--dry-run``: on the CPU)
======  ==========  ==========================================================
build   150         ``pip install --no-build-isolation --no-deps -e .`` with
                    ``PARQ_FORCE_CUDA=1`` and ``TORCH_CUDA_ARCH_LIST`` of the
                    GPU present only (9.0 on an H100), ``MAX_JOBS`` = cores;
                    then the backends the build serves. Dry run: no build,
                    the existing extension is imported and its backends listed
warm    60          Triton's compile cache warmed once with every recorded
                    launch (:mod:`benchmarks.triton_warm`, all cores). Dry
                    run: the warm-up arguments checked against the recording
tests   90          the CUDA- and Triton-marked tests only (files and ``-k``
                    below), not the CPU suite. Dry run: a few Triton tests
                    under the interpreter
bench   170         ``python -m benchmarks --quick --device cuda --suites op
                    step``: ops against the reference and ``torch.compile``,
                    the fused step against torch's ``fused=True`` SGD / AdamW
                    on the headline and model-shaped sets, Triton against
                    CUDA, GB/s and share of the measured copy bandwidth. Dry
                    run: ``--smoke --device cpu --suites op`` (interpreter)
======  ==========  ==========================================================

470 s in all, under the 8 minutes of an H100 (the budgets are the stages' time
limits; the summary shows each stage's seconds against its budget). Every stage
runs with ``TRITON_DEFAULT_FP_FUSION=0`` (no FMA contraction, as the C++ kernels'
``-ffp-contract=off``; :mod:`benchmarks.triton_aot`). Results: the benchmark's own
files and ``gpu-check_<device>_<date>.{json,md,log}`` under ``--out`` (default
``benchmarks/results``); a one-screen summary is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.triton_aot import LAUNCHES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = {"build": 150, "warm": 60, "tests": 90, "bench": 170}
# whole files of GPU-only tests, then files whose cuda / triton cases are picked by -k
GPU_TEST_FILES = ("tests/test_cuda_backend.py", "tests/test_triton_backend.py",
                  "tests/test_triton_fused_step.py")  # fmt: skip
MIXED_TEST_FILES = ("tests/test_fused_step_backends.py", "tests/test_diffq_ops.py",
                    "tests/test_export_ops.py", "tests/test_proxquant.py",
                    "tests/test_ternary_threshold.py")  # fmt: skip
# the dry run's tests: the Triton fused step under the interpreter, a few seconds each
DRY_TESTS = ("tests/test_triton_fused_step.py::test_dispatcher_reaches_triton",
             "tests/test_cuda_backend.py")  # fmt: skip


@dataclass
class Stage:
    name: str
    command: list[str]
    budget_s: float
    env: dict = field(default_factory=dict)
    status: str = "not run"  # ok | failed (rc) | timeout | skipped
    seconds: float = 0.0
    detail: str = ""
    output: str = ""


def cuda_arch() -> str | None:
    """``"9.0"`` for an H100 / H200: the capability of the GPU present (None: no GPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def stages(dry_run: bool, out: Path, arch: str | None, launches: Path) -> list[Stage]:
    py = sys.executable
    cores = str(os.cpu_count() or 1)
    backends = "from parq_kernels import backends as b; print({d: b.availability(d) for d in %s})"
    if dry_run:
        build = Stage("build", [py, "-c", "import parq_kernels._C; " + backends % "['cpu']"],
                      BUDGET_S["build"])  # fmt: skip
    else:
        build = Stage("build", ["bash", "-c", f"{py} -m pip install --no-build-isolation "
                      f"--no-deps -e . && {py} -c \"{backends % ['cpu', 'cuda']}\""],
                      BUDGET_S["build"], {"PARQ_FORCE_CUDA": "1", "MAX_JOBS": cores,
                      "TORCH_CUDA_ARCH_LIST": arch or ""})  # fmt: skip
    warm = Stage("warm", [py, "-m", "benchmarks.triton_warm", "--jobs", cores, "--launches",
                 str(launches),
                 *(["--dry-run"] if dry_run else [])], BUDGET_S["warm"])  # fmt: skip
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if dry_run:
        tests = Stage("tests", [*pytest, *DRY_TESTS], BUDGET_S["tests"])
    else:
        tests = Stage("tests", ["bash", "-c", f"{' '.join(pytest)} {' '.join(GPU_TEST_FILES)}; "
                      f"a=$?; {' '.join(pytest)} {' '.join(MIXED_TEST_FILES)} -k "
                      "'cuda or triton'; b=$?; exit $((a > b ? a : b))"],
                      BUDGET_S["tests"])  # fmt: skip
    size = ["--smoke", "--device", "cpu", "--suites", "op", "--no-compile"] if dry_run else [
        "--quick", "--device", "cuda", "--suites", "op", "step"]  # fmt: skip
    bench = Stage("bench", [py, "-m", "benchmarks", *size, "--no-progress", "--out", str(out)],
                  BUDGET_S["bench"])  # fmt: skip
    return [build, warm, tests, bench]


def run_stage(stage: Stage, env: dict) -> None:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(stage.command, cwd=ROOT, env={**env, **stage.env},
                              timeout=stage.budget_s, capture_output=True, text=True)  # fmt: skip
        stage.output = proc.stdout + proc.stderr
        stage.status = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
    except subprocess.TimeoutExpired as exc:
        parts = (exc.stdout, exc.stderr)
        stage.output = "".join(p.decode() if isinstance(p, bytes) else (p or "") for p in parts)
        stage.status = "timeout"
    stage.seconds = round(time.perf_counter() - t0, 1)
    stage.detail = describe(stage)


def describe(stage: Stage) -> str:
    """One line of what a stage's output says (pytest's tally, the warm-up's count...)."""
    text = stage.output
    if stage.name == "tests":
        tallies = re.findall(r"=* ?(\d+ (?:passed|failed|skipped|error)[^\n]*?) in [\d.]+s", text)
        return "; ".join(t.strip("= ") for t in tallies) or _last(text)
    if stage.name == "warm":
        return next((ln for ln in text.splitlines() if ln.startswith("triton_warm:")), _last(text))
    if stage.name == "bench":
        m = re.search(r"wrote (\S+)\.\{", text)
        return f"wrote {Path(m.group(1)).name}.*" if m else _last(text)
    if stage.name == "build":
        m = re.findall(r"^\{'cpu'.*$", text, re.M)
        return (m[-1] if m else _last(text))[:160]
    return _last(text)


def _last(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def bench_headline(out: Path, bench: Stage) -> list[str]:
    """The numbers the issue asks for, from the benchmark's JSON: fused step against
    torch's fused=True step, and the fused op's share of the copy bandwidth."""
    m = re.search(r"wrote (\S+)\.\{", bench.output)
    if not m or not Path(m.group(1) + ".json").exists():
        return []
    data = json.loads(Path(m.group(1) + ".json").read_text())
    rows, lines = data["rows"], [f"copy bandwidth {data['copy_bandwidth_gbps']:.0f} GB/s"]
    for r in rows:
        fused = r["suite"] == "step" and r["variant"].startswith("fused:")
        if fused and r["variant"] != "fused:reference" and r.get("time_vs_base"):
            lines.append(f"step {r['case'][:52]:52s} {r['variant']:14s} "
                         f"{r['time_vs_base']:.2f}x torch fused")  # fmt: skip
    ops = [r for r in rows if r["suite"] == "op" and r["variant"] not in ("stream",)
           and not r["variant"].startswith("reference") and r.get("frac_copy_bw")]  # fmt: skip
    for variant in sorted({r["variant"] for r in ops}):
        fr = sorted(r["frac_copy_bw"] for r in ops if r["variant"] == variant)
        lines.append(f"op {variant}: median {100 * fr[len(fr) // 2]:.0f} % of copy bandwidth "
                     f"over {len(fr)} cases")  # fmt: skip
    return lines[:14]


def summary(result: dict) -> str:
    total = sum(s["budget_s"] for s in result["stages"])
    lines = [f"== gpu-check {'(dry run) ' if result['dry_run'] else ''}on {result['device']} ==",
             f"{'stage':6s} {'status':12s} {'s / budget':>12s}  detail"]  # fmt: skip
    for s in result["stages"]:
        lines.append(f"{s['name']:6s} {s['status']:12s} {s['seconds']:6.0f} / {s['budget_s']:<4.0f}"
                     f"  {s['detail']}")  # fmt: skip
    lines += result["headline"]
    lines.append(f"total {result['elapsed_s']:.0f} s (budget {total} s); "
                 f"{sum(s['status'] == 'ok' for s in result['stages'])}/{len(result['stages'])} "
                 f"stages ok; results: {result['files']}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="on the CPU: interpreter, tiny shapes")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--launches", type=Path, default=LAUNCHES, help="recorded Triton launches")
    p.add_argument("--only", nargs="+", choices=list(BUDGET_S), help="run only these stages")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    arch = None if args.dry_run else cuda_arch()
    import torch

    from benchmarks import environment

    device = torch.device("cpu" if args.dry_run or arch is None else "cuda")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="0", PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    all_stages = stages(args.dry_run, args.out, arch, args.launches)
    for stage in all_stages:
        if args.only and stage.name not in args.only:
            stage.status = "skipped"
        elif not args.dry_run and arch is None:
            stage.status, stage.detail = "skipped", "no CUDA GPU visible (use --dry-run)"
        else:
            print(f"[gpu-check] {stage.name} (budget {stage.budget_s:.0f} s) ...", flush=True)
            run_stage(stage, env)
            print(f"[gpu-check] {stage.name}: {stage.status} in {stage.seconds} s", flush=True)
    sm = arch.replace(".", "") if arch else None
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    stem = args.out / f"gpu-check_{environment.device_slug(device)}_{date}"
    if args.dry_run:
        stem = stem.with_name(stem.name + "_dry-run")
    result = {
        "dry_run": args.dry_run,
        "device": environment.device_name(device) + (f" (sm_{sm})" if sm else ""),
        "torch": torch.__version__,
        "date_utc": date,
        "stages": [{k: v for k, v in asdict(s).items() if k != "output"} for s in all_stages],
        "headline": bench_headline(args.out, all_stages[-1]),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "files": f"{stem.relative_to(ROOT) if stem.is_relative_to(ROOT) else stem}.{{json,md,log}}",
    }
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".log").write_text("".join(
        f"===== {s.name}: {' '.join(s.command)}\n{s.output}\n" for s in all_stages))  # fmt: skip
    text = summary(result)
    stem.with_suffix(".md").write_text(f"```\n{text}\n```\n")
    print("\n" + text)
    return 0 if all(s.status in ("ok", "skipped") for s in all_stages) else 1


if __name__ == "__main__":
    sys.exit(main())

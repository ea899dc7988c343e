"""Ahead-of-time compilation of every recorded Triton launch for a real GPU, without a GPU.

``python -m benchmarks.triton_aot [--record] [--launches FILE] [--per-kernel N] [--arch 90]``

1. *Record* (``--record``, or when ``--launches`` is missing): run the Triton tests
   under the interpreter with the :mod:`benchmarks.triton_record` plugin, in a child
   process; the GPU's plan sizes are recorded, not the interpreter's. The distinct
   launches (kernel, signature, constexprs, divisibility attrs, ``num_warps``) go to
   ``benchmarks/results/triton_launches.json``.
2. *Compile* each with Triton's own toolchain:
   ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda",
   90, 32), options=...)`` (the cubin for ``sm_90a``), in ``--jobs`` worker processes,
   and read ``ptxas -v``'s report: registers, spill stores / loads, stack frame, and
   Triton's shared memory.
3. *Report*: ``benchmarks/results/triton_aot_sm<arch>.{json,md}``: one row per
   launch, a per-kernel summary, and every launch that spills. Exit status 1 if any
   launch fails to compile or (with ``--fail-on-spill``) spills.

Rounding: every kernel is compiled with ``enable_fp_fusion=False`` (ptxas
``--fmad=false``): no multiply-add is contracted into an FMA, as the C++ kernels build
with ``-ffp-contract=off``, so the GPU kernels round each product and sum separately,
as the reference's float32 operations do (SPEC §6 tolerances still apply: the order of
reductions differs). At run time the same is asked of the JIT by
``TRITON_DEFAULT_FP_FUSION=0`` (:mod:`benchmarks.gpu_check` sets it); triton 3.9 warns
that the default, fusion on, changes in 3.10.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LAUNCHES = RESULTS / "triton_launches.json"
# the test files whose launches are recorded: every test that calls the Triton backend
TRITON_TESTS = (
    "tests/test_triton_backend.py",
    "tests/test_triton_fused_step.py",
    "tests/test_fused_step_backends.py",
    "tests/test_diffq_ops.py",
    "tests/test_export_ops.py",
    "tests/test_proxquant.py",
    "tests/test_ternary_threshold.py",
)
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def record(path: Path, tests: tuple[str, ...] = TRITON_TESTS, timeout: float = 3600) -> int:
    """Run ``tests`` under the interpreter with the recorder; returns the launches recorded."""
    env = dict(os.environ, TRITON_INTERPRET="1", PARQ_TRITON_RECORD=str(path))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.triton_record", *tests,
           "-k", "triton"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:  # failing tests still launched: keep what they recorded, say so
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        print(f"warning: the recorded tests exited {proc.returncode}", file=sys.stderr)
    if proc.returncode not in (0, 1) or not path.exists():
        raise RuntimeError(f"recording the Triton launches failed (pytest exit {proc.returncode})")
    return len(json.loads(path.read_text()))


def tile_elems(spec: dict) -> int:
    c = spec["constexprs"]
    return int(c.get("ROWS", 1)) * int(c.get("BLOCK", 1))


def select(launches: list[dict], per_kernel: int | None, min_tile: int = 0) -> list[dict]:
    """All launches, or per kernel the ``per_kernel`` with the largest tiles (and an Adam
    base first: the most live values), a small subset that holds the register-hungry ones,
    plus (``min_tile``) every launch whose tile holds at least that many elements."""
    if not per_kernel and not min_tile:
        return launches
    if min_tile:
        big = [s for s in launches if tile_elems(s) >= min_tile]
        picked = {json.dumps(s, sort_keys=True) for s in big}
        rest = [s for s in select(launches, per_kernel or 1)
                if json.dumps(s, sort_keys=True) not in picked]  # fmt: skip
        return big + rest
    by_kernel: dict[str, list[dict]] = {}
    for spec in launches:
        by_kernel.setdefault(spec["name"], []).append(spec)
    out = []
    for name in sorted(by_kernel):
        ranked = sorted(by_kernel[name], key=lambda s: (-tile_elems(s), -int(
            s["constexprs"].get("OPT", 0)), json.dumps(s, sort_keys=True)))  # fmt: skip
        out.extend(ranked[:per_kernel])
    return out


def _parse_ptxas(log: str, name: str) -> dict:
    """Registers and spills of entry ``name`` from a ``ptxas -v`` log."""
    part = log.split(f"Function properties for {name}", 1)
    props = _PROPS.search(part[1] if len(part) > 1 else log)
    regs = _REGS.search(part[1] if len(part) > 1 else log)
    if props is None or regs is None:
        raise RuntimeError(f"no ptxas resource report for {name} in:\n{log}")
    stack, stores, loads = (int(g) for g in props.groups())
    return {"registers": int(regs.group(1)), "stack_bytes": stack, "spill_stores": stores,
            "spill_loads": loads}  # fmt: skip


def compile_one(spec: dict, arch: int = 90) -> dict:
    """Compile one recorded launch for ``cuda:<arch>``; the row of the report."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    row = {k: spec[k] for k in ("module", "name", "constexprs", "num_warps", "num_stages")}
    row["dtypes"] = sorted({t for _, t in spec["signature"] if t.startswith("*")})
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    index = {name: i for i, (name, _) in enumerate(spec["signature"])}
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    src = ASTSource(
        fn,
        dict((name, ty) for name, ty in spec["signature"]),
        {(index[k],): v for k, v in spec["constexprs"].items()},
        {(index[k],): backend.parse_attr(v) for k, v in spec["attrs"].items()},
    )
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
               "enable_fp_fusion": False}  # fmt: skip
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target, options=options)
        row.update(_parse_ptxas(log.getvalue(), kernel.metadata.name))
        row["shared_bytes"] = int(kernel.metadata.shared)
        row["error"] = None
    except Exception as exc:  # report it and go on: one failure must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir  # fresh: every compile runs ptxas and logs
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(launches: list[dict], arch: int, jobs: int) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the kernels must be real @triton.jit functions")
    with tempfile.TemporaryDirectory(prefix="parq-aot-") as cache:
        if jobs <= 1:
            _worker_init(cache)
            return [compile_one(s, arch) for s in launches]
        rows = []
        with ProcessPoolExecutor(jobs, initializer=_worker_init, initargs=(cache,)) as pool:
            for row in pool.map(compile_one, launches, [arch] * len(launches)):
                rows.append(row)
                if len(rows) % 100 == 0:
                    print(f"  {len(rows)}/{len(launches)} compiled", flush=True)
        return rows


def spills(row: dict) -> bool:
    return row.get("error") is None and (row["spill_stores"] > 0 or row["spill_loads"] > 0)


def _config(row: dict) -> str:
    c = row["constexprs"]
    keys = ("ROWS", "BLOCK", "OPT", "KIND", "BITS", "PROX", "BASE", "UPDATE", "PASS", "K")
    shown = " ".join(f"{k}={c[k]}" for k in keys if k in c)
    return f"{shown} w{row['num_warps']} {'/'.join(d[1:] for d in row['dtypes'])}"


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel: configurations, register range, spilling ones, shared memory, failures."""
    out = []
    for name in sorted({r["name"] for r in rows}):
        rs = [r for r in rows if r["name"] == name]
        ok = [r for r in rs if r["error"] is None]
        out.append({
            "kernel": name,
            "configs": len(rs),
            "failed": len(rs) - len(ok),
            "registers_min": min((r["registers"] for r in ok), default=None),
            "registers_max": max((r["registers"] for r in ok), default=None),
            "spilling": sum(spills(r) for r in ok),
            "max_spill_stores": max((r["spill_stores"] for r in ok), default=0),
            "max_shared_bytes": max((r["shared_bytes"] for r in ok), default=0),
        })  # fmt: skip
    return out


def _selection(sel: dict) -> str:
    parts = []
    if sel["min_tile"]:
        parts.append(f"tiles of >= {sel['min_tile']} elements plus each kernel's largest")
    elif sel["per_kernel"]:
        parts.append(f"each kernel's {sel['per_kernel']} largest tiles")
    if sel["kernels"]:
        parts.append("kernels " + ", ".join(sel["kernels"]))
    return "; ".join(parts) or "all"


def markdown(rows: list[dict], arch: int, meta: dict) -> str:
    lines = [f"# Triton kernels compiled ahead of time for sm_{arch}a (no GPU)", "",
             f"triton {meta['triton']}, `enable_fp_fusion=False` (ptxas `--fmad=false`); "
             f"{len(rows)} of the {meta['selection']['recorded']} distinct launches recorded "
             f"from the Triton tests at the GPU's plan sizes (selection: "
             f"{_selection(meta['selection'])}; `python -m benchmarks.triton_aot`, "
             f"{meta['elapsed_s']:.0f} s on {meta['jobs']} jobs).", "",
             "| kernel | configs | failed | registers | spilling | max spill stores (B) "
             "| max shared (B) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summary(rows):
        lines.append(f"| `{s['kernel']}` | {s['configs']} | {s['failed']} | "
                     f"{s['registers_min']}-{s['registers_max']} | {s['spilling']} | "
                     f"{s['max_spill_stores']} | {s['max_shared_bytes']} |")  # fmt: skip
    bad = [r for r in rows if spills(r) or r["error"]]
    lines += ["", f"## Launches that spill or fail ({len(bad)})", ""]
    if not bad:
        lines.append("None: no launch spills registers and every launch compiles.")
    for r in bad:
        what = (f"FAILED {r['error'][:200]}" if r["error"] else
                f"{r['registers']} regs, {r['spill_stores']} B spill stores, "
                f"{r['spill_loads']} B spill loads")  # fmt: skip
        lines.append(f"- `{r['name']}` {_config(r)}: {what}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_aot", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--record", action="store_true", help="record the launches again first")
    p.add_argument("--launches", type=Path, default=LAUNCHES, help="recorded launches (JSON)")
    p.add_argument("--per-kernel", type=int, default=None,
                   help="compile only the N largest-tile launches of each kernel")  # fmt: skip
    p.add_argument(
        "--min-tile",
        type=int,
        default=0,
        help="only launches of tiles >= N elements (plus each kernel's largest)",
    )
    p.add_argument("--kernels", nargs="+", default=None, help="only these kernel names")
    p.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=RESULTS, help="report directory")
    p.add_argument("--name", default=None, help="report file stem (default triton_aot_sm<arch>)")
    p.add_argument("--fail-on-spill", action="store_true", help="exit 1 if any launch spills")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.record or not args.launches.exists():
        n = record(args.launches)
        print(f"recorded {n} distinct Triton launches -> {args.launches}", flush=True)
    launches = json.loads(args.launches.read_text())
    n_recorded = len(launches)
    if args.kernels:
        launches = [s for s in launches if s["name"] in args.kernels]
    launches = select(launches, args.per_kernel, args.min_tile)
    print(f"compiling {len(launches)} launches for sm_{args.arch}a on {args.jobs} jobs", flush=True)
    rows = compile_all(launches, args.arch, args.jobs)
    import triton

    meta = {"triton": triton.__version__, "arch": args.arch, "enable_fp_fusion": False,
            "selection": {"per_kernel": args.per_kernel, "min_tile": args.min_tile,
                          "kernels": args.kernels, "recorded": n_recorded},
            "elapsed_s": time.perf_counter() - t0, "jobs": args.jobs,
            "launches_file": str(args.launches.relative_to(ROOT) if args.launches.is_relative_to(
                ROOT) else args.launches)}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (args.name or f"triton_aot_sm{args.arch}")
    report = {**meta, "summary": summary(rows), "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    text = markdown(rows, args.arch, meta)
    stem.with_suffix(".md").write_text(text)
    print(text)
    failed = sum(r["error"] is not None for r in rows)
    spilled = sum(spills(r) for r in rows)
    print(f"{len(rows)} compiled, {failed} failed, {spilled} spill -> {stem}.{{json,md}}")
    return 1 if failed or (args.fail_on_spill and spilled) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the CUDA kernels (``csrc/cuda/*.cu``) for one GPU architecture, without a GPU.

``python -m benchmarks.nvcc_check [--arch 90] [--out DIR]``: ``nvcc -c -arch=sm_<arch>
-Xptxas -v`` on each source with the extension's own flags (setup.py: ``-O3 -DNDEBUG
-std=c++20 --fmad=false`` plus torch's ``COMMON_NVCC_FLAGS``) and torch's include
paths; nothing is linked. Reports per kernel (demangled) the registers, stack frame,
spill stores / loads and shared memory ptxas gives, into
``benchmarks/results/cuda_ptxas_sm<arch>.{json,md}``.

A CPU build of torch ships the CUDA headers but not the one that its CMake build
generates, ``c10/cuda/impl/cuda_cmake_macros.h``: when it is missing, a shim that
defines ``C10_CUDA_BUILD_SHARED_LIBS`` (what the generated header holds in torch's
shared-library builds) is put first on the include path, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GENERATED = "c10/cuda/impl/cuda_cmake_macros.h"
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def flags(arch: int, shim: Path | None) -> list[str]:
    from torch.utils import cpp_extension

    inc = [f"-I{p}" for p in cpp_extension.include_paths()]
    return [f"-arch=sm_{arch}", "-Xptxas", "-v", "-O3", "-DNDEBUG", "-std=c++20", "--fmad=false",
            *cpp_extension.COMMON_NVCC_FLAGS, *([f"-I{shim}"] if shim else []), *inc,
            f"-I{ROOT / 'csrc'}", "-DPARQ_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C"]  # fmt: skip


def parse(log: str) -> list[dict]:
    """One row per entry function of a ``-Xptxas -v`` log."""
    rows: list[dict] = []
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            rows.append({"mangled": m.group(1), "arch": m.group(2)})
            continue
        if not rows:
            continue
        if (m := _PROPS.search(line)) and "stack_bytes" not in rows[-1]:
            rows[-1].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                            spill_loads=int(m.group(3)))  # fmt: skip
        elif (m := _USED.search(line)) and "registers" not in rows[-1]:
            rows[-1].update(registers=int(m.group(1)), shared_bytes=int(m.group(2) or 0))
    names = [r["mangled"] for r in rows]
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        for r, name in zip(rows, out.stdout.splitlines(), strict=False):
            r["kernel"] = re.sub(r"\(anonymous namespace\)::", "", name)
    return rows


def compile_sources(arch: int, timeout: float = 900) -> dict:
    """Compile every ``csrc/cuda/*.cu``; ``{nvcc, shim, sources: {file: {ok, seconds, rows,
    error}}}``."""
    import time

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    result: dict = {"arch": f"sm_{arch}", "nvcc": None, "shim": False, "sources": {}}
    if nvcc is None:
        result["error"] = "nvcc not found on PATH"
        return result
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    result["nvcc"] = version.strip().splitlines()[-1] if version.strip() else "?"
    have = any((Path(p) / GENERATED).exists() for p in cpp_extension.include_paths())
    with tempfile.TemporaryDirectory(prefix="parq-nvcc-") as tmp:
        shim = None
        if not have:
            shim = Path(tmp) / "shim"
            (shim / GENERATED).parent.mkdir(parents=True)
            (shim / GENERATED).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            result["shim"] = True
        for src in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            cmd = [nvcc, "-c", str(src), "-o", str(Path(tmp) / (src.stem + ".o")),
                   *flags(arch, shim)]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            log = proc.stdout + proc.stderr
            result["sources"][src.name] = {
                "ok": proc.returncode == 0,
                "seconds": round(time.perf_counter() - t0, 1),
                "rows": parse(log),
                "error": None if proc.returncode == 0 else log[-3000:],
            }
    return result


def markdown(result: dict) -> str:
    lines = [f"## CUDA kernels (nvcc, {result['arch']})", ""]
    if result.get("error"):
        return "\n".join(lines + [f"Not compiled: {result['error']}."]) + "\n"
    lines.append(f"{result['nvcc']}; `-O3 --fmad=false`, torch's include paths"
                 + (f", with a shim for `{GENERATED}` (absent from the CPU wheel)" if
                    result["shim"] else "") + "; compiled, not linked.")  # fmt: skip
    lines += ["", "| source | kernel | registers | stack (B) | spill stores / loads (B) "
              "| shared (B) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, src in result["sources"].items():
        if not src["ok"]:
            lines.append(f"| {name} | FAILED: {src['error'].splitlines()[-1][:160]} | | | | |")
        for r in src["rows"]:
            lines.append(f"| {name} | `{r.get('kernel', r['mangled'])}` | {r.get('registers')} | "
                         f"{r.get('stack_bytes')} | {r.get('spill_stores')} / "
                         f"{r.get('spill_loads')} | {r.get('shared_bytes')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nvcc_check", description=__doc__)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    result = compile_sources(args.arch)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"cuda_ptxas_sm{args.arch}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)
    ok = not result.get("error") and all(s["ok"] for s in result["sources"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

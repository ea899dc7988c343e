"""Warm Triton's compile cache with every recorded launch, in parallel, before the GPU tests.

``python -m benchmarks.triton_warm [--launches FILE] [--jobs N] [--dry-run]``

The JIT compiles a kernel on its first launch with a new specialization, one at a
time in the launching process: the Triton tests would spend most of their minutes
compiling. Here each launch recorded by :mod:`benchmarks.triton_record` is compiled
once through the JIT's own path (``kernel.warmup(*args, grid=(1,), **meta)``: the
same binder, options and cache key as a real launch, nothing run) in ``--jobs``
worker processes; the tests then find the kernels in the on-disk cache.

The arguments are made to reproduce the recorded specialization: a tensor of the
recorded dtype, 16-byte aligned where the launch was (``D``), one element off where
it was not; integers 16 / 17 (``i32``) or 2**32 / 2**32 + 1 (``i64``); floats 1.5.
``--dry-run`` (no GPU) builds those arguments on the CPU and checks, through
Triton's CUDA binder, that they give back the recorded signature, constexprs and
attributes: the logic of the warm-up is tested without compiling anything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from benchmarks.triton_aot import LAUNCHES

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp64": torch.float64, "i64": torch.int64, "i32": torch.int32, "i16": torch.int16,
           "i8": torch.int8, "u8": torch.uint8, "i1": torch.bool}  # fmt: skip
_INTS = {"i32": (16, 17), "i64": (1 << 32, (1 << 32) + 1), "u64": (1 << 63, (1 << 63) + 1)}


def make_args(spec: dict, device: str) -> dict:
    """Keyword arguments that specialize the kernel as ``spec`` records (see module doc)."""
    kwargs = {}
    for name, ty in spec["signature"]:
        aligned = "D" in spec["attrs"].get(name, "")
        if ty == "constexpr":
            kwargs[name] = spec["constexprs"][name]
        elif ty.startswith("*"):
            base = torch.zeros(64, dtype=_DTYPES[ty[1:]], device=device)
            kwargs[name] = base if aligned else base[1:]
        elif ty in _INTS:
            kwargs[name] = _INTS[ty][0 if aligned else 1]
        elif ty in ("fp32", "fp64"):
            kwargs[name] = 1.5
        elif ty in ("i1", "u1"):
            kwargs[name] = True
        else:
            raise ValueError(f"{spec['name']}: no warm-up argument for {name}: {ty}")
    return kwargs


def kernel_of(spec: dict):
    return getattr(importlib.import_module(spec["module"]), spec["name"])


def check_one(spec: dict) -> str | None:
    """Dry run: ``None`` if the made arguments reproduce ``spec`` through the CUDA binder."""
    from benchmarks.triton_record import launch_spec

    meta = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    got = launch_spec(kernel_of(spec).fn, (), {**make_args(spec, "cpu"), **meta})
    for key in ("signature", "constexprs", "attrs", "num_warps", "num_stages"):
        if got[key] != spec[key]:
            return f"{spec['name']}: {key} {got[key]} != recorded {spec[key]}"
    return None


def warm_one(spec: dict) -> str | None:
    """Compile one launch into the cache on the GPU; ``None`` or the error."""
    try:
        meta = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
        kernel_of(spec).warmup(grid=(1,), **meta, **make_args(spec, "cuda"))
    except Exception as exc:  # keep going: the report names each failure
        return f"{spec['name']} {spec['constexprs']}: {type(exc).__name__}: {str(exc)[:300]}"
    return None


def run(launches: list[dict], jobs: int, dry_run: bool) -> list[str]:
    fn = check_one if dry_run else warm_one
    if jobs <= 1 or dry_run:
        return [e for e in map(fn, launches) if e]
    ctx = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        chunk = max(1, len(launches) // (4 * jobs))
        return [e for e in pool.map(fn, launches, chunksize=chunk) if e]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_warm", description=__doc__)
    p.add_argument("--launches", type=Path, default=LAUNCHES)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--limit", type=int, default=None, help="only the first N launches")
    p.add_argument("--dry-run", action="store_true", help="check the arguments; compile nothing")
    args = p.parse_args(argv)
    launches = json.loads(args.launches.read_text())[: args.limit]
    t0 = time.perf_counter()
    errors = run(launches, args.jobs, args.dry_run)
    for e in errors[:20]:
        print("  " + e)
    what = "checked" if args.dry_run else "warmed"
    print(f"triton_warm: {what} {len(launches) - len(errors)}/{len(launches)} launches "
          f"({len({s['name'] for s in launches})} kernels) in {time.perf_counter() - t0:.1f} s, "
          f"{len(errors)} failed")  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

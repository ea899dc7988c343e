"""Record the Triton launches a test run makes under the interpreter, for ahead-of-time builds.

A pytest plugin (``python -m pytest -p benchmarks.triton_record ...`` with
``PARQ_TRITON_RECORD=<file.json>``): every ``kernel[grid](...)`` that runs under
``TRITON_INTERPRET=1`` is turned into what the real JIT would compile on a GPU, by
Triton's own binder for the CUDA backend (``create_function_from_signature``): the
*signature* (argument types, e.g. ``*fp32``, ``i32``, ``fp32``), the *constexprs*
(meta-parameters and integers specialized to a constant, e.g. ``1``), the *attrs*
(``D``: a pointer or integer divisible by 16) and the ``num_warps`` / ``num_stages``
options. Distinct launches are written as JSON when the session ends;
:mod:`benchmarks.triton_aot` compiles each for a real GPU target.

The plan sizes of the GPU are recorded, not those of the interpreter: the planner
and the DiffQ / packing launchers give CPU tensors (the interpreter) larger tiles,
since each interpreted program costs milliseconds; this plugin sets those sizes to
the GPU's (``plan.INTERPRET_TILE = plan.TILE`` and the like) for the session.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

ENV = "PARQ_TRITON_RECORD"

_LAUNCHES: Counter[str] = Counter()
_BINDERS: dict = {}


def _jsonable(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} is not recordable")


def _binder(fn):
    """Triton's CUDA binder of a kernel's Python function (the GPU JIT's own specialization)."""
    hit = _BINDERS.get(fn)
    if hit is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        jf = JITFunction(fn)
        backend = make_backend(GPUTarget("cuda", 90, 32))
        hit = (jf, create_function_from_signature(jf.signature, jf.params, backend))
        _BINDERS[fn] = hit
    return hit


def launch_spec(fn, args: tuple, kwargs: dict) -> dict:
    """``{module, name, signature, constexprs, attrs, num_warps, num_stages}`` of one launch."""
    jf, binder = _binder(fn)
    bound, specialization, options = binder(*args, **kwargs)
    names = [p.name for p in jf.params]
    signature, constexprs, attrs = [], {}, {}  # signature: [name, type] in argument order
    for name, spec in zip(names, specialization, strict=True):
        signature.append([name, spec[0]])
        if spec[0] == "constexpr":
            constexprs[name] = _jsonable(bound[name])
        elif isinstance(spec[1], str) and spec[1]:
            attrs[name] = spec[1]
    return {
        "module": fn.__module__,
        "name": fn.__name__,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "num_warps": int(options.get("num_warps", 4)),
        "num_stages": int(options.get("num_stages", 3)),
    }


def _use_gpu_sizes() -> None:
    from parq_kernels.triton import diffq, pack, plan

    plan.INTERPRET_TILE = plan.TILE
    diffq.INTERPRET_BLOCK = diffq.BLOCK
    pack.INTERPRET_GROUPS = pack.GROUPS


def install() -> None:
    """Wrap the interpreter's launch so that each launch is recorded, then run."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    if getattr(original, "_parq_recording", False):
        return

    def run(self, *args, grid, warmup, **kwargs):
        _LAUNCHES[json.dumps(launch_spec(self.fn, args, kwargs), sort_keys=True)] += 1
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._parq_recording = True
    InterpretedFunction.run = run
    _use_gpu_sizes()


def recorded() -> list[dict]:
    """The distinct launches recorded so far, each with its ``count``."""
    return [dict(json.loads(key), count=n) for key, n in sorted(_LAUNCHES.items())]


def write(path: Path) -> int:
    rows = recorded()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    return len(rows)


def pytest_configure(config) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("benchmarks.triton_record records interpreter launches: "
                           "set TRITON_INTERPRET=1")  # fmt: skip
    install()


def pytest_unconfigure(config) -> None:
    target = os.environ.get(ENV)
    if target:
        n = write(Path(target))
        print(f"\ntriton_record: {n} distinct launches -> {target}")

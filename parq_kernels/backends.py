"""Which implementation of the fused op serves which device.

============  ======================================================  ===========
backend       serves                                                  provided by
============  ======================================================  ===========
triton        CUDA tensors; CPU tensors only under TRITON_INTERPRET=1  parq_kernels.triton
cuda          CUDA tensors                                            parq_kernels._C
cpu           CPU tensors                                             parq_kernels._C
reference     any device (pure PyTorch, always available)             reference.py
============  ======================================================  ===========

Automatic choice (``requested=None``) takes the first available backend of
:data:`PREFERENCE` for the device (the Triton interpreter is never chosen
automatically: it exists for testing) and quietly falls back, recording why each
faster one was skipped (:func:`availability`). An explicit choice, by argument or
by the ``PARQ_KERNELS_BACKEND`` environment variable, raises
:class:`BackendUnavailableError` carrying the original import or build error.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
PREFERENCE = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
COMPILED = ("cuda", "cpu")  # the extension's C++ kernels (parq_kernels._C)
ENV_VAR = "PARQ_KERNELS_BACKEND"
BUILD_HINT = "build it with: pip install --no-build-isolation -e ."


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot serve the tensors."""


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


OPS = ("quant_prox_", "fused_step_")
PACK_OPS = ("pack_", "unpack_", "dequantize_")  # packed export (parq_kernels.pack_ops)
DIFFQ_OPS = ("diffq_noise_", "diffq_noise_backward_", "diffq_quantize_")  # SPEC.md §11
ALL_OPS = OPS + PACK_OPS + DIFFQ_OPS


@functools.cache
def _load(name: str) -> tuple[dict[str, Callable] | None, str]:
    """Import a backend once: ``({op name: impl}, "")`` or ``(None, why_not)``."""
    if name == "reference":
        from parq_kernels import reference, reference_diffq, reference_pack, reference_step

        impls = {"quant_prox_": reference.quant_prox_, "fused_step_": reference_step.fused_step_}
        impls |= {op: getattr(reference_diffq, op) for op in DIFFQ_OPS}
        return impls | {op: getattr(reference_pack, op) for op in PACK_OPS}, ""
    if name == "triton":
        try:
            module = importlib.import_module("parq_kernels.triton")
        except Exception as exc:  # ImportError, or triton failing to initialize
            return None, f"triton import failed: {type(exc).__name__}: {exc}"
        return {op: getattr(module, op) for op in ALL_OPS if hasattr(module, op)}, ""
    try:
        ext = importlib.import_module("parq_kernels._C")
    except Exception as exc:
        return None, f"extension parq_kernels._C not built ({exc}); {BUILD_HINT}"
    if name == "cuda" and not getattr(ext, "HAS_CUDA", False):
        return None, "parq_kernels._C was built without CUDA kernels"
    return {op: _op_caller(name, op) for op in ALL_OPS if _has_kernel(op, name)}, ""


def _has_kernel(op: str, name: str) -> bool:
    """Does the extension register ``op`` for the ``name`` ("cpu" / "cuda") dispatch key?
    (The CUDA kernels of the packed-export ops are not written: the Triton ones serve.)"""
    if not hasattr(torch.ops.parq_kernels_C, op):
        return False
    has = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    return has is None or has(f"parq_kernels_C::{op}", name.upper())


def _op_caller(name: str, op: str) -> Callable:
    """Call the C++ op registered by the extension for the CPU or CUDA key."""
    fn = getattr(torch.ops.parq_kernels_C, op)

    def call(*args):
        fn(*args)

    call.__name__ = f"{op}{name}"
    return call


def _device_ok(name: str, device: torch.device) -> str:
    """Empty string if ``name`` can serve tensors on ``device``, else why not."""
    if name == "reference":
        return ""
    if name == "triton":
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpret()):
            return ""
        return f"triton serves CUDA tensors (CPU only with TRITON_INTERPRET=1), got {device.type}"
    if name != device.type:
        return f"the {name} backend serves {name} tensors, got {device.type}"
    return ""


def availability(device: torch.device | str = "cpu") -> dict[str, str]:
    """For each backend: ``""`` if it can serve ``device``, else the reason (a backend that
    cannot load says so first: "triton import failed ..." rather than which device it
    would serve)."""
    device = torch.device(device)
    return {name: _load(name)[1] or _device_ok(name, device) for name in BACKENDS}


def resolve(device: torch.device | str, requested: str | None = None, op: str | None = None) -> str:
    """The backend name that will serve tensors on ``device``; with ``op``, the automatic
    choice skips backends that do not implement it (an explicit one raises in
    :func:`get_impl`)."""
    device = torch.device(device)
    requested = requested or os.environ.get(ENV_VAR) or None
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown parq backend {requested!r}; choose from {BACKENDS}")
        why = _device_ok(requested, device) or _load(requested)[1]
        if why:
            raise BackendUnavailableError(
                f"parq backend {requested!r} requested but unavailable: {why}"
            )
        return requested
    for name in PREFERENCE.get(device.type, ("reference",)):
        ok = not (_device_ok(name, device) or _load(name)[1])
        if ok and (op is None or op in _load(name)[0]):
            return name
    return "reference"


def get_impl(name: str, op: str = "quant_prox_") -> Callable:
    """The Python callable of op ``op`` on backend ``name`` (raises if unavailable)."""
    impls, why = _load(name)
    if impls is None:
        raise BackendUnavailableError(f"parq backend {name!r} unavailable: {why}")
    if op not in impls:
        compiled = name in COMPILED
        hint = f" (an older build of the extension? {BUILD_HINT})" if compiled else ""
        if name == "cuda" and op in PACK_OPS + DIFFQ_OPS:
            hint = " (no CUDA kernels for the export and DiffQ ops: the triton backend serves them)"
        raise BackendUnavailableError(f"parq backend {name!r} does not implement {op}{hint}")
    return impls[op]


# --- CPU instruction-set levels (SPEC.md §14) -------------------------------------------
# The C++ CPU kernels are compiled once per level into the one extension; the level that
# serves is chosen when the extension loads, from the CPU that torch detects
# (``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``).

CPU_LEVELS = ("default", "avx2", "avx512")  # lowest first (on aarch64: "default" = NEON)


def _cpu_ext():
    impls, _ = _load("cpu")
    return importlib.import_module("parq_kernels._C") if impls is not None else None


def cpu_level() -> str | None:
    """The instruction-set level that serves the ``cpu`` backend now (``"default"``,
    ``"avx2"`` or ``"avx512"``), or None when the extension is not built."""
    ext = _cpu_ext()
    return ext.cpu_level() if ext is not None and hasattr(ext, "cpu_level") else None


def cpu_levels() -> tuple[str, ...]:
    """The levels this build has and this CPU can run, lowest first (empty if not built)."""
    ext = _cpu_ext()
    return tuple(ext.cpu_levels()) if ext is not None and hasattr(ext, "cpu_levels") else ()


@contextlib.contextmanager
def forced_cpu_level(level: str):
    """Run the ``cpu`` backend's kernels at ``level`` (one of :func:`cpu_levels`) inside
    the block, then return to the level chosen at load. For tests and benchmarks: torch's
    own kernels keep their level (set ``ATEN_CPU_CAPABILITY`` before starting Python to
    move both)."""
    ext = _cpu_ext()
    if ext is None or not hasattr(ext, "_force_cpu_level"):
        raise BackendUnavailableError(f"the cpu backend is not built; {BUILD_HINT}")
    if level not in ext.cpu_levels():
        raise ValueError(
            f"level must be one of this CPU's levels {tuple(ext.cpu_levels())}, got {level!r}"
        )
    before = ext.cpu_level()
    ext._force_cpu_level(level)
    try:
        yield
    finally:
        ext._force_cpu_level(before)


# --- host helpers ------------------------------------------------------------------------


@functools.cache
def step_counter() -> Callable[[list[torch.Tensor]], None]:
    """``count(steps)``: Adam's step tensors + 1, as ``torch._foreach_add_(steps, 1)``
    (torch's fused Adam does that first): the extension's ``count_steps_`` writes a CPU
    float32 scalar in place (~0.2 us a tensor against ~2.3 us through the dispatcher,
    csrc/host_steps.h) and bumps its version; torch's call where the extension is not built."""
    ext = _cpu_ext()
    if ext is not None and hasattr(ext, "count_steps_"):
        return ext.count_steps_
    return lambda steps: torch._foreach_add_(steps, 1)


def _kept_grads(params: list[torch.Tensor], ptrs: list[int], dtype: torch.dtype):
    """:func:`grads_checker`'s Python form (no extension): the same checks."""
    grads = [p.grad for p in params]
    ok = (
        len(params) == len(ptrs)
        and all(g is not None and g.layout == torch.strided and g.is_contiguous() for g in grads)
        and [p.data_ptr() for p in params] == ptrs
        and all(p.dtype is dtype for p in params)
    )
    return grads if ok else None


@functools.cache
def grads_checker() -> Callable:
    """``check(params, ptrs, dtype)``: the parameters' gradients (``p.grad``, a list) if each
    is a dense contiguous tensor, its parameter still has ``data_ptr() == ptrs[i]`` and
    ``dtype``, else None. The kept call's per-step test (parq.optim.fused_call.ready): the
    extension's ``kept_grads`` (one C++ pass, csrc/host_steps.h), or the same in Python."""
    ext = _cpu_ext()
    if ext is not None and hasattr(ext, "kept_grads"):
        return ext.kept_grads
    return _kept_grads


def kept_step_impl(name: str) -> Callable:
    """``fused_step_`` of backend ``name`` for calls whose arguments a checked call has
    already taken (the kept call, parq.optim.fused_call): for the C++ kernels, the
    extension's ``fused_step_call``, the op through the C++ dispatcher without torch.ops'
    Python argument parsing (~9 against ~20 us for 8 small parameters with momentum,
    csrc/host_steps.h); :func:`get_impl`'s callable otherwise (which raises if unavailable)."""
    impl = get_impl(name, "fused_step_")
    ext = _cpu_ext() if name in COMPILED else None
    return ext.fused_step_call if ext is not None and hasattr(ext, "fused_step_call") else impl

"""What the benchmarks run on: versions, device, threads, backends, the CPU and its
instruction-set levels (:mod:`benchmarks.cpu_info`), copy bandwidth.

The copy bandwidth is the yardstick every GB/s figure is compared with: the
median rate of ``dst.copy_(src)`` on one large float32 tensor, counting the
bytes read plus the bytes written (``2 * nbytes`` per copy).
"""

from __future__ import annotations

import os
import platform
import sys

import torch

from benchmarks import cpu_info
from benchmarks.timing import Timing, measure
from parq_kernels import backends

INTERPRETER_REASON = (
    "Triton interpreter (TRITON_INTERPRET=1) serves CPU tensors for testing only; "
    "far too slow to benchmark"
)


def device_name(device: torch.device) -> str:
    """A human-readable name of the device (GPU model or CPU model)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name


def device_slug(device: torch.device) -> str:
    """A file-name-safe short name: ``cpu-<model>`` or ``cuda-<model>``."""
    raw = f"{device.type}-{device_name(device)}".lower()
    keep = "".join(c if c.isalnum() else "-" for c in raw)
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-")[:48]


def benchmark_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """``(available, why_not)``: backends worth timing on ``device``, and the
    reason each other backend is left out (``availability`` plus the interpreter)."""
    why_not = {}
    available = []
    for name, why in backends.availability(device).items():
        if not why and name == "triton" and device.type == "cpu":
            why = INTERPRETER_REASON
        if why:
            why_not[name] = why
        else:
            available.append(name)
    return available, why_not


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # not installed, or fails to initialize
        return f"unavailable ({type(exc).__name__})"


def environment(device: torch.device) -> dict:
    """Versions, device, backend availability and the CPU record (``cpu``: model, flags,
    torch's and parq's levels, :func:`benchmarks.cpu_info.cpu_record`), JSON-ready."""
    available, why_not = benchmark_backends(device)
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "backends_available": available,
        "backends_missing": why_not,
        "cpu": cpu_info.cpu_record(),
    }


def copy_bandwidth(
    device: torch.device, nbytes: int, repeats: int = 10, warmup: int = 2
) -> tuple[float, Timing]:
    """``(GB/s, timing)`` of copying ``nbytes`` of float32 on ``device`` (read + write)."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device=device, repeats=repeats, warmup=warmup)
    return 2 * n * 4 / timing.median / 1e9, timing

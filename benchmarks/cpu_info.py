"""Which CPU a run measured, and at which instruction-set level (SPEC.md §14).

The record (:func:`cpu_record`) names the CPU model, the instruction-set flags that
decide which kernels can run (x86-64: SSE4.2 up to AVX-512 and AMX; aarch64: ASIMD and
SVE), the level torch's own CPU kernels run at (``torch.backends.cpu.get_cpu_capability()``,
which honours ``ATEN_CPU_CAPABILITY``, read once at process start), the value of that
variable if set, the level that serves parq's ``cpu`` backend
(``parq_kernels.backends.cpu_level()``) and the levels the build has for this CPU
(``backends.cpu_levels()``). A build without per-level kernels reports None and ``()``
there (printed as ``n/a``).

:func:`supported_levels` is the list ``python -m benchmarks --levels`` runs: parq's own
list when the extension has one, else the levels this CPU can run, from its flags
(``default`` always; ``avx2`` with AVX2 + FMA; ``avx512`` with AVX-512 F, BW, VL and DQ,
torch's requirement), no higher than torch's capability unless ``ATEN_CPU_CAPABILITY``
lowered that. Torch trusts the variable (``avx512`` on a CPU without AVX-512 reports
``AVX512`` and then faults), so a level is only run where the flags allow it.
"""

from __future__ import annotations

import os
import platform

import torch

from parq_kernels import backends

ENV_VAR = "ATEN_CPU_CAPABILITY"
LEVELS = ("default", "avx2", "avx512")  # lowest first, as ATEN_CPU_CAPABILITY spells them
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512dq", "avx512_bf16", "amx_tile")  # fmt: skip
ARM_FLAGS = ("asimd", "sve", "sve2")
LEVEL_NEEDS = {"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")}
NOT_AVAILABLE = "n/a"


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} where absent)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, value = line.partition(":")
                out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


def cpu_model(info: dict[str, str] | None = None) -> str:
    info = _cpuinfo() if info is None else info
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine()


def cpu_flags(info: dict[str, str] | None = None) -> list[str]:
    """The flags of :data:`X86_FLAGS` / :data:`ARM_FLAGS` this CPU has, in that order."""
    info = _cpuinfo() if info is None else info
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in (*X86_FLAGS, *ARM_FLAGS) if f in have]


def torch_capability() -> str:
    """torch's CPU kernel level (``DEFAULT``, ``AVX2``, ``AVX512``, ``SVE256``, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception as exc:  # an old torch without the query
        return f"unknown ({type(exc).__name__})"


def cpu_record() -> dict:
    """The CPU and its levels, JSON-ready (module doc)."""
    info = _cpuinfo()
    return {
        "model": cpu_model(info),
        "machine": platform.machine(),
        "flags": cpu_flags(info),
        "torch_capability": torch_capability(),
        "aten_cpu_capability_env": os.environ.get(ENV_VAR),
        "parq_level": backends.cpu_level(),
        "parq_levels": list(backends.cpu_levels()),
    }


def levels_from_flags(flags: list[str], torch_cap: str, env: str | None) -> list[str]:
    """The levels of :data:`LEVELS` that ``flags`` allow; capped at ``torch_cap`` unless
    ``env`` (the variable's value) set that (a lowered torch says little of the CPU)."""
    levels = ["default"] + [lvl for lvl, need in LEVEL_NEEDS.items() if set(need) <= set(flags)]
    cap = torch_cap.lower()
    if env is None and cap in LEVELS:
        levels = [lvl for lvl in levels if LEVELS.index(lvl) <= LEVELS.index(cap)]
    return levels


def supported_levels(record: dict | None = None) -> list[str]:
    """The levels ``--levels`` can run on this machine, lowest first (module doc)."""
    record = cpu_record() if record is None else record
    if record["parq_levels"]:
        return list(record["parq_levels"])
    return levels_from_flags(
        record["flags"], record["torch_capability"], record["aten_cpu_capability_env"]
    )


def level_text(record: dict) -> str:
    """One line: torch's capability (and the variable), parq's level and levels."""
    env = record.get("aten_cpu_capability_env")
    forced = f" ({ENV_VAR}={env})" if env is not None else ""
    levels = ", ".join(record.get("parq_levels") or []) or NOT_AVAILABLE
    return (f"torch capability {record.get('torch_capability')}{forced}, parq cpu level "
            f"{record.get('parq_level') or NOT_AVAILABLE} (levels built: {levels})")  # fmt: skip


def describe(record: dict) -> str:
    """Two lines for a run's header: the CPU with its flags, then :func:`level_text`."""
    flags = " ".join(record.get("flags") or []) or "none of interest"
    return f"cpu: {record.get('model')} [{flags}]\ncpu level: {level_text(record)}"


__all__ = [
    "ENV_VAR",
    "LEVELS",
    "cpu_record",
    "cpu_flags",
    "cpu_model",
    "describe",
    "level_text",
    "levels_from_flags",
    "supported_levels",
    "torch_capability",
]

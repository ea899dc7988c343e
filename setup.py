"""Builds the native extension ``parq_kernels._C`` from ``csrc/``.

* Always the C++ CPU kernels (``csrc/cpu/*.cpp`` + ``csrc/ops.cpp``), with -O3 and OpenMP.
* The CUDA kernels (``csrc/cuda/*.cu``) too when nvcc (``CUDA_HOME``) and a CUDA
  build of torch (``torch.version.cuda``) are both present; no GPU is needed to build.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed).
Environment knobs:

* ``PARQ_SKIP_NATIVE=1``  build nothing native (pure-Python install; the
  ``reference`` and ``triton`` backends still work)
* ``PARQ_FORCE_CUDA=1``   build the CUDA kernels or fail (no silent CPU-only build)
* ``PARQ_NO_CUDA=1``      never build the CUDA kernels
* ``PARQ_DEBUG=1``        -O0 -g, no -DNDEBUG
* ``PARQ_PORTABLE=1``     no AVX2 code even when the building x86-64 CPU has it (set this
  when the built extension will run on other, older machines)
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cpu_arch_flags() -> list[str]:
    """-march=x86-64-v4 (AVX-512, 512-bit vectors) or x86-64-v3 (AVX2) when the building CPU
    has it: the extension is built from source where it runs (PARQ_PORTABLE=1: neither).
    Results are bitwise the same (no FMA contraction, no reassociation)."""
    if _flag("PARQ_PORTABLE") or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return []
    v3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
    if v4 <= flags:
        return ["-march=x86-64-v4", "-mprefer-vector-width=512"]
    return ["-march=x86-64-v3"] if v3 <= flags else []


def native_extensions() -> tuple[list, dict]:
    if _flag("PARQ_SKIP_NATIVE"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    debug = _flag("PARQ_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # value-safe flags only: no FMA contraction (bitwise agreement with the reference);
    # no trapping math / errno so that -O3 can if-convert and vectorize the loops
    cxx = [
        *opt,
        "-std=c++20",
        "-fopenmp",
        "-ffp-contract=off",
        "-fno-trapping-math",
        "-fno-math-errno",
        *_cpu_arch_flags(),
    ]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = bool(cuda_sources) and not _flag("PARQ_NO_CUDA")
    have_cuda = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if _flag("PARQ_FORCE_CUDA") and not have_cuda:
        raise RuntimeError(
            "PARQ_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"CUDA_HOME={cpp_extension.CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}"
        )
    if want_cuda and have_cuda:
        ext = cpp_extension.CUDAExtension(
            "parq_kernels._C",
            sources + cuda_sources,
            define_macros=[("PARQ_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": [*opt, "-std=c++20", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "parq_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages(include=["parq", "parq.*", "parq_kernels", "parq_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

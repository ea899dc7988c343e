"""Builds the native extension ``parq_kernels._C`` from ``csrc/``.

* Always the C++ CPU kernels: ``csrc/cpu/*.cpp`` compiled once per instruction-set level
  (:data:`CPU_LEVELS`: x86-64 baseline, AVX2 + FMA, AVX-512; the baseline alone elsewhere,
  which is NEON on aarch64), each into its own namespace, and ``csrc/*.cpp`` (the ops, the
  argument checks, the run-time choice of level) once with baseline flags; -O3, OpenMP.
  Nothing is taken from the building CPU: the build runs on every CPU torch runs on,
  each at its best level (SPEC.md §14).
* The CUDA kernels (``csrc/cuda/*.cu``) too when nvcc (``CUDA_HOME``) and a CUDA
  build of torch (``torch.version.cuda``) are both present; no GPU is needed to build.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed).
Environment knobs:

* ``PARQ_SKIP_NATIVE=1``  build nothing native (pure-Python install; the
  ``reference`` and ``triton`` backends still work)
* ``PARQ_FORCE_CUDA=1``   build the CUDA kernels or fail (no silent CPU-only build)
* ``PARQ_NO_CUDA=1``      never build the CUDA kernels
* ``PARQ_DEBUG=1``        -O0 -g, no -DNDEBUG
* ``PARQ_CPU_LEVELS=default,avx2``  build only these levels (default: all of the
  machine architecture's; ``default`` is always built)

Needs torch >= 2.4 (ATen's ``at::vec`` conversions used by csrc/cpu/simd.h).
"""

from __future__ import annotations

import glob
import os
import platform

from setuptools import find_packages, setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


# -m flags and defines of each level (ATen's own for its per-capability kernels; BMI2 at
# AVX-512 only: AVX2 CPUs before Zen 3 run pdep / pext in microcode). The order is the link
# order, lowest first: a std / c10 inline function that several levels' objects define is
# kept by the linker from the first, so it never needs more than the lowest level using it.
CPU_LEVELS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mf16c",
        "-mbmi2",
        "-mprefer-vector-width=512",
        "-Wno-maybe-uninitialized",  # GCC 12's own AVX-512 headers (_mm512_undefined_ps)
    ],
}


def cpu_levels() -> list[str]:
    """The levels to build: all three on x86-64, ``default`` elsewhere (PARQ_CPU_LEVELS
    narrows them; ``default`` is always built)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    levels = list(CPU_LEVELS) if x86 else ["default"]
    wanted = os.environ.get("PARQ_CPU_LEVELS")
    if wanted:
        names = {w.strip() for w in wanted.split(",") if w.strip()}
        unknown = names - set(CPU_LEVELS)
        if unknown:
            raise ValueError(
                f"PARQ_CPU_LEVELS: unknown levels {sorted(unknown)}; choose from {list(CPU_LEVELS)}"
            )
        levels = [lv for lv in levels if lv in names or lv == "default"]
    return levels


def level_args(level: str) -> list[str]:
    cap = level.upper()
    return [f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}", *CPU_LEVELS[level]]


def build_ext_class(base: type, level_sources: list[str], levels: list[str]) -> type:
    """``base`` (torch's BuildExtension) that also compiles ``level_sources`` once per level,
    each level into its own folder with its own flags, and links those objects after the
    baseline ones, lowest level first."""

    class BuildPerLevel(base):
        def build_extension(self, ext):
            cxx = ext.extra_compile_args
            cxx = list(cxx["cxx"] if isinstance(cxx, dict) else cxx)
            nvcc = (
                ext.extra_compile_args.get("nvcc", [])
                if isinstance(ext.extra_compile_args, dict)
                else []
            )
            objects = []
            for level in levels:
                post = {"cxx": cxx + level_args(level), "nvcc": nvcc}
                objects += self.compiler.compile(
                    level_sources,
                    output_dir=os.path.join(self.build_temp, f"level_{level}"),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=post,
                    depends=ext.depends,
                )
            ext.extra_objects = [*objects, *(ext.extra_objects or [])]
            super().build_extension(ext)

    return BuildPerLevel


def native_extensions() -> tuple[list, dict]:
    if _flag("PARQ_SKIP_NATIVE"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cpp"))  # baseline flags: ops, checks, dispatch
    level_sources = sorted(glob.glob("csrc/cpu/*.cpp"))  # once per level
    if not sources:
        return [], {}
    levels = cpu_levels()
    # a change to any of these relinks the extension (setuptools compares them with the .so)
    depends = sorted(level_sources + glob.glob("csrc/**/*.h", recursive=True))
    try:
        import torch
        from torch.utils import cpp_extension
    except ModuleNotFoundError as exc:  # pip's isolated build environment has no torch
        raise SystemExit(
            f"parq: building the C++ extension needs torch, and this build cannot import it "
            f"({exc}). pip builds in an isolated environment without torch even when it is "
            "installed. Install torch first (pin it: an unpinned `torch` may pull a multi-GB "
            "CUDA build), then build without isolation:\n"
            "    pip install torch==2.13.0\n"
            "    pip install --no-build-isolation .\n"
            "or, for a pure-Python install (reference and triton backends only), the same with\n"
            "    PARQ_SKIP_NATIVE=1 pip install --no-build-isolation ."
        ) from None

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
        "-Wno-unknown-pragmas",  # ATen's vec headers carry nvcc's `#pragma unroll`
    ]
    macros = [(f"PARQ_LEVEL_{lv.upper()}", "1") for lv in levels if lv != "default"]
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
            define_macros=[("PARQ_WITH_CUDA", "1"), *macros],
            depends=depends,
            extra_compile_args={"cxx": cxx, "nvcc": [*opt, "-std=c++20", "--fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "parq_kernels._C",
            sources,
            define_macros=macros,
            depends=depends,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext_class(base, level_sources, levels)}


ext_modules, cmdclass = native_extensions()

setup(
    packages=find_packages(include=["parq", "parq.*", "parq_kernels", "parq_kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

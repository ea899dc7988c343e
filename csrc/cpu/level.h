// The instruction-set level of this translation unit (SPEC.md §14).
//
// Every file under csrc/cpu/ is compiled once per level (setup.py: `default`, `avx2`,
// `avx512` on x86-64; `default` on other machines, NEON on aarch64), with that level's
// -m flags and CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512, as ATen compiles its
// native/cpu kernels. All the project's code here lives in the inline namespace
// parq::CPU_CAPABILITY (ATen's at::vec does the same), so that no inline function or
// template of ours is shared between levels: a linker that keeps one copy of a shared
// inline function could otherwise run AVX-512 code on an AVX2 CPU. What stays shared
// are the always_inline helpers of csrc/levels.h and csrc/base_update.h (inlined into
// each level's code, never called out of line) and std / c10 templates; setup.py links
// the level objects lowest level first, so a copy that the linker keeps of one of those
// is compiled for the lowest level that uses it.
//
// csrc/cpu_dispatch.cpp (compiled once, baseline flags) picks the level at run time.
#pragma once

#ifndef CPU_CAPABILITY
#error "csrc/cpu/ is compiled once per level: setup.py defines CPU_CAPABILITY"
#endif

#define PARQ_CPU_BEGIN \
  namespace parq {     \
  inline namespace CPU_CAPABILITY {
#define PARQ_CPU_END \
  }                  \
  }

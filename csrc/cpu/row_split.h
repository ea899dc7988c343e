// One parallel region per op call over the rows of all its parameters (issue: real models
// are many small tensors). The rows of the call's parameters are laid end to end in one
// element space; at::parallel_for cuts that space into equal ranges, one per thread, and
// a thread works the rows that start in its range. So a call of many short-row tensors
// (ResNet's 16 x 144 convs, biases, norms) keeps every thread busy with about the same
// number of elements, where a parallel region per tensor ran each small tensor on one
// thread while the others waited, and paid a region's start-up per tensor.
//
// Rows are never cut: a row is a quantization group whose statistics one task computes.
// Parameters of few long rows (per-tensor groups) are not in the shared space: each runs
// its passes as a parallel region over its own chunks (quant_prox_cpu.cpp), one after the
// other. The split changes which thread works a row, never the bits (every row's work is
// the same whichever thread does it).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "level.h"
#include "row_stats.h"
#include "simd.h"

PARQ_CPU_BEGIN

// A parameter's rows as the op sees them.
struct ParamShape {
  int64_t rows;
  int64_t cols;
};

// Few long rows: worked by a parallel region over each row's chunks, not in the split.
inline bool long_rows(const ParamShape& s) {
  return s.cols >= 4 * kChunk && s.rows < 2 * at::get_num_threads();
}

// The smallest range of elements a thread takes (a region's start-up is a few microseconds:
// below this, one thread works the whole call).
constexpr int64_t kSplitGrain = 8 * kChunk;

// rows_fn(i, r0, r1) works rows [r0, r1) of parameter i and returns whether it saw a
// non-finite value; long_fn(i) works a long-row parameter whole. flags[i] = 1 where
// parameter i saw one. Threads fence their streaming stores at the end of their range.
template <typename RowsFn, typename LongFn>
void run_split(const std::vector<ParamShape>& shapes, int32_t* flags, const RowsFn& rows_fn,
               const LongFn& long_fn) {
  const size_t n = shapes.size();
  std::vector<int64_t> start(n + 1, 0);  // element offset of each parameter in the split
  std::vector<size_t> split;             // the parameters in the split, in order
  split.reserve(n);
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) {
    const ParamShape& s = shapes[i];
    if (s.rows == 0) continue;
    if (s.cols == 0) {  // empty rows still get their levels (SPEC §6): no elements to split
      if (rows_fn(i, 0, s.rows)) flags[i] = 1;
      continue;
    }
    if (long_rows(s)) {
      if (long_fn(i)) flags[i] = 1;
      continue;
    }
    start[split.size()] = total;
    split.push_back(i);
    total += s.rows * s.cols;
  }
  if (split.empty()) return;
  start[split.size()] = total;
  std::unique_ptr<std::atomic<bool>[]> bad(new std::atomic<bool>[split.size()]);
  for (size_t k = 0; k < split.size(); ++k) bad[k].store(false, std::memory_order_relaxed);
  at::parallel_for(0, total, kSplitGrain, [&](int64_t b, int64_t e) {
    // the first parameter with a row starting at or after b
    size_t k = std::upper_bound(start.begin(), start.begin() + split.size(), b) - start.begin();
    k = k > 0 ? k - 1 : 0;
    for (; k < split.size() && start[k] < e; ++k) {
      const ParamShape& s = shapes[split[k]];
      const int64_t first = start[k], cols = s.cols;
      // rows r with b <= first + r * cols < e
      const int64_t r0 = b <= first ? 0 : (b - first + cols - 1) / cols;
      const int64_t r1 = std::min(s.rows, (e - first + cols - 1) / cols);
      if (r0 < r1 && rows_fn(split[k], r0, r1)) bad[k].store(true, std::memory_order_relaxed);
    }
    stream_fence();
  });
  for (size_t k = 0; k < split.size(); ++k) {
    if (bad[k].load(std::memory_order_relaxed)) flags[split[k]] = 1;
  }
}

PARQ_CPU_END

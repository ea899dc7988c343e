// Chunk-level loops of the CPU kernels: the statistics passes (the write pass: write_pass.h).
//
// A chunk (<= kChunk elements) is first converted to float32 in a stack buffer
// (x = value / gamma, the value coming from a source: sources.h), then simple
// loops over that buffer do the work, so that -O3 can vectorize them. Reductions keep
// kLanes float partials per chunk and add them into a double at the end of the chunk.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../levels.h"
#include "../quant_prox.h"
#include "level.h"
#include "simd.h"

PARQ_CPU_BEGIN

constexpr int64_t kChunk = 4096;
// Float partials per reduction: 64 (four AVX-512 vectors, eight AVX2 ones), so that a
// sum's chain of dependent adds is short (one 16-lane accumulator made the statistics of
// an L1-resident row wait on add latency); lane_reduce folds them to 16 before the
// double sum. Partial l sums the elements i = l (mod 64) on every level, so the sums are
// the same bits on every level.
constexpr int kLanes = 64;
static_assert(kLanes % kW == 0 && kLanes % 16 == 0, "whole vectors of lanes; folds by 16");

// A chunk's (or a row's) statistics; add() combines them in a fixed order.
struct Partial {
  double sum = 0.0;
  float amax = 0.0f;
  float mn = INFINITY;
  float mx = -INFINITY;
  bool bad = false;
  double sum_pos = 0.0;  // threshold ternary: sum of the x >= D, of the -x with x <= -D,
  double sum_neg = 0.0;  // and their counts
  int64_t n_pos = 0;
  int64_t n_neg = 0;

  void add(const Partial& o) {
    sum += o.sum;
    sum_pos += o.sum_pos;
    sum_neg += o.sum_neg;
    n_pos += o.n_pos;
    n_neg += o.n_neg;
    amax = std::max(amax, o.amax);
    mn = std::min(mn, o.mn);
    mx = std::max(mx, o.mx);
    bad = bad || o.bad;
  }
};

enum class Stat {
  kSum,          // sum x (center mean)
  kAbsSumMax,    // sum |x|, max |x| (uniform)
  kAbsMax,       // max |x| (ternary uniform)
  kMinMax,       // min x, max x (asym)
  kAbsSum,       // sum |x| (LSBQ ternary)
  kAbsResidual,  // sum |r_nv|, r replayed through nv greedy steps (LSBQ greedy)
  kGather,       // |x| written out (optimal LSBQ)
  kSides,        // sums and counts of x >= D and of -x with x <= -D (threshold ternary)
};

// xs = the chunk's values / gamma, converted in registers (a latent re-read from L2 / L3 on
// update steps, with software prefetch: the library's memcpy, rep movsq, took twice as
// long there).
template <typename T>
inline void load_chunk(const T* p, int64_t n, float gamma, float* xs) {
  constexpr int64_t E = Pack<T>::kElems;
  const Vec g(gamma);
  const bool shrink = gamma != 1.0f;
  int64_t i = 0;
  for (; i + E <= n; i += E) {
    prefetch(p + i + kPrefetch);
    const Pack<T> x = Pack<T>::load(p + i);
    for (int j = 0; j < Pack<T>::N; ++j) (shrink ? x.v[j] / g : x.v[j]).store(xs + i + j * kW);
  }
  for (; i < n; ++i) xs[i] = shrink ? static_cast<float>(p[i]) / gamma : static_cast<float>(p[i]);
}

// True iff every x is finite (x * 0 is NaN exactly for NaN and Inf).
inline bool all_finite(const float* xs, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += xs[i + l] * 0.0f;
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += xs[i] * 0.0f;
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total == 0.0f;
}

// Sum (in kLanes float partials, then double) and max of y = x or |x| (kAbs) over the
// chunk: kLanes / kW vector accumulators, lane l = kW k + j of accumulator k, the scalar
// form's partial l; the max is vmax (a > b ? a : b, b when unordered: the scalar select).
template <bool kSum, bool kMax, bool kAbs>
inline void lane_reduce(const float* xs, int64_t n, Partial& out) {
  const auto f = [](float x) { return kAbs ? std::fabs(x) : x; };
  constexpr int kAcc = static_cast<int>(kLanes / kW);
  alignas(64) float acc[kLanes] = {};
  alignas(64) float mx[kLanes] = {};
  int64_t i = 0;
  Vec vacc[kAcc], vmx[kAcc];
  for (int k = 0; k < kAcc; ++k) vacc[k] = vmx[k] = Vec(0.0f);
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kAcc; ++k) {
      Vec y = Vec::loadu(xs + i + kW * k);
      if (kAbs) y = y.abs();
      if (kSum) vacc[k] = vacc[k] + y;
      if (kMax) vmx[k] = vmax(vmx[k], y);
    }
  }
  for (int k = 0; k < kAcc; ++k) {
    vacc[k].store(acc + kW * k);
    vmx[k].store(mx + kW * k);
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float y = f(xs[i]);
    if (kSum) acc[l] += y;
    if (kMax) mx[l] = mx[l] > y ? mx[l] : y;
  }
  // the 64 partials fold to 16 in float, then add up in double (a 64-long chain of
  // double adds cost more than the loop itself on a 1024-element row)
  const auto mxf = [](float a, float b) { return a > b ? a : b; };
  double s = 0.0;
  float m = 0.0f;
  for (int l = 0; l < 16; ++l) {
    const float a = (acc[l] + acc[l + 16]) + (acc[l + 32] + acc[l + 48]);
    const float b = mxf(mxf(mx[l], mx[l + 16]), mxf(mx[l + 32], mx[l + 48]));
    s += a;
    m = m > b ? m : b;
  }
  out.sum = s;
  out.amax = m;
}

// Threshold ternary's second pass over a chunk: the sum and count of the x >= d, and of
// the -x with x <= -d (SPEC.md §9), in kLanes float / int partials, the sums then in double.
inline void side_reduce(const float* xs, int64_t n, float d, Partial& out) {
  float sp[kLanes] = {}, sn[kLanes] = {};
  int32_t cp[kLanes] = {}, cn[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float x = xs[i + l];
      const bool p = x >= d, q = x <= -d;
      sp[l] += p ? x : 0.0f;
      cp[l] += p ? 1 : 0;
      sn[l] += q ? -x : 0.0f;
      cn[l] += q ? 1 : 0;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float x = xs[i];
    const bool p = x >= d, q = x <= -d;
    sp[l] += p ? x : 0.0f;
    cp[l] += p ? 1 : 0;
    sn[l] += q ? -x : 0.0f;
    cn[l] += q ? 1 : 0;
  }
  for (int l = 0; l < kLanes; ++l) {
    out.sum_pos += sp[l];
    out.sum_neg += sn[l];
    out.n_pos += cp[l];
    out.n_neg += cn[l];
  }
}

// One statistics pass over the chunk [o, o + n) of x - m, x from the source
// (the first pass over a chunk also does the source's first-pass work: latent
// copy or base update, and the finiteness check).
template <typename Src>
Partial stats_chunk(const Src& src, int64_t o, int64_t n, bool first, float m, Stat st,
                    const float* v, int nv, float* gather) {
  float xs[kChunk];
  Partial out;
  const bool center = st != Stat::kSum && m != 0.0f;  // (x - 0 would be x: skip the sweep)
  const bool changes = center || (st == Stat::kAbsResidual && nv > 0);
  const float* in = xs;  // what the statistic reads
  if constexpr (Src::kView) {  // float32 values in memory already: read them where they are
    if (!changes) in = src.view(o);
  }
  if (in == xs) out.bad = src.load(o, n, xs, first);
  if (center) {
    for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] - m;
  }
  switch (st) {
    case Stat::kSum:
      lane_reduce<true, false, false>(in, n, out);
      break;
    case Stat::kAbsSumMax:
      lane_reduce<true, true, true>(in, n, out);
      break;
    case Stat::kAbsMax:
      lane_reduce<false, true, true>(in, n, out);
      break;
    case Stat::kAbsSum:
      lane_reduce<true, false, true>(in, n, out);
      break;
    case Stat::kMinMax:
      for (int64_t i = 0; i < n; ++i) {
        out.mn = std::min(out.mn, in[i]);
        out.mx = std::max(out.mx, in[i]);
      }
      break;
    case Stat::kAbsResidual:  // replay the first nv greedy steps in place, bit-major
      for (int j = 0; j < nv; ++j) {  // (nv > 0: in is xs)
        const float vj = v[j];
        for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] - (xs[i] >= 0.0f ? vj : -vj);
      }
      lane_reduce<true, false, true>(in, n, out);
      break;
    case Stat::kSides:  // v[0] = D
      side_reduce(in, n, v[0], out);
      break;
    case Stat::kGather:
      for (int64_t i = 0; i < n; ++i) {
        const float a = std::fabs(in[i]);
        gather[i] = a <= 3.4028234663852886e38f ? a : INFINITY;  // NaN sorts as +inf
      }
      break;
  }
  return out;
}

// Exact two-cluster split of sorted magnitudes a[0..n) (SPEC.md §3, optimal LSBQ):
// float64 prefix sums; the smallest k minimizing the squared error.
inline void optimal_split(const float* a, int64_t n, bool ternary, double* lo_out, double* hi_out) {
  double Sn = 0.0, T = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = a[i];
    Sn += v;
    T += v * v;
  }
  const double dn = static_cast<double>(n);
  double best = 0.0, best_lo = 0.0, best_hi = 0.0, S = 0.0;
  for (int64_t k = 0; k <= n; ++k) {
    if (k > 0) S += a[k - 1];
    const double dk = static_cast<double>(k);
    const double lo = k > 0 ? S / dk : 0.0;
    const double hi = k < n ? (Sn - S) / (dn - dk) : 0.0;
    const double E = ternary ? T - (dn - dk) * hi * hi : T - dk * lo * lo - (dn - dk) * hi * hi;
    if (k == 0 || E < best) {
      best = E;
      best_lo = ternary ? 0.0 : lo;
      best_hi = hi;
    }
  }
  *lo_out = best_lo;
  *hi_out = best_hi;
}

PARQ_CPU_END

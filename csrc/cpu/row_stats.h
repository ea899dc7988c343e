// Chunk-level loops of the CPU kernels: statistics passes and the write pass.
//
// A chunk (<= kChunk elements) is first converted to float32 in a stack buffer
// (x = p / gamma), then simple loops over that buffer do the work, so that -O3
// can vectorize them. Reductions keep kLanes float partials per chunk and add
// them into a double at the end of the chunk.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../levels.h"
#include "../quant_prox.h"

namespace parq {

constexpr int64_t kChunk = 4096;
constexpr int kLanes = 16;

// A chunk's (or a row's) statistics; add() combines them in a fixed order.
struct Partial {
  double sum = 0.0;
  float amax = 0.0f;
  float mn = INFINITY;
  float mx = -INFINITY;
  bool bad = false;

  void add(const Partial& o) {
    sum += o.sum;
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
};

template <typename T>
inline void load_chunk(const T* p, int64_t n, float gamma, float* xs) {
  if (gamma != 1.0f) {
    for (int64_t i = 0; i < n; ++i) xs[i] = static_cast<float>(p[i]) / gamma;
  } else {
    for (int64_t i = 0; i < n; ++i) xs[i] = static_cast<float>(p[i]);
  }
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

// Sum (in kLanes float partials, then double) and max of f(x) over the chunk.
template <bool kSum, bool kMax, typename F>
inline void lane_reduce(const float* xs, int64_t n, F f, Partial& out) {
  float acc[kLanes] = {};
  float mx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float y = f(xs[i + l]);
      if (kSum) acc[l] += y;
      if (kMax) mx[l] = mx[l] > y ? mx[l] : y;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const float y = f(xs[i]);
    if (kSum) acc[l] += y;
    if (kMax) mx[l] = mx[l] > y ? mx[l] : y;
  }
  double s = 0.0;
  float m = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    s += acc[l];
    m = m > mx[l] ? m : mx[l];
  }
  out.sum = s;
  out.amax = m;
}

// One statistics pass over a chunk of x - m. With lat (the first pass), also
// copies the latent and checks finiteness.
template <typename T>
Partial stats_chunk(const T* p, T* lat, int64_t n, float gamma, float m, Stat st, const float* v,
                    int nv, float* gather) {
  float xs[kChunk];
  load_chunk(p, n, gamma, xs);
  Partial out;
  if (lat != nullptr) {
    std::memcpy(lat, p, static_cast<size_t>(n) * sizeof(T));
    out.bad = !all_finite(xs, n);
  }
  if (st != Stat::kSum) {
    for (int64_t i = 0; i < n; ++i) xs[i] = xs[i] - m;
  }
  const auto abs_f = [](float x) { return std::fabs(x); };
  switch (st) {
    case Stat::kSum:
      lane_reduce<true, false>(xs, n, [](float x) { return x; }, out);
      break;
    case Stat::kAbsSumMax:
      lane_reduce<true, true>(xs, n, abs_f, out);
      break;
    case Stat::kAbsMax:
      lane_reduce<false, true>(xs, n, abs_f, out);
      break;
    case Stat::kAbsSum:
      lane_reduce<true, false>(xs, n, abs_f, out);
      break;
    case Stat::kMinMax:
      for (int64_t i = 0; i < n; ++i) {
        out.mn = std::min(out.mn, xs[i]);
        out.mx = std::max(out.mx, xs[i]);
      }
      break;
    case Stat::kAbsResidual: {
      float vs[kMaxGreedyBits];
      for (int j = 0; j < nv; ++j) vs[j] = v[j];
      lane_reduce<true, false>(
          xs, n,
          [&](float x) {
            float r = x;
            for (int j = 0; j < nv; ++j) r = r - (r >= 0.0f ? vs[j] : -vs[j]);
            return std::fabs(r);
          },
          out);
      break;
    }
    case Stat::kGather:
      for (int64_t i = 0; i < n; ++i) {
        const float a = std::fabs(xs[i]);
        gather[i] = a <= 3.4028234663852886e38f ? a : INFINITY;  // NaN sorts as +inf
      }
      break;
  }
  return out;
}

// What the write pass needs besides the row pointers.
struct WriteArgs {
  const OpArgs* a;
  const RowQuant* rq;  // the row's fresh quantizer (update steps), else nullptr
  const float* Q;      // the row's levels
  int K;
  Finder near;   // over the midpoints (nearest level, non-update hard / relax)
  Finder inter;  // over Q (interval lookup, soft / PARQ)
  bool writes;   // false: p keeps its value (prox NONE, gamma 1)
};

// hard(x) for the chunk: the quantizer's q on update steps, else the nearest level.
inline void hard_chunk(const float* xs, int64_t n, const WriteArgs& w, float* hs) {
  if (w.rq != nullptr) {
    const RowQuant rq = *w.rq;
    if (w.a->center) {
      for (int64_t i = 0; i < n; ++i) hs[i] = quant_q(rq, xs[i] - rq.m) + rq.m;
    } else {
      for (int64_t i = 0; i < n; ++i) hs[i] = quant_q(rq, xs[i]);
    }
    return;
  }
  const Finder f = w.near;
  for (int64_t i = 0; i < n; ++i) hs[i] = w.Q[count_less(f, xs[i])];
}

// The write pass over a chunk. With lat (non-update steps, the only pass), also
// copies the latent and checks finiteness.
template <typename T>
Partial write_chunk(T* p, T* lat, int64_t n, const WriteArgs& w) {
  float xs[kChunk];
  float hs[kChunk];
  load_chunk(p, n, w.a->gamma, xs);
  Partial out;
  if (lat != nullptr) {
    std::memcpy(lat, p, static_cast<size_t>(n) * sizeof(T));
    out.bad = !all_finite(xs, n);
  }
  if (!w.writes) return out;
  const OpArgs& a = *w.a;
  switch (a.prox_kind) {
    case kHard:
      hard_chunk(xs, n, w, xs);
      break;
    case kRelax: {
      hard_chunk(xs, n, w, hs);
      const float keep = a.relax_keep, theta = a.prox_arg;
      for (int64_t i = 0; i < n; ++i) xs[i] = keep * xs[i] + theta * hs[i];
      break;
    }
    case kSoft:
    case kParq: {
      const Finder f = w.inter;
      const float* Q = w.Q;
      const int last = w.K - 1;
      const bool soft = a.prox_kind == kSoft;
      for (int64_t i = 0; i < n; ++i) {
        const int j = count_less(f, xs[i]);
        const float lo = Q[j > 0 ? j - 1 : 0];
        const float hi = Q[j < last ? j : last];
        xs[i] = soft ? prox_soft(xs[i], lo, hi, a.prox_arg, a.soft_denom)
                     : prox_parq(xs[i], lo, hi, a.prox_arg);
      }
      break;
    }
    default:
      break;
  }
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(xs[i]);
  return out;
}

}  // namespace parq

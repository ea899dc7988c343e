// Chunk-level loops of the CPU kernels: the write pass (hard(x), the prox map, the store).
//
// A chunk is worked in sub-blocks of kSub float32 values (x = value / gamma from the
// source, sources.h); hard(x) is the row's fresh quantizer on update steps, else the
// nearest stored level; the projection of each prox kind is a simple loop over the block.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../levels.h"
#include "../quant_prox.h"
#include "level.h"
#include "level_search.h"
#include "project_levels.h"
#include "row_stats.h"

PARQ_CPU_BEGIN

// What the write pass needs besides the row pointers.
struct WriteArgs {
  const OpArgs* a;
  const RowQuant* rq;  // the row's fresh quantizer (update steps), else nullptr
  const float* Q;      // the row's levels
  int K;
  Finder near;   // over the midpoints (nearest level, non-update hard / relax)
  Finder inter;  // over Q (interval lookup, soft / PARQ)
  bool writes;   // false: p keeps its value (prox NONE, gamma 1)
  bool suspect;  // update steps: the row's first pass saw a non-finite value
  bool clamp = false;  // BINARYCONNECT: latent = clamp(latent, lo, hi) in the write pass
  float lo = 0.0f;     // gamma Q_0
  float hi = 0.0f;     // gamma Q_{K-1}
};

constexpr int64_t kSub = 1024;  // the write pass works on sub-blocks of this size

// idx[i] = #{j : a_j < xs[i]} (binary search or arithmetic lookup, K > 16).
inline void count_block(const Finder& f, const float* xs, int64_t n, int32_t* idx) {
  for (int64_t i = 0; i < n; ++i) idx[i] = count_less(f, xs[i]);
}

// Small level sets (compare-count mode): level-major selects, which vectorize.
// nearest: Q[#{j : M_j < x}];  interval: lo = the largest Q_j < x (else Q_0),
// hi = the smallest Q_j >= x (else Q_{K-1}); the same values as the index lookup.
inline void nearest_small(const float* Q, const float* M, int K, const float* xs, int64_t n,
                          float* hs) {
  for (int64_t i = 0; i < n; ++i) hs[i] = Q[0];
  for (int j = 0; j + 1 < K; ++j) {
    const float mj = M[j], qn = Q[j + 1];
    for (int64_t i = 0; i < n; ++i) hs[i] = mj < xs[i] ? qn : hs[i];
  }
}

inline void interval_small(const float* Q, int K, const float* xs, int64_t n, float* lo,
                           float* hi) {
  for (int64_t i = 0; i < n; ++i) {
    lo[i] = Q[0];
    hi[i] = Q[K - 1];
  }
  for (int j = 0; j < K; ++j) {
    const float qj = Q[j];
    for (int64_t i = 0; i < n; ++i) lo[i] = qj < xs[i] ? qj : lo[i];
  }
  for (int j = K - 1; j >= 0; --j) {
    const float qj = Q[j];
    for (int64_t i = 0; i < n; ++i) hi[i] = qj < xs[i] ? hi[i] : qj;
  }
}

// Fused single-sweep versions for small level sets (K = 2, 3, 4; up to 16 padded):
// the level loop unrolls and the element loop vectorizes.
template <int KC>
inline void nearest_fixed(const float* Qp, const float* Mp, const float* xs, int64_t n,
                          float* hs) {
  float Q[KC], M[KC];
  for (int j = 0; j < KC; ++j) Q[j] = Qp[j];
  for (int j = 0; j + 1 < KC; ++j) M[j] = Mp[j];
  for (int64_t i = 0; i < n; ++i) {
    const float x = xs[i];
    float h = Q[0];
    for (int j = 0; j + 1 < KC; ++j) h = M[j] < x ? Q[j + 1] : h;
    hs[i] = h;
  }
}

template <typename F>
inline void map_block(const float* xs, int64_t n, float* hs, bool center, float m, F q) {
  if (center) {
    for (int64_t i = 0; i < n; ++i) hs[i] = q(xs[i] - m) + m;
  } else {
    for (int64_t i = 0; i < n; ++i) hs[i] = q(xs[i]);
  }
}

// hard(x) for a block: the quantizer's q on update steps, else the nearest level.
inline void hard_block(const float* xs, int64_t n, const WriteArgs& w, float* hs, int32_t* idx) {
  if (w.rq == nullptr) {
    if (w.near.mode == 0) {
      switch (w.K) {
        case 2:
          return nearest_fixed<2>(w.Q, w.near.a, xs, n, hs);
        case 3:
          return nearest_fixed<3>(w.Q, w.near.a, xs, n, hs);
        case 4:
          return nearest_fixed<4>(w.Q, w.near.a, xs, n, hs);
        default:
          if (w.K <= kMaxFastLevels) {  // padded to 8 or 16 (the same nearest level)
            return with_level_slots(w.K, [&](auto nl) {
              const auto l = pad_levels<decltype(nl)::value>(w.Q, w.K);
              nearest_fixed<decltype(nl)::value>(l.Q, l.M, xs, n, hs);
            });
          }
          return nearest_small(w.Q, w.near.a, w.K, xs, n, hs);
      }
    }
    count_block(w.near, xs, n, idx);
    for (int64_t i = 0; i < n; ++i) hs[i] = w.Q[idx[i]];
    return;
  }
  const RowQuant rq = *w.rq;
  const bool c = w.a->center;
  const float m = rq.m;
  switch (rq.kind) {
    case kUniform:
      map_block(xs, n, hs, c, m, [&](float x) { return q_uniform(rq, x); });
      break;
    case kTernaryUnif:
      map_block(xs, n, hs, c, m, [&](float x) { return q_ternary_unif(rq, x); });
      break;
    case kAsym:
      map_block(xs, n, hs, c, m, [&](float x) { return q_asym(rq, x); });
      break;
    case kLsbqTernary:
      map_block(xs, n, hs, c, m, [&](float x) { return q_lsbq_ternary(rq, x); });
      break;
    case kTernaryThreshold:
      map_block(xs, n, hs, c, m, [&](float x) { return q_ternary_threshold(rq, x); });
      break;
    default:
      if (rq.kind == kLsbqOptimal && rq.nv == 0) {
        map_block(xs, n, hs, c, m, [&](float x) { return q_optimal_ternary(rq, x); });
      } else {  // q_binary, bit-major
        float r[kSub];
        for (int64_t i = 0; i < n; ++i) {
          r[i] = c ? xs[i] - m : xs[i];
          hs[i] = 0.0f;
        }
        for (int j = 0; j < rq.nv; ++j) {
          const float vj = rq.v[j];
          for (int64_t i = 0; i < n; ++i) {
            const float step = r[i] >= 0.0f ? vj : -vj;
            hs[i] = hs[i] + step;
            r[i] = r[i] - step;
          }
        }
        if (c) {
          for (int64_t i = 0; i < n; ++i) hs[i] = hs[i] + m;
        }
      }
  }
}

// The prox map of a block: the result is in xs, or in hs for HARD (returned).
inline float* prox_block(float* xs, int64_t n, const WriteArgs& w, float* hs) {
  const OpArgs& a = *w.a;
  float lo[kSub];
  int32_t idx[kSub];
  switch (a.prox_kind) {
    case kHard:
    case kBinaryConnect:
      hard_block(xs, n, w, hs, idx);
      return hs;
    case kRelax: {
      hard_block(xs, n, w, hs, idx);
      const float keep = a.relax_keep, theta = a.prox_arg;
      for (int64_t i = 0; i < n; ++i) xs[i] = keep * xs[i] + theta * hs[i];
      break;
    }
    case kProxQuantL1: {
      hard_block(xs, n, w, hs, idx);
      const float lam = a.prox_arg;
      for (int64_t i = 0; i < n; ++i) xs[i] = prox_quant_l1(xs[i], hs[i], lam);
      break;
    }
    case kProxQuantL2: {
      hard_block(xs, n, w, hs, idx);
      const float lam = a.prox_arg, denom = a.l2_denom;
      for (int64_t i = 0; i < n; ++i) xs[i] = prox_quant_l2(xs[i], hs[i], lam, denom);
      break;
    }
    case kSoft:
    case kParq: {
      const float* Q = w.Q;
      const int last = w.K - 1;
      const float inv_rho = 1.0f / a.prox_arg;
      if (a.prox_kind == kParq && w.K >= 1 && w.K <= kMaxFastLevels && std::isfinite(inv_rho)) {
        with_level_slots(w.K, [&](auto nl) {
          constexpr int NL = decltype(nl)::value;
          project_block<kParq, NL>(xs, n, pad_levels<NL>(Q, w.K), ProjectArgs{inv_rho, 0.0f, 0.0f});
        });
        break;
      }
      if (w.inter.mode == 0) {
        interval_small(Q, w.K, xs, n, lo, hs);
      } else {
        count_block(w.inter, xs, n, idx);
        for (int64_t i = 0; i < n; ++i) {
          const int j = idx[i];
          lo[i] = Q[j > 0 ? j - 1 : 0];
          hs[i] = Q[j < last ? j : last];
        }
      }
      const float arg = a.prox_arg;
      if (a.prox_kind == kSoft) {
        const float denom = a.soft_denom;
        for (int64_t i = 0; i < n; ++i) xs[i] = prox_soft(xs[i], lo[i], hs[i], arg, denom);
      } else {
        for (int64_t i = 0; i < n; ++i) xs[i] = prox_parq(xs[i], lo[i], hs[i], arg);
      }
      break;
    }
    default:
      break;
  }
  return xs;
}

// The write pass over the chunk [o, o + n): projects x and stores it to p. With
// first (non-update steps: the only pass), the source also does its first-pass work.
template <typename Src>
Partial write_chunk(const Src& src, int64_t o, int64_t n, bool first, const WriteArgs& w) {
  Partial out;
  float xs[kSub];
  float hs[kSub];
  float keep[kSub];
  for (int64_t b = 0; b < n; b += kSub) {
    const int64_t len = std::min(kSub, n - b);
    // only where a non-finite value was seen can an x be non-finite (sources.h)
    const bool flagged = src.load(o + b, len, xs, first);
    out.bad |= flagged;
    if (w.clamp) src.clamp_latent(o + b, len, w.lo, w.hi);  // xs keep the unclamped x
    if (!w.writes) continue;
    if (!(first ? flagged : w.suspect) || all_finite(xs, len)) {
      src.store(o + b, len, prox_block(xs, len, w, hs));
      continue;
    }
    // a non-finite x (a latent that never was finite) is written as it is
    std::memcpy(keep, xs, static_cast<size_t>(len) * sizeof(float));
    float* ys = prox_block(xs, len, w, hs);
    for (int64_t i = 0; i < len; ++i) ys[i] = keep[i] - keep[i] == 0.0f ? ys[i] : keep[i];
    src.store(o + b, len, ys);
  }
  return out;
}

PARQ_CPU_END

// The write pass of float32 rows straight from the latent, on every level (simd.h): one
// loop loads a vector of latents (software prefetch ahead), projects them and stores p, where the
// general write pass (write_pass.h: write_chunk) copies a block into an L1 buffer, maps
// it, then stores it. The general pass runs its phases one after the other, so the
// division of the uniform quantizer waits for the loads instead of overlapping them;
// on the long rows of per-tensor groups that was 40 % of an update step.
//
// Served (update steps of rows longer than a chunk, non-update steps of quant_prox_):
// float32, no shrink, no latent clamp, and either HARD with the row's fresh uniform
// quantizer (q_uniform, not centered) or PARQ onto K <= 16 levels (project_vec). The same
// float operations as the scalar code (levels.h, project_levels.h), so the same bits; a
// non-finite latent is written as it is, as the general pass does.
#pragma once

#include <cmath>
#include <cstdint>

#include "../levels.h"
#include "../quant_prox.h"
#include "level.h"
#include "level_search.h"
#include "project_levels.h"
#include "simd.h"

PARQ_CPU_BEGIN

// Which map the direct pass applies.
enum class DirectMap { kNone, kUniformHard, kParq };

// The row's uniform quantizer broadcast once (outside the loop).
struct UniformV {
  Vec zp, s, lo, hi;
  explicit UniformV(const RowQuant& rq) : zp(rq.zp), s(rq.s), lo(-rq.qm), hi(rq.qm) {}
};

// q_uniform (levels.h) on a vector: clampf, divide, subtract zp, rne, add zp, multiply
// (vrne: the scalar rne's own operations, so the same value for every float).
inline __attribute__((always_inline)) Vec q_uniform_vec(Vec x, const UniformV& u) {
  const Vec t = vclamp(x, u.lo, u.hi) / u.s - u.zp;
  return (vrne(t) + u.zp) * u.s;
}

// The map the direct pass serves for this write, or kNone.
inline DirectMap direct_map(const OpArgs& a, const RowQuant* rq, int K, float gamma,
                            bool clamp) {
  if (gamma != 1.0f || clamp) return DirectMap::kNone;
  if (a.prox_kind == kHard && rq != nullptr && rq->kind == kUniform && !a.center) {
    return DirectMap::kUniformHard;
  }
  if (a.prox_kind == kParq && K >= 1 && K <= kMaxFastLevels && std::isfinite(1.0f / a.prox_arg)) {
    return DirectMap::kParq;
  }
  return DirectMap::kNone;
}

template <DirectMap M, typename LV>
inline __attribute__((always_inline)) Vec map_vec(Vec x, const UniformV& u, const LV& lv) {
  if constexpr (M == DirectMap::kUniformHard) {
    return select(finite_mask(x), x, q_uniform_vec(x, u));
  } else {
    return project_vec<kParq>(x, lv);  // keeps a non-finite x itself
  }
}

template <DirectMap M, int NL>
inline float map1(float x, const RowQuant& rq, const LevelsN<NL>& lv, const ProjectArgs& pa) {
  if constexpr (M == DirectMap::kUniformHard) {
    return x - x == 0.0f ? q_uniform(rq, x) : x;
  } else {
    return project_one<kParq, NL>(x, lv, pa);
  }
}

// p[0, n) = map(lat[0, n)): the head until p is aligned for streaming stores and the tail
// per element, the body a vector at a time with streaming stores (p is written, never read).
template <DirectMap M, int NL, bool kSearch = false>
void write_direct(const float* __restrict__ lat, float* __restrict__ out, int64_t n,
                  const RowQuant& rq_arg, const LevelsN<NL>& lv_arg, const ProjectArgs& pa_arg) {
  const RowQuant rq = rq_arg;  // local copies, broadcast once (step_vec.h)
  const LevelsN<NL> lv = lv_arg;
  const ProjectArgs pa = pa_arg;
  const UniformV u(rq);
  const auto lvv = levels_vec<kParq, NL, kSearch>(lv, pa);
  int64_t i = 0;
  for (; i < n && !stream_aligned(out + i); ++i) out[i] = map1<M, NL>(lat[i], rq, lv, pa);
  for (; i + kW <= n; i += kW) {
    prefetch(lat + i + kPrefetch);
    Pack<float>{{map_vec<M>(Vec::loadu(lat + i), u, lvv)}}.stream(out + i);
  }
  for (; i < n; ++i) out[i] = map1<M, NL>(lat[i], rq, lv, pa);
}

// write_direct with the map chosen at run time (direct_map's answer, not kNone), onto the
// row's K levels Q (PARQ) or its quantizer rq (uniform HARD).
inline void write_direct(DirectMap map, const float* lat, float* out, int64_t n,
                         const RowQuant& rq, const float* Q, int K, const ProjectArgs& pa) {
  if (map == DirectMap::kUniformHard) {
    const float none = 0.0f;
    write_direct<DirectMap::kUniformHard, 4>(lat, out, n, rq, pad_levels<4>(&none, 1), pa);
    return;
  }
  with_level_slots(K, [&](auto nl) {
    constexpr int NL = decltype(nl)::value;
    const LevelsN<NL> padded = pad_levels<NL>(Q, K);
    with_search<kParq>(padded, [&](auto search) {
      write_direct<DirectMap::kParq, NL, decltype(search)::value>(lat, out, n, rq, padded, pa);
    });
  });
}

PARQ_CPU_END

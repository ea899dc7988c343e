// The write pass of float32 rows straight from the latent, with AVX-512: one loop
// loads 16 latents (software prefetch ahead), projects them and stores p, where the
// general write pass (write_pass.h: write_chunk) copies a block into an L1 buffer, maps
// it, then stores it. The general pass runs its phases one after the other, so the
// division of the uniform quantizer waits for the loads instead of overlapping them;
// on the long rows of per-tensor groups that was 40 % of an update step.
//
// Served (update steps of rows longer than a chunk, non-update steps of quant_prox_):
// float32, no shrink, no latent clamp, and either HARD with the row's fresh uniform
// quantizer (q_uniform, not centered) or PARQ onto K <= 4 levels (project16). The same
// float operations as the scalar code (levels.h, project4.h), so the same bits; a
// non-finite latent is written as it is, as the general pass does.
#pragma once

#if defined(__AVX512F__)

#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "../levels.h"
#include "../quant_prox.h"
#include "project4.h"

namespace parq {
namespace avx512 {

// Which map the direct pass applies.
enum class DirectMap { kNone, kUniformHard, kParq4 };

// q_uniform (levels.h) on 16 values: clampf, divide, subtract zp, rne, add zp, multiply;
// rne as vrndscaleps (round to nearest even: the same value as the scalar rne for every
// float, and -0 keeps its sign in both).
inline __attribute__((always_inline)) __m512 q_uniform16(__m512 x, const RowQuant& rq) {
  const __m512 zp = _mm512_set1_ps(rq.zp), s = _mm512_set1_ps(rq.s);
  __m512 t = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-rq.qm)), _mm512_set1_ps(rq.qm));
  t = _mm512_sub_ps(_mm512_div_ps(t, s), zp);
  t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_mul_ps(_mm512_add_ps(t, zp), s);
}

// The map the direct pass serves for this write, or kNone.
inline DirectMap direct_map(const OpArgs& a, const RowQuant* rq, int K, float gamma,
                            bool clamp) {
  if (gamma != 1.0f || clamp) return DirectMap::kNone;
  if (a.prox_kind == kHard && rq != nullptr && rq->kind == kUniform && !a.center) {
    return DirectMap::kUniformHard;
  }
  if (a.prox_kind == kParq && K <= 4 && std::isfinite(1.0f / a.prox_arg)) {
    return DirectMap::kParq4;
  }
  return DirectMap::kNone;
}

template <DirectMap M>
inline __attribute__((always_inline)) __m512 map16(__m512 x, const RowQuant& rq,
                                                   const Levels4& lv, const ProjectArgs& pa) {
  if constexpr (M == DirectMap::kUniformHard) {
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_sub_ps(x, x), _mm512_setzero_ps(),
                                            _CMP_EQ_OQ);
    return _mm512_mask_blend_ps(ok, x, q_uniform16(x, rq));
  } else {
    return project16<kParq>(x, lv, pa);  // keeps a non-finite x itself
  }
}

template <DirectMap M>
inline float map1(float x, const RowQuant& rq, const Levels4& lv, const ProjectArgs& pa) {
  if constexpr (M == DirectMap::kUniformHard) {
    return x - x == 0.0f ? q_uniform(rq, x) : x;
  } else {
    return project4<kParq>(x, lv, pa);
  }
}

// p[0, n) = map(lat[0, n)): the head until p is 64-byte aligned and the tail per
// element, the body 16 at a time with streaming stores (p is written, never read).
template <DirectMap M>
void write_direct(const float* __restrict__ lat, float* __restrict__ out, int64_t n,
                  const RowQuant& rq_arg, const Levels4& lv_arg, const ProjectArgs& pa_arg) {
  const RowQuant rq = rq_arg;  // local copies, hoisted out of the loop (step_avx512.h)
  const Levels4 lv = lv_arg;
  const ProjectArgs pa = pa_arg;
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0; ++i) {
    out[i] = map1<M>(lat[i], rq, lv, pa);
  }
  for (; i + 16 <= n; i += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(lat + i + 512), _MM_HINT_T0);
    _mm512_stream_ps(out + i, map16<M>(_mm512_loadu_ps(lat + i), rq, lv, pa));
  }
  for (; i < n; ++i) out[i] = map1<M>(lat[i], rq, lv, pa);
}

// write_direct with the map chosen at run time (direct_map's answer, not kNone).
inline void write_direct(DirectMap map, const float* lat, float* out, int64_t n,
                         const RowQuant& rq, const Levels4& lv, const ProjectArgs& pa) {
  if (map == DirectMap::kUniformHard) {
    write_direct<DirectMap::kUniformHard>(lat, out, n, rq, lv, pa);
  } else {
    write_direct<DirectMap::kParq4>(lat, out, n, rq, lv, pa);
  }
}

}  // namespace avx512
}  // namespace parq

#endif  // __AVX512F__

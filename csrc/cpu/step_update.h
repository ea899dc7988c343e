// The fused step's update steps (levels recomputed) for float32 rows that fit in L1, on
// every level (simd.h): the rows of a parameter are pipelined. One loop applies the base
// update to row r + 1 (latent and state in memory, the new latent also into an L1
// buffer) while it projects row r from the other buffer and streams it to p; between
// the two, row r's statistics and levels come from its buffer. So an update step
// reads and writes memory once, like a non-update step, and its stores of p overlap
// the next row's loads instead of following them (the general path's write pass is a
// second sweep that only stores).
//
// The same float operations in the same order as the general path (update_pack is the
// non-update loop's update, step_vec.h; the levels are computed by the general path's
// own statistics code over the buffer; PARQ projects with project_vec as its write pass
// does), so the bits are the same. Served: fp32 rows of cols % kW == 0 elements,
// cols <= kChunk (one statistics chunk), p aligned for streaming stores, no shrink, not
// the first step of a momentum buffer, prox NONE, PARQ with K <= 16, or HARD with the row's
// fresh uniform quantizer (not centered: q_uniform, as the direct write pass maps it); the
// rest takes the general path.
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "../levels.h"
#include "../quant_prox.h"
#include "level_search.h"
#include "project_levels.h"
#include "write_direct.h"
#include "row_stats.h"
#include "sources.h"
#include "simd.h"
#include "step_vec.h"

PARQ_CPU_BEGIN

// Does the pipelined path serve this update step of (rows, cols) rows at p?
inline bool update_rows_serve(const OpArgs& a, const StepArgs& s, const float* p,
                              int64_t cols) {
  const bool parq =
      a.prox_kind == kParq && a.K >= 1 && a.K <= kMaxFastLevels && std::isfinite(1.0f / a.prox_arg);
  const bool uniform_hard = a.prox_kind == kHard && a.quant_kind == kUniform && !a.center;
  return a.update && !s.init_buf && a.gamma == 1.0f && cols > 0 && cols <= kChunk &&
         cols % kW == 0 && stream_aligned(p) &&
         (a.prox_kind == kNone || parq || uniform_hard);
}

// The row pointers of row r (cols elements from each start).
struct RowPtrs {
  float* L;
  const float* G;
  float* B1;
  float* B2;
  float* B3;
  float* out;
};

inline RowPtrs row_ptrs(const StepSource<float>& src, int64_t off) {
  auto at = [off](float* t) { return t != nullptr ? t + off : nullptr; };
  return {src.lat + off, src.grad + off, at(src.b1), at(src.b2), at(src.b3), src.p + off};
}

// A row's map broadcast once: its levels (PARQ: LV is level_search.h's levels_vec) or its
// fresh uniform quantizer (HARD).
template <typename LV>
struct RowMapV {
  LV lv;
  UniformV u;
  RowMapV(const LV& l, const RowQuant& rq) : lv(l), u(rq) {}
};

// The projected x (PROX NONE: x itself; HARD: q_uniform, a non-finite x kept as it is).
template <int PROX, typename LV>
inline __attribute__((always_inline)) Vec project_or_keep(Vec x, const RowMapV<LV>& m) {
  if constexpr (PROX == kNone) {
    return x;
  } else if constexpr (PROX == kHard) {
    return select(finite_mask(x), x, q_uniform_vec(x, m.u));
  } else {
    return project_vec<PROX>(x, m.lv);
  }
}

// Row `next`'s base update into xs_next, and (kWrite) row cur's projection from xs_cur
// streamed to out, in one loop. Returns 1 if a lane of row next kept its old values.
template <Pattern P, int PROX, bool kWrite, typename LV>
int update_rows_pass(const StepV& s, const RowPtrs& next, float* __restrict__ xs_next,
                     const float* __restrict__ xs_cur, float* __restrict__ out, int64_t n,
                     const RowMapV<LV>& lv) {
  float* __restrict__ L = next.L;
  const float* __restrict__ G = next.G;
  float* __restrict__ B1 = next.B1;
  float* __restrict__ B2 = next.B2;
  float* __restrict__ B3 = next.B3;
  bool ok = true;
  for (int64_t i = 0; i < n; i += kW) {
    prefetch_update<P>(L, G, B1, B2, B3, i);
    update_pack<P, false>(s, L, G, B1, B2, B3, i, ok).v[0].store(xs_next + i);
    if constexpr (kWrite) {
      Pack<float>{{project_or_keep<PROX>(Vec::loadu(xs_cur + i), lv)}}.stream(out + i);
    }
  }
  return ok ? 0 : 1;
}

// The last row's write (nothing left to update).
template <int PROX, typename LV>
void write_row(const float* __restrict__ xs, float* __restrict__ out, int64_t n,
               const RowMapV<LV>& lv) {
  for (int64_t i = 0; i < n; i += kW) {
    Pack<float>{{project_or_keep<PROX>(Vec::loadu(xs + i), lv)}}.stream(out + i);
  }
}

// Row r's write from cur (its levels' map) and, unless it is the last, row r + 1's update
// into nxt, in one loop.
template <Pattern P, int PROX, typename LV>
inline int update_row(const StepV& s, const StepSource<float>& src, int64_t r, int64_t r1,
                      int64_t cols, const float* cur, float* nxt, const RowMapV<LV>& map) {
  float* out = src.p + r * cols;
  if (r + 1 < r1) {
    return update_rows_pass<P, PROX, true>(s, row_ptrs(src, (r + 1) * cols), nxt, cur, out, cols,
                                           map);
  }
  write_row<PROX>(cur, out, cols, map);
  return 0;
}

// Rows [r0, r1) of cols elements; levels(xs, Q, rq) computes a row's quantizer rq and
// levels Q from its buffer (the general path's statistics) and returns its nonfinite flag.
// Returns whether a row saw a non-finite value.
template <Pattern P, int PROX, int NL, typename LevelsFn>
bool update_rows(const StepSource<float>& src, const OpArgs& a, int64_t r0, int64_t r1,
                 int64_t cols, float* qp, const LevelsFn& levels) {
  const StepV s(*src.s);  // broadcast once, outside the loops
  const int K = static_cast<int>(a.K);
  const ProjectArgs pa{1.0f / a.prox_arg, a.relax_keep, a.prox_arg, a.prox_arg, a.l2_denom};
  alignas(64) float buf[2][kChunk];
  float* cur = buf[0];
  float* nxt = buf[1];
  const RowMapV<LevelsV<NL>> none(LevelsV<NL>(LevelsN<NL>{}, pa), RowQuant{});
  int bad = update_rows_pass<P, PROX, false>(s, row_ptrs(src, r0 * cols), cur, nullptr, nullptr,
                                             cols, none);
  for (int64_t r = r0; r < r1; ++r) {
    float* Q = qp + r * K;
    RowQuant rq{};
    bad |= levels(cur, Q, rq);
    const LevelsN<NL> padded = pad_levels<NL>(Q, K);
    bool searched = false;  // (with_search's choice, written out: its generic lambda here
                            // measured ~5 % slower on 4-bit PARQ update steps)
    if constexpr (kSearches<NL> && PROX == kParq) {
      if (levels_sorted(padded)) {
        const RowMapV<SearchV<NL>> map(SearchV<NL>(padded, pa, false), rq);
        bad |= update_row<P, PROX>(s, src, r, r1, cols, cur, nxt, map);
        searched = true;
      }
    }
    if (!searched) {
      const RowMapV<LevelsV<NL>> map(LevelsV<NL>(padded, pa), rq);
      bad |= update_row<P, PROX>(s, src, r, r1, cols, cur, nxt, map);
    }
    std::swap(cur, nxt);
  }
  return bad != 0;
}

// update_rows with the pattern and prox kind of the call.
template <typename LevelsFn>
bool update_rows_any(const StepSource<float>& src, const OpArgs& a, int64_t r0, int64_t r1,
                     int64_t cols, float* qp, const LevelsFn& levels) {
  const StepArgs& s = *src.s;
  const bool parq = a.prox_kind == kParq, hard = a.prox_kind == kHard;
#define PARQ_UPDATE_ROWS(PAT)                                                              \
  {                                                                                        \
    if (hard) return update_rows<PAT, kHard, 4>(src, a, r0, r1, cols, qp, levels);         \
    if (!parq) return update_rows<PAT, kNone, 4>(src, a, r0, r1, cols, qp, levels);        \
    return with_level_slots(a.K, [&](auto nl) {                                            \
      return update_rows<PAT, kParq, decltype(nl)::value>(src, a, r0, r1, cols, qp, levels); \
    });                                                                                    \
  }
  if (s.kind == kSgd) {
    if (s.has_momentum) PARQ_UPDATE_ROWS(Pattern::kSgdMomentum)
    PARQ_UPDATE_ROWS(Pattern::kSgd)
  }
  if (s.amsgrad) PARQ_UPDATE_ROWS(Pattern::kAdamAmsgrad)
  PARQ_UPDATE_ROWS(Pattern::kAdam)
#undef PARQ_UPDATE_ROWS
}

PARQ_CPU_END

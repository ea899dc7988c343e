// CPU kernels of parq_kernels_C::quant_prox_ and fused_step_ (contract: parq_kernels/ops.py).
//
// Each row is a quantization group. A row is cut into fixed chunks of kChunk
// elements; every reduction sums float lanes inside a chunk, then the chunk
// partials in double, in chunk order. Short rows are processed one row per
// task (at::parallel_for over rows); long rows (per-tensor groups) run each
// pass as an at::parallel_for over their chunks. Both give the same bits, and
// neither depends on the number of threads.
//
// Passes over a row, on update steps: [center mean] -> statistics (one per greedy LSBQ
// bit; threshold ternary: D, then the sums and counts per side; optimal LSBQ gathers |x|
// for one sort, row_stats.h) -> write pass (write_pass.h). The first pass also copies the
// latent (fused_step_: applies the base update to the latent and the optimizer state)
// and checks finiteness. Without update, a single pass does that, looks up the stored
// levels and writes. The two ops differ only in their source of values (sources.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../levels.h"
#include "../quant_prox.h"
#include "row_stats.h"
#include "sources.h"
#include "step_loop.h"
#include "step_update.h"
#include "write_direct.h"
#include "write_pass.h"

PARQ_CPU_BEGIN
namespace {

struct Workspace {
  std::vector<float> mid;     // midpoints of the stored levels (nearest-level lookup)
  std::vector<float> gather;  // |x| of a row, sorted by optimal LSBQ
};

// Run fn(chunk) over the chunks of a row and combine the partials in chunk
// order (serially or in parallel: same result). With reverse, each thread visits its
// chunks last to first: a pass that follows one over the same chunks (the write pass
// after the statistics) starts with those still in cache.
template <typename F>
Partial over_chunks(bool parallel, int64_t nchunks, const F& fn, bool reverse = false) {
  Partial total;
  if (!parallel && (!reverse || nchunks == 1)) {  // in order: no partials to keep
    for (int64_t c = 0; c < nchunks; ++c) total.add(fn(c));
    return total;
  }
  std::vector<Partial> parts(static_cast<size_t>(nchunks));
  auto run = [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t c = reverse ? b + e - 1 - k : k;
      parts[c] = fn(c);
    }
  };
  if (!parallel) {
    run(0, nchunks);
    for (const Partial& p : parts) total.add(p);
    return total;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    run(b, e);
    stream_fence();
  });
  for (const Partial& p : parts) total.add(p);
  return total;
}

float row_mean(const Partial& p, int64_t n) {
  return n > 0 ? static_cast<float>(p.sum / static_cast<double>(n)) : 0.0f;
}

template <typename Src>
struct RowJob {
  const OpArgs& a;
  Src src;  // the row's values (sources.h): p (quant_prox_) or the stepped latent (fused_step_)
  float* Q;
  int64_t n;
  bool parallel;
  Workspace& ws;

  int64_t nchunks() const { return (n + kChunk - 1) / kChunk; }
  int64_t off(int64_t c) const { return c * kChunk; }
  int64_t len(int64_t c) const { return std::min(kChunk, n - c * kChunk); }

  // A statistics pass; the first one also does the source's first-pass work and checks finiteness.
  Partial stats(Stat st, bool first, float m, const float* v, int nv) {
    float* gather = st == Stat::kGather ? ws.gather.data() : nullptr;
    return over_chunks(parallel, nchunks(), [&](int64_t c) {
      const int64_t o = off(c);
      return stats_chunk(src, o, len(c), first, m, st, v, nv, gather ? gather + o : nullptr);
    });
  }

  // Computes the row's quantizer and levels (update steps). Returns the nonfinite flag.
  bool quantize(RowQuant& rq) {
    rq = RowQuant{};
    rq.kind = static_cast<int>(a.quant_kind);
    bool bad = false, first = true;
    if (a.center) {
      const Partial pm = stats(Stat::kSum, true, 0.0f, nullptr, 0);
      bad = pm.bad;
      rq.m = row_mean(pm, n);
      first = false;
    }
    const float m = rq.m;
    const int b = static_cast<int>(a.bits);
    switch (a.quant_kind) {
      case kUniform: {
        const Partial s = stats(Stat::kAbsSumMax, first, m, nullptr, 0);
        bad |= s.bad;
        float qm = s.amax;
        if (!a.scale_max) qm = minf(static_cast<float>(b) * row_mean(s, n), qm);
        rq.qm = maxf(qm, kTiny);
        rq.r = static_cast<float>(std::ldexp(1.0, b - 1) - static_cast<double>(a.int_shift));
        rq.s = rq.qm / rq.r;
        rq.zp = a.zero_point;
        break;
      }
      case kTernaryUnif: {
        const Partial s = stats(Stat::kAbsMax, first, m, nullptr, 0);
        bad |= s.bad;
        rq.s = maxf(s.amax, kTiny) / 1.5f;
        break;
      }
      case kAsym: {
        const Partial s = stats(Stat::kMinMax, first, m, nullptr, 0);
        bad |= s.bad;
        const float mn = n > 0 ? s.mn : 0.0f, mx = n > 0 ? s.mx : 0.0f;
        const float top = static_cast<float>((1 << b) - 1);
        rq.s = maxf((mx - mn) / top, kTiny);
        rq.z = rne(mn / rq.s);
        rq.ztop = rq.z + top;
        break;
      }
      case kLsbqTernary: {
        const Partial s = stats(Stat::kAbsSum, first, m, nullptr, 0);
        bad |= s.bad;
        rq.v[0] = a.ternary_mult * row_mean(s, n);
        break;
      }
      case kTernaryThreshold: {  // D, then the sums and counts of each side (a second read)
        const Partial s = stats(a.delta_max ? Stat::kAbsMax : Stat::kAbsSum, first, m, nullptr, 0);
        bad |= s.bad;
        rq.thr = a.delta_factor * (a.delta_max ? s.amax : row_mean(s, n));
        const Partial t = stats(Stat::kSides, false, m, &rq.thr, 0);
        ternary_threshold_levels(rq, t.sum_pos, static_cast<double>(t.n_pos), t.sum_neg,
                                 static_cast<double>(t.n_neg));
        break;
      }
      case kLsbqOptimal:
        if (b != 1) {
          ws.gather.resize(static_cast<size_t>(n));
          const Partial s = stats(Stat::kGather, first, m, nullptr, 0);
          bad |= s.bad;
          std::sort(ws.gather.begin(), ws.gather.end());
          double lo = 0.0, hi = 0.0;
          optimal_split(ws.gather.data(), n, b == 0, &lo, &hi);
          if (b == 0) {
            rq.nv = 0;
            rq.v[0] = static_cast<float>(hi);
          } else {
            rq.nv = 2;
            rq.v[0] = static_cast<float>((hi + lo) / 2);
            rq.v[1] = static_cast<float>((hi - lo) / 2);
          }
          break;
        }
        [[fallthrough]];
      default: {  // greedy: pass i averages |r_i|, replaying the first i steps
        rq.nv = b;
        for (int i = 0; i < b; ++i) {
          const Partial s = stats(Stat::kAbsResidual, first, m, rq.v, i);
          bad |= s.bad;
          first = false;
          rq.v[i] = row_mean(s, n);
        }
      }
    }
    const int K = static_cast<int>(a.K);
    fill_levels(rq, Q, K);
    if (levels_need_sort(rq)) std::sort(Q, Q + K);
    if (a.center) {
      for (int j = 0; j < K; ++j) Q[j] = Q[j] + m;
    }
    return bad;
  }

  bool run() {
    const int K = static_cast<int>(a.K);
    const bool uniform =
        a.quant_kind == kUniform || a.quant_kind == kTernaryUnif || a.quant_kind == kAsym;
    RowQuant rq{};
    bool bad = false;
    const bool single = !a.update;  // one pass: first-pass work + check + lookup + write
    if (a.update) bad = quantize(rq);
    const bool writes = Src::kAlwaysWrites || a.prox_kind != kNone || a.gamma != 1.0f;
    if (!single && !writes) return bad;
    Finder near{}, inter{};
    if (a.prox_kind == kSoft || a.prox_kind == kParq) inter = make_finder(Q, K, uniform);
    if (!a.update && needs_hard(a.prox_kind)) {
      ws.mid.resize(static_cast<size_t>(std::max(K - 1, 0)));
      for (int j = 0; j + 1 < K; ++j) ws.mid[j] = (Q[j] + Q[j + 1]) / 2;
      near = make_finder(ws.mid.data(), K - 1, uniform);
    }
    if constexpr (Src::kStep) {  // non-update steps of the fused step: one loop per element
      if (step_loop_serves(a, *src.s)) {
        return over_chunks(parallel, nchunks(), [&](int64_t c) {
                 Partial part;
                 part.bad = step_loop_row(src, off(c), len(c), Q, a) > 0;
                 return part;
               }).bad;
      }
    }
    WriteArgs w{&a, a.update ? &rq : nullptr, Q, K, near, inter, writes, bad};
    if (a.prox_kind == kBinaryConnect && K > 0) {  // the reference's float32 gamma * Q
      w.clamp = true;
      w.lo = Q[0] * a.gamma;
      w.hi = Q[K - 1] * a.gamma;
    }
    if constexpr (std::is_same_v<decltype(src.lat), float*>) {  // write straight from the latent
      const auto map = direct_map(a, w.rq, K, a.gamma, w.clamp);
      if (!single && writes && map != DirectMap::kNone) {
        const Levels4 lv = pad_levels(Q, std::max(K, 1));
        const ProjectArgs pa{1.0f / a.prox_arg, a.relax_keep, a.prox_arg};
        const auto write = [&](int64_t c) {
          write_direct(map, src.lat + off(c), src.p + off(c), len(c), rq, lv, pa);
          return Partial{};
        };
        over_chunks(parallel, nchunks(), write, true);
        return bad;
      }
    }
    const Partial s = over_chunks(
        parallel, nchunks(), [&](int64_t c) { return write_chunk(src, off(c), len(c), single, w); },
        !single);
    return bad || s.bad;
  }
};

// One parameter of (rows, cols), its values seen through src (row r at src.at(r * cols)).
template <typename Src>
bool run_param(const OpArgs& a, const Src& src, int64_t rows, int64_t cols, float* qp) {
  if (rows == 0) return false;
  const int64_t K = a.K;
  // Few long rows: parallel over each row's chunks. Otherwise: parallel over rows.
  if (cols >= 4 * kChunk && rows < 2 * at::get_num_threads()) {
    Workspace ws;
    bool bad = false;
    for (int64_t r = 0; r < rows; ++r) {
      RowJob<Src> job{a, src.at(r * cols), qp + r * K, cols, true, ws};
      bad |= job.run();
    }
    stream_fence();
    return bad;
  }
  // non-update fused steps: the rows go straight to the one loop (no per-row job)
  bool one_loop = false, pipelined = false;
  if constexpr (Src::kStep) one_loop = step_loop_serves(a, *src.s);
  if constexpr (std::is_same_v<Src, StepSource<float>>) {
    pipelined = update_rows_serve(a, *src.s, src.p, cols);
  }
  std::atomic<bool> bad{false};
  const int64_t grain = std::max<int64_t>(1, (16 * kChunk) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    Workspace ws;
    bool local = false;
    if constexpr (std::is_same_v<Src, StepSource<float>>) {
      if (pipelined) {  // update steps: row r + 1's update in row r's write (step_update.h)
        const auto levels = [&](const float* xs, float* Q) {
          RowJob<BufSource> job{a, BufSource{xs}, Q, cols, false, ws};
          RowQuant rq;
          return job.quantize(rq);
        };
        local = update_rows_any(src, a, b, e, cols, qp, levels);
        stream_fence();
        if (local) bad.store(true, std::memory_order_relaxed);
        return;
      }
    }
    for (int64_t r = b; r < e; ++r) {
      if constexpr (Src::kStep) {
        if (one_loop) {
          local |= step_loop_row(src, r * cols, cols, qp + r * K, a) > 0;
          continue;
        }
      }
      RowJob<Src> job{a, src.at(r * cols), qp + r * K, cols, false, ws};
      local |= job.run();
    }
    stream_fence();
    if (local) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

template <typename T>
bool quant_prox_param(const OpArgs& a, const at::Tensor& p, const at::Tensor& lat,
                      const at::Tensor& Q) {
  const ParamSource<T> src{p.data_ptr<T>(), lat.data_ptr<T>(), a.gamma};
  return run_param(a, src, p.size(0), p.size(1), Q.data_ptr<float>());
}

template <typename T>
T* ptr_or_null(at::TensorList ts, size_t i) {
  return i < ts.size() ? ts[i].data_ptr<T>() : nullptr;
}

template <typename T>
bool fused_step_param(const OpArgs& a, const StepArgs& s, size_t i, at::TensorList params,
                      at::TensorList latents, at::TensorList grads, at::TensorList bufs1,
                      at::TensorList bufs2, at::TensorList bufs3, const at::Tensor& Q) {
  const at::Tensor& p = params[i];
  const StepSource<T> src{p.data_ptr<T>(),        latents[i].data_ptr<T>(),
                          grads[i].data_ptr<T>(), ptr_or_null<T>(bufs1, i),
                          ptr_or_null<T>(bufs2, i), ptr_or_null<T>(bufs3, i),
                          &s,                     a.gamma};
  return run_param(a, src, p.size(0), p.size(1), Q.data_ptr<float>());
}

}  // namespace

void quant_prox_level(at::TensorList params, at::TensorList latents, at::TensorList quants,
                    const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma) {
  const OpArgs a = validate_args(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 center, update, prox_kind, prox_arg, gamma);
  TORCH_CHECK(nonfinite.device().is_cpu(), "quant_prox_ (cpu): nonfinite must be a CPU tensor");
  int32_t* flags = nonfinite.data_ptr<int32_t>();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), "quant_prox_ (cpu): params[", i,
                "] must be a CPU tensor");
    bool bad = false;
    switch (params[i].scalar_type()) {
      case at::kFloat:
        bad = quant_prox_param<float>(a, params[i], latents[i], quants[i]);
        break;
      case at::kBFloat16:
        bad = quant_prox_param<c10::BFloat16>(a, params[i], latents[i], quants[i]);
        break;
      default:
        bad = quant_prox_param<c10::Half>(a, params[i], latents[i], quants[i]);
    }
    if (bad) flags[i] = 1;
  }
}

void fused_step_level(at::TensorList params, at::TensorList latents, at::TensorList grads,
                    at::TensorList bufs1, at::TensorList bufs2, at::TensorList bufs3,
                    at::TensorList quants, const at::Tensor& nonfinite, int64_t optim_kind,
                    c10::ArrayRef<double> hparams, int64_t quant_kind, int64_t bits,
                    c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                    double prox_arg, double gamma) {
  const OpArgs a = validate_args(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 center, update, prox_kind, prox_arg, gamma);
  const StepArgs s =
      validate_step_args(params, grads, bufs1, bufs2, bufs3, optim_kind, hparams);
  TORCH_CHECK(nonfinite.device().is_cpu(), "fused_step_ (cpu): nonfinite must be a CPU tensor");
  int32_t* flags = nonfinite.data_ptr<int32_t>();
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), "fused_step_ (cpu): params[", i,
                "] must be a CPU tensor");
    bool bad = false;
    switch (params[i].scalar_type()) {
      case at::kFloat:
        bad = fused_step_param<float>(a, s, i, params, latents, grads, bufs1, bufs2, bufs3,
                                      quants[i]);
        break;
      case at::kBFloat16:
        bad = fused_step_param<c10::BFloat16>(a, s, i, params, latents, grads, bufs1, bufs2,
                                              bufs3, quants[i]);
        break;
      default:
        bad = fused_step_param<c10::Half>(a, s, i, params, latents, grads, bufs1, bufs2, bufs3,
                                          quants[i]);
    }
    if (bad) flags[i] = 1;
  }
}

PARQ_CPU_END

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
#include "row_split.h"
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
        const ProjectArgs pa{1.0f / a.prox_arg, a.relax_keep, a.prox_arg};
        const auto write = [&](int64_t c) {
          write_direct(map, src.lat + off(c), src.p + off(c), len(c), rq, Q, K, pa);
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

// Rows [r0, r1) of one parameter of (rows, cols) whose values src gives (row r at
// src.at(r * cols)) and whose levels are qp (K per row); row_split.h runs it over the rows
// of all the call's parameters. Returns whether a row saw a non-finite value.
template <typename Src>
bool run_rows(const OpArgs& a, const Src& src, int64_t r0, int64_t r1, int64_t cols,
              float* qp) {
  const int64_t K = a.K;
  Workspace ws;
  if constexpr (std::is_same_v<Src, StepSource<float>>) {
    if (update_rows_serve(a, *src.s, src.p, cols)) {  // row r + 1's update in row r's write
      const auto levels = [&](const float* xs, float* Q, RowQuant& rq) {
        RowJob<BufSource> job{a, BufSource{xs}, Q, cols, false, ws};
        return job.quantize(rq);
      };
      return update_rows_any(src, a, r0, r1, cols, qp, levels);
    }
  }
  bool bad = false;
  if constexpr (Src::kStep) {  // non-update fused steps: straight to the one loop
    if (step_loop_serves(a, *src.s)) {
      for (int64_t r = r0; r < r1; ++r) bad |= step_loop_row(src, r * cols, cols, qp + r * K, a) > 0;
      return bad;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    RowJob<Src> job{a, src.at(r * cols), qp + r * K, cols, false, ws};
    bad |= job.run();
  }
  return bad;
}

// A parameter of few long rows (row_split.h: long_rows): each row's passes run in
// parallel over its chunks.
template <typename Src>
bool run_long(const OpArgs& a, const Src& src, int64_t rows, int64_t cols, float* qp) {
  Workspace ws;
  bool bad = false;
  for (int64_t r = 0; r < rows; ++r) {
    RowJob<Src> job{a, src.at(r * cols), qp + r * a.K, cols, true, ws};
    bad |= job.run();
  }
  stream_fence();
  return bad;
}

// fn(T{}) with the parameter dtype T (float, bf16 or fp16: validate_args).
template <typename F>
decltype(auto) with_dtype(at::ScalarType t, const F& fn) {
  switch (t) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    default:
      return fn(c10::Half{});
  }
}

template <typename T>
T* ptr_or_null(at::TensorList ts, size_t i) {
  return i < ts.size() ? ts[i].data_ptr<T>() : nullptr;
}

std::vector<ParamShape> param_shapes(at::TensorList params, const char* op) {
  std::vector<ParamShape> shapes;
  shapes.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), op, " (cpu): params[", i, "] must be a CPU tensor");
    shapes.push_back({params[i].size(0), params[i].size(1)});
  }
  return shapes;
}

}  // namespace

void quant_prox_level(at::TensorList params, at::TensorList latents, at::TensorList quants,
                      const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                      c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                      double prox_arg, double gamma) {
  const OpArgs a = validate_args(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 center, update, prox_kind, prox_arg, gamma);
  TORCH_CHECK(nonfinite.device().is_cpu(), "quant_prox_ (cpu): nonfinite must be a CPU tensor");
  const std::vector<ParamShape> shapes = param_shapes(params, "quant_prox_");
  const auto source = [&](size_t i, auto tag) {
    using T = decltype(tag);
    return ParamSource<T>{params[i].data_ptr<T>(), latents[i].data_ptr<T>(), a.gamma};
  };
  const auto rows = [&](size_t i, int64_t r0, int64_t r1) {
    return with_dtype(params[i].scalar_type(), [&](auto tag) {
      return run_rows(a, source(i, tag), r0, r1, shapes[i].cols, quants[i].data_ptr<float>());
    });
  };
  const auto whole = [&](size_t i) {
    return with_dtype(params[i].scalar_type(), [&](auto tag) {
      return run_long(a, source(i, tag), shapes[i].rows, shapes[i].cols,
                      quants[i].data_ptr<float>());
    });
  };
  run_split(shapes, nonfinite.data_ptr<int32_t>(), rows, whole);
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
  const std::vector<ParamShape> shapes = param_shapes(params, "fused_step_");
  const auto source = [&](size_t i, auto tag) {
    using T = decltype(tag);
    return StepSource<T>{params[i].data_ptr<T>(),  latents[i].data_ptr<T>(),
                         grads[i].data_ptr<T>(),   ptr_or_null<T>(bufs1, i),
                         ptr_or_null<T>(bufs2, i), ptr_or_null<T>(bufs3, i),
                         &s,                       a.gamma};
  };
  const auto rows = [&](size_t i, int64_t r0, int64_t r1) {
    return with_dtype(params[i].scalar_type(), [&](auto tag) {
      return run_rows(a, source(i, tag), r0, r1, shapes[i].cols, quants[i].data_ptr<float>());
    });
  };
  const auto whole = [&](size_t i) {
    return with_dtype(params[i].scalar_type(), [&](auto tag) {
      return run_long(a, source(i, tag), shapes[i].rows, shapes[i].cols,
                      quants[i].data_ptr<float>());
    });
  };
  run_split(shapes, nonfinite.data_ptr<int32_t>(), rows, whole);
}

PARQ_CPU_END

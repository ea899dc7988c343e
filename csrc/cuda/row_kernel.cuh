// The CUDA row machinery shared by quant_prox_ and fused_step_: one thread
// block per row (quantization group), all parameters of a call in one launch per
// kMaxParams parameters, on the current stream. The kernel sees its row's
// values through a source (sources.cuh): the weights p (quant_prox_) or the
// latent stepped by the base optimizer (fused_step_). The math is the shared
// levels.h (and base_update.h inside the step source), like the CPU kernels.
//
// Passes over a row (update steps): statistics (+ the source's first-pass work:
// latent copy or base update; finiteness) -> [centered statistics] -> [one pass
// per further greedy bit; threshold ternary: one pass for the sums and counts of
// each side, once D is known] -> levels (thread 0, shared memory) -> write pass
// (BinaryConnect: the latent is clamped to the row's level range there).
// Without update: the stored levels are loaded into shared memory and one pass
// does the first-pass work, checks, projects and writes.
// Thread t handles elements t, t + kThreads, ... of its row on every pass, and
// reductions use a fixed tree (warp shuffles, then warps in order): the result
// does not depend on scheduling, so two runs agree bitwise.
//
// Not supported here (clear error, check_rows_supported): optimal LSBQ with b in
// {0, 2} (needs a per-row sort; use the triton or reference backend) and
// K > kMaxK levels.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>

#include <vector>

#include "../levels.h"
#include "../quant_prox.h"
#include "sources.cuh"

namespace parq {
namespace {  // internal linkage: each entry point's translation unit has its own copy

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxK = 1024;

struct Stats {
  double sum_x;    // sum of x - m
  double sum_abs;  // sum |r| (r: x - m after the replayed greedy steps)
  float amax;      // max |r|
  float mn;        // min of x - m
  float mx;        // max of x - m
};

// Block-wide reduction (every thread gets the result); sh holds kWarps + 1 entries.
__device__ Stats block_reduce(Stats s, Stats* sh) {
  for (int o = 16; o > 0; o >>= 1) {
    s.sum_x += __shfl_down_sync(0xffffffffu, s.sum_x, o);
    s.sum_abs += __shfl_down_sync(0xffffffffu, s.sum_abs, o);
    s.amax = maxf(s.amax, __shfl_down_sync(0xffffffffu, s.amax, o));
    s.mn = minf(s.mn, __shfl_down_sync(0xffffffffu, s.mn, o));
    s.mx = maxf(s.mx, __shfl_down_sync(0xffffffffu, s.mx, o));
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Stats t = sh[0];
    for (int w = 1; w < kWarps; ++w) {
      t.sum_x += sh[w].sum_x;
      t.sum_abs += sh[w].sum_abs;
      t.amax = maxf(t.amax, sh[w].amax);
      t.mn = minf(t.mn, sh[w].mn);
      t.mx = maxf(t.mx, sh[w].mx);
    }
    sh[kWarps] = t;
  }
  __syncthreads();
  const Stats out = sh[kWarps];
  __syncthreads();
  return out;
}

// One statistics pass of x - m through nv replayed greedy steps over the row's
// n elements; the first pass also does the source's first-pass work and checks
// finiteness (sets *bad).
template <typename Src>
__device__ Stats row_stats(const Src& src, int64_t n, bool first, float m, const float* v, int nv,
                           int* bad, Stats* sh) {
  Stats s{0.0, 0.0, 0.0f, INFINITY, -INFINITY};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    bool kept = false;
    const float x = first ? src.first(i, kept) : src.again(i);
    if (first && (kept || !isfinite(x))) *bad = 1;
    float r = x - m;
    s.sum_x += r;
    s.mn = minf(s.mn, r);
    s.mx = maxf(s.mx, r);
    for (int j = 0; j < nv; ++j) r = r - (r >= 0.0f ? v[j] : -v[j]);
    s.sum_abs += fabsf(r);
    s.amax = maxf(s.amax, fabsf(r));
  }
  return block_reduce(s, sh);
}

// Threshold ternary's side statistics (SPEC.md §9): the sum and count of the x - m >= d,
// and of the -(x - m) with x - m <= -d; counts in double (exact).
struct Sides {
  double sum_pos;
  double n_pos;
  double sum_neg;
  double n_neg;
};

// Block-wide reduction of Sides, the same fixed tree as block_reduce.
__device__ Sides block_reduce_sides(Sides s, Sides* sh) {
  for (int o = 16; o > 0; o >>= 1) {
    s.sum_pos += __shfl_down_sync(0xffffffffu, s.sum_pos, o);
    s.n_pos += __shfl_down_sync(0xffffffffu, s.n_pos, o);
    s.sum_neg += __shfl_down_sync(0xffffffffu, s.sum_neg, o);
    s.n_neg += __shfl_down_sync(0xffffffffu, s.n_neg, o);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    Sides t = sh[0];
    for (int w = 1; w < kWarps; ++w) {
      t.sum_pos += sh[w].sum_pos;
      t.n_pos += sh[w].n_pos;
      t.sum_neg += sh[w].sum_neg;
      t.n_neg += sh[w].n_neg;
    }
    sh[kWarps] = t;
  }
  __syncthreads();
  const Sides out = sh[kWarps];
  __syncthreads();
  return out;
}

// The side pass of threshold ternary over the row (a later pass: the latent is re-read).
template <typename Src>
__device__ Sides row_sides(const Src& src, int64_t n, float m, float d, Sides* sh) {
  Sides s{0.0, 0.0, 0.0, 0.0};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float r = src.again(i) - m;
    if (r >= d) {
      s.sum_pos += r;
      s.n_pos += 1.0;
    }
    if (r <= -d) {
      s.sum_neg += -r;
      s.n_neg += 1.0;
    }
  }
  return block_reduce_sides(s, sh);
}

__device__ float row_mean(double sum, int64_t n) {
  return n > 0 ? static_cast<float>(sum / static_cast<double>(n)) : 0.0f;
}

// Grid: one block of kThreads per row of the batch's parameters (rows in
// parameter order). sa: the source's per-launch arguments (StepArgs or none).
// flags[d.flag] is set to 1 when a row sees a non-finite x (never cleared).
template <typename Src>
__global__ void __launch_bounds__(kThreads)
    row_kernel(Batch batch, OpArgs a, typename Src::Args sa, int* flags) {
  __shared__ float sQ[kMaxK];
  __shared__ float sM[kMaxK];
  __shared__ Stats sh[kWarps + 1];
  __shared__ Sides shs[kWarps + 1];
  __shared__ RowQuant srq;

  int64_t row = blockIdx.x;
  int pi = 0;
  while (pi + 1 < batch.count && row >= batch.d[pi + 1].row_start) ++pi;
  const ParamDesc& d = batch.d[pi];
  row -= d.row_start;
  const int64_t n = d.cols;
  const Src src = Src::at(d, row * n, sa, a.gamma);
  const int K = static_cast<int>(a.K);
  float* Qg = d.Q + row * K;
  int bad = 0;

  if (a.update) {
    RowQuant rq{};
    rq.kind = static_cast<int>(a.quant_kind);
    const int b = static_cast<int>(a.bits);
    Stats s = row_stats(src, n, true, 0.0f, rq.v, 0, &bad, sh);
    if (a.center) {
      rq.m = row_mean(s.sum_x, n);
      s = row_stats(src, n, false, rq.m, rq.v, 0, &bad, sh);
    }
    switch (a.quant_kind) {
      case kUniform: {
        float qm = s.amax;
        if (!a.scale_max) qm = minf(static_cast<float>(b) * row_mean(s.sum_abs, n), qm);
        rq.qm = maxf(qm, kTiny);
        rq.r = static_cast<float>(ldexp(1.0, b - 1) - static_cast<double>(a.int_shift));
        rq.s = rq.qm / rq.r;
        rq.zp = a.zero_point;
        break;
      }
      case kTernaryUnif:
        rq.s = maxf(s.amax, kTiny) / 1.5f;
        break;
      case kAsym: {
        const float mn = n > 0 ? s.mn : 0.0f, mx = n > 0 ? s.mx : 0.0f;
        const float top = static_cast<float>((1 << b) - 1);
        rq.s = maxf((mx - mn) / top, kTiny);
        rq.z = rne(mn / rq.s);
        rq.ztop = rq.z + top;
        break;
      }
      case kLsbqTernary:
        rq.v[0] = a.ternary_mult * row_mean(s.sum_abs, n);
        break;
      case kTernaryThreshold: {  // D, then the sums and counts of each side (a second read)
        rq.thr = a.delta_factor * (a.delta_max ? s.amax : row_mean(s.sum_abs, n));
        const Sides t = row_sides(src, n, rq.m, rq.thr, shs);
        ternary_threshold_levels(rq, t.sum_pos, t.n_pos, t.sum_neg, t.n_neg);
        break;
      }
      default:  // greedy (optimal b = 1 is greedy)
        rq.nv = b;
        rq.v[0] = row_mean(s.sum_abs, n);
        for (int i = 1; i < b; ++i) {
          s = row_stats(src, n, false, rq.m, rq.v, i, &bad, sh);
          rq.v[i] = row_mean(s.sum_abs, n);
        }
    }
    if (threadIdx.x == 0) {
      fill_levels(rq, sQ, K);
      if (levels_need_sort(rq)) insertion_sort(sQ, K);
      for (int j = 0; j < K; ++j) {
        if (a.center) sQ[j] = sQ[j] + rq.m;
        Qg[j] = sQ[j];
      }
      srq = rq;
    }
    __syncthreads();
  } else {
    for (int j = threadIdx.x; j < K; j += kThreads) sQ[j] = Qg[j];
    __syncthreads();
    for (int j = threadIdx.x; j + 1 < K; j += kThreads) sM[j] = (sQ[j] + sQ[j + 1]) / 2;
    __syncthreads();
  }

  const bool writes = Src::kAlwaysWrites || a.prox_kind != kNone || a.gamma != 1.0f;
  if (!a.update || writes) {
    const bool uniform =
        a.quant_kind == kUniform || a.quant_kind == kTernaryUnif || a.quant_kind == kAsym;
    const Finder inter = make_finder(sQ, K, uniform);
    const Finder near = make_finder(sM, K - 1, uniform);
    const RowQuant rq = srq;
    // BinaryConnect: the latent clamped to the row's [gamma Q_0, gamma Q_{K-1}] (the
    // reference's float32 gamma * Q), x keeping the unclamped value (csrc/cpu/write_pass.h)
    const bool clamp = a.prox_kind == kBinaryConnect && K > 0;
    const float lo = clamp ? sQ[0] * a.gamma : 0.0f;
    const float hi = clamp ? sQ[K - 1] * a.gamma : 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      bool kept = false;
      const float x = a.update ? src.again(i) : src.first(i, kept);
      if (!a.update && (kept || !isfinite(x))) bad = 1;
      if (clamp) src.clamp_latent(i, lo, hi);
      if (!writes) continue;
      float y = x;
      if (needs_hard(a.prox_kind)) {
        float h;
        if (a.update) {
          h = a.center ? quant_q(rq, x - rq.m) + rq.m : quant_q(rq, x);
        } else {
          h = sQ[count_less(near, x)];
        }
        if (a.prox_kind == kHard || a.prox_kind == kBinaryConnect) {
          y = h;
        } else if (a.prox_kind == kRelax) {
          y = a.relax_keep * x + a.prox_arg * h;
        } else if (a.prox_kind == kProxQuantL1) {
          y = prox_quant_l1(x, h, a.prox_arg);
        } else {
          y = prox_quant_l2(x, h, a.prox_arg, a.l2_denom);
        }
      } else if (a.prox_kind == kSoft || a.prox_kind == kParq) {
        const int j = count_less(inter, x);
        const float lo = sQ[j > 0 ? j - 1 : 0];
        const float hi = sQ[j < K - 1 ? j : K - 1];
        y = a.prox_kind == kSoft ? prox_soft(x, lo, hi, a.prox_arg, a.soft_denom)
                                 : prox_parq(x, lo, hi, a.prox_arg);
      }
      src.store(i, isfinite(x) ? y : x);  // a non-finite x is written as it is
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) flags[d.flag] = 1;
}

// What the row kernel cannot serve, as clear errors (before anything is written).
inline void check_rows_supported(const char* op, const OpArgs& a, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cuda(), op, " (cuda): params[", i, "] must be a CUDA tensor");
  }
  TORCH_CHECK(!(a.quant_kind == kLsbqOptimal && a.bits != 1), op,
              " (cuda): optimal LSBQ with bits 0 or 2 is not implemented in the CUDA kernels; "
              "use the triton or reference backend");
  TORCH_CHECK(a.K <= kMaxK, op, " (cuda): at most ", kMaxK, " levels per row, got K=", a.K);
}

// The descriptor of parameter i (step pointers null; the caller adds them).
inline ParamDesc make_desc(const at::Tensor& p, const at::Tensor& lat, const at::Tensor& Q,
                           size_t i) {
  ParamDesc d{};
  d.p = p.data_ptr();
  d.lat = lat.data_ptr();
  d.Q = Q.data_ptr<float>();
  d.rows = p.size(0);
  d.cols = p.size(1);
  d.flag = static_cast<int>(i);
  return d;
}

// One launch of row_kernel<Src> per kMaxParams descriptors (parameters with at
// least one row); row_start is relative to the launch.
template <typename Src>
void launch_rows(const std::vector<ParamDesc>& descs, const OpArgs& a,
                 const typename Src::Args& sa, int* flags, cudaStream_t stream, const char* op) {
  for (size_t start = 0; start < descs.size(); start += kMaxParams) {
    Batch batch{};
    int64_t total_rows = 0;
    for (size_t k = start; k < descs.size() && k < start + kMaxParams; ++k) {
      batch.d[batch.count] = descs[k];
      batch.d[batch.count].row_start = total_rows;
      total_rows += descs[k].rows;
      ++batch.count;
    }
    TORCH_CHECK(total_rows < (int64_t{1} << 31), op, " (cuda): too many rows in one call");
    row_kernel<Src><<<static_cast<unsigned>(total_rows), kThreads, 0, stream>>>(batch, a, sa,
                                                                              flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace parq

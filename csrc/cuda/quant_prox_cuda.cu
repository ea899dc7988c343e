// CUDA kernels of parq_kernels_C::quant_prox_ (contract: parq_kernels/ops.py).
//
// One thread block per row (quantization group), all parameters of a call in
// one launch per kMaxParams parameters (their descriptors travel as a kernel
// argument, so nothing is copied to the device and nothing syncs). On the
// current stream. The math is the shared levels.h, like the CPU kernels.
//
// Passes over a row (update steps): statistics (+ latent copy, finiteness) ->
// [centered statistics] -> [one pass per further greedy bit] -> levels (thread
// 0, shared memory) -> write pass. Without update: the stored levels are
// loaded into shared memory and one pass copies, checks, projects and writes.
// Reductions use a fixed thread-to-element map and a fixed tree: deterministic.
//
// Not supported here (clear error): optimal LSBQ with b in {0, 2} (needs a
// per-row sort; use the triton or reference backend) and K > kMaxK levels.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../levels.h"
#include "../quant_prox.h"

namespace parq {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxParams = 40;
constexpr int kMaxK = 1024;

struct ParamDesc {
  void* p;
  void* lat;
  float* Q;
  int64_t rows;
  int64_t cols;
  int64_t row_start;  // first global row of this parameter in the launch
  int flag;           // index into nonfinite
};

struct Batch {
  ParamDesc d[kMaxParams];
  int count;
};

struct Stats {
  double sum_x;    // sum of x - m
  double sum_abs;  // sum |r| (r: x - m after the replayed greedy steps)
  float amax;      // max |r|
  float mn;        // min of x - m
  float mx;        // max of x - m
};

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

template <typename T>
__device__ float load_x(const T* p, int64_t i, float gamma) {
  const float x = static_cast<float>(p[i]);
  return gamma != 1.0f ? x / gamma : x;
}

// One statistics pass of x - m through nv replayed greedy steps; the first pass
// (lat != nullptr) also copies the latent and checks finiteness.
template <typename T>
__device__ Stats row_stats(const T* p, T* lat, int64_t n, float gamma, float m, const float* v,
                           int nv, int* bad, Stats* sh) {
  Stats s{0.0, 0.0, 0.0f, INFINITY, -INFINITY};
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    if (lat != nullptr) lat[i] = p[i];
    const float x = load_x(p, i, gamma);
    if (lat != nullptr && !isfinite(x)) *bad = 1;
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

__device__ float row_mean(double sum, int64_t n) {
  return n > 0 ? static_cast<float>(sum / static_cast<double>(n)) : 0.0f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) quant_prox_kernel(Batch batch, OpArgs a, int* flags) {
  __shared__ float sQ[kMaxK];
  __shared__ float sM[kMaxK];
  __shared__ Stats sh[kWarps + 1];
  __shared__ RowQuant srq;

  int64_t row = blockIdx.x;
  int pi = 0;
  while (pi + 1 < batch.count && row >= batch.d[pi + 1].row_start) ++pi;
  const ParamDesc& d = batch.d[pi];
  row -= d.row_start;
  const int64_t n = d.cols;
  T* p = static_cast<T*>(d.p) + row * n;
  T* lat = static_cast<T*>(d.lat) + row * n;
  const int K = static_cast<int>(a.K);
  float* Qg = d.Q + row * K;
  int bad = 0;

  if (a.update) {
    RowQuant rq{};
    rq.kind = static_cast<int>(a.quant_kind);
    const int b = static_cast<int>(a.bits);
    Stats s = row_stats(p, lat, n, a.gamma, 0.0f, rq.v, 0, &bad, sh);
    if (a.center) {
      rq.m = row_mean(s.sum_x, n);
      s = row_stats(p, static_cast<T*>(nullptr), n, a.gamma, rq.m, rq.v, 0, &bad, sh);
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
      default:  // greedy (optimal b = 1 is greedy)
        rq.nv = b;
        rq.v[0] = row_mean(s.sum_abs, n);
        for (int i = 1; i < b; ++i) {
          s = row_stats(p, static_cast<T*>(nullptr), n, a.gamma, rq.m, rq.v, i, &bad, sh);
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

  const bool writes = a.prox_kind != kNone || a.gamma != 1.0f;
  if (!a.update || writes) {
    const bool uniform =
        a.quant_kind == kUniform || a.quant_kind == kTernaryUnif || a.quant_kind == kAsym;
    const Finder inter = make_finder(sQ, K, uniform);
    const Finder near = make_finder(sM, K - 1, uniform);
    const RowQuant rq = srq;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      if (!a.update) lat[i] = p[i];
      const float x = load_x(p, i, a.gamma);
      if (!a.update && !isfinite(x)) bad = 1;
      if (!writes) continue;
      float y = x;
      if (a.prox_kind == kHard || a.prox_kind == kRelax) {
        float h;
        if (a.update) {
          h = a.center ? quant_q(rq, x - rq.m) + rq.m : quant_q(rq, x);
        } else {
          h = sQ[count_less(near, x)];
        }
        y = a.prox_kind == kHard ? h : a.relax_keep * x + a.prox_arg * h;
      } else if (a.prox_kind == kSoft || a.prox_kind == kParq) {
        const int j = count_less(inter, x);
        const float lo = sQ[j > 0 ? j - 1 : 0];
        const float hi = sQ[j < K - 1 ? j : K - 1];
        y = a.prox_kind == kSoft ? prox_soft(x, lo, hi, a.prox_arg, a.soft_denom)
                                 : prox_parq(x, lo, hi, a.prox_arg);
      }
      p[i] = static_cast<T>(y);
    }
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) flags[d.flag] = 1;
}

// One launch per kMaxParams parameters; row_start is relative to the launch.
template <typename T>
void launch(const std::vector<ParamDesc>& descs, const OpArgs& a, int* flags, cudaStream_t stream) {
  for (size_t start = 0; start < descs.size(); start += kMaxParams) {
    Batch batch{};
    int64_t total_rows = 0;
    for (size_t k = start; k < descs.size() && k < start + kMaxParams; ++k) {
      batch.d[batch.count] = descs[k];
      batch.d[batch.count].row_start = total_rows;
      total_rows += descs[k].rows;
      ++batch.count;
    }
    TORCH_CHECK(total_rows < (int64_t{1} << 31), "quant_prox_ (cuda): too many rows in one call");
    quant_prox_kernel<T><<<static_cast<unsigned>(total_rows), kThreads, 0, stream>>>(batch, a,
                                                                                     flags);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

void quant_prox_cuda(at::TensorList params, at::TensorList latents, at::TensorList quants,
                     const at::Tensor& nonfinite, int64_t quant_kind, int64_t bits,
                     c10::ArrayRef<double> qargs, bool center, bool update, int64_t prox_kind,
                     double prox_arg, double gamma) {
  const OpArgs a = validate_args(params, latents, quants, nonfinite, quant_kind, bits, qargs,
                                 center, update, prox_kind, prox_arg, gamma);
  if (params.empty()) return;
  TORCH_CHECK(params[0].is_cuda(), "quant_prox_ (cuda): params must be CUDA tensors");
  TORCH_CHECK(!(quant_kind == kLsbqOptimal && bits != 1),
              "quant_prox_ (cuda): optimal LSBQ with bits 0 or 2 is not implemented in the CUDA "
              "kernels; use the triton or reference backend");
  TORCH_CHECK(a.K <= kMaxK, "quant_prox_ (cuda): at most ", kMaxK, " levels per row, got K=", a.K);
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::vector<ParamDesc> descs;
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].is_cuda(), "quant_prox_ (cuda): params[", i, "] must be a CUDA tensor");
    const int64_t rows = params[i].size(0);
    if (rows == 0) continue;
    descs.push_back(ParamDesc{params[i].data_ptr(), latents[i].data_ptr(),
                              quants[i].data_ptr<float>(), rows, params[i].size(1), 0,
                              static_cast<int>(i)});
  }
  if (descs.empty()) return;
  int* flags = nonfinite.data_ptr<int>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (params[0].scalar_type()) {
    case at::kFloat:
      launch<float>(descs, a, flags, stream);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(descs, a, flags, stream);
      break;
    default:
      launch<c10::Half>(descs, a, flags, stream);
  }
}

}  // namespace parq

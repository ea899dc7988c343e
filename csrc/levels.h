// Per-element math of the fused op, shared by the CPU and CUDA kernels.
//
// Everything here is plain float32 arithmetic written in the same order as
// parq_kernels/reference.py, so that a kernel's q is bitwise one of its Q and
// its prox outputs match the reference to a few ulp (SPEC.md §3-§4, §6).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define PARQ_HD __host__ __device__ __forceinline__
#else
#define PARQ_HD inline __attribute__((always_inline))
#endif

namespace parq {

// Mirrors parq_kernels.ops.QuantKind / ProxKind.
enum QuantKind : int64_t {
  kUniform = 0,
  kTernaryUnif = 1,
  kAsym = 2,
  kLsbqGreedy = 3,
  kLsbqTernary = 4,
  kLsbqOptimal = 5,
  kTernaryThreshold = 6,
};
// BINARYCONNECT (7): p = hard(x) and the latent clamped to the row's [gamma Q_0,
// gamma Q_{K-1}]; every kernel clamps inside its write pass.
enum ProxKind : int64_t {
  kNone = 0,
  kHard = 1,
  kSoft = 2,
  kParq = 3,
  kRelax = 4,
  kProxQuantL1 = 5,
  kProxQuantL2 = 6,
  kBinaryConnect = 7,
};

// Prox kinds whose projection needs hard(x).
PARQ_HD bool needs_hard(int64_t kind) {
  return kind == kHard || kind == kRelax || kind == kProxQuantL1 || kind == kProxQuantL2 ||
         kind == kBinaryConnect;
}

constexpr float kTiny = 1.17549435082228750797e-38f;  // torch.finfo(float32).tiny
constexpr int kMaxGreedyBits = 16;
constexpr int kCompareCountMax = 16;  // compare-count lookup up to this many entries

// Round half to even (torch.round), exact for every float.
PARQ_HD float rne(float v) {
#ifdef __CUDA_ARCH__
  return rintf(v);
#else
  const float a = std::fabs(v);
  float r = (a + 8388608.0f) - 8388608.0f;  // 2^23: the sum's ulp is 1, ties go even
  r = std::copysign(r, v);
  return a < 8388608.0f ? r : v;  // |v| >= 2^23 (or NaN) is already integral
#endif
}

// +1 for v >= 0, -1 otherwise (SPEC.md §2).
PARQ_HD float sgn(float v) { return v >= 0.0f ? 1.0f : -1.0f; }

// torch.clamp(v, lo, hi) = min(max(v, lo), hi) for non-NaN v (plain compares:
// fminf/fmaxf are library calls on x86-64 without -ffast-math).
PARQ_HD float maxf(float a, float b) { return a > b ? a : b; }
PARQ_HD float minf(float a, float b) { return a < b ? a : b; }
PARQ_HD float clampf(float v, float lo, float hi) { return minf(maxf(v, lo), hi); }

// #{j : a_j < x} over a sorted array a[0..n), i.e. torch.bucketize(x, a, right=False).
// Mode: compare-count (n <= kCompareCountMax), arithmetic guess + exact
// correction (near-uniform levels of the uniform kinds), or binary search.
struct Finder {
  const float* a;
  int n;
  int mode;  // 0 compare-count, 1 arithmetic, 2 binary search
  float a0;
  float inv_step;
};

PARQ_HD Finder make_finder(const float* a, int n, bool uniform) {
  Finder f{a, n, 2, 0.0f, 0.0f};
  if (n <= kCompareCountMax) {
    f.mode = 0;
  } else if (uniform) {
    const float inv = static_cast<float>(n - 1) / (a[n - 1] - a[0]);
    if (inv > 0.0f && inv < INFINITY) {
      f.mode = 1;
      f.a0 = a[0];
      f.inv_step = inv;
    }
  }
  return f;
}

PARQ_HD int binary_count(const float* a, int n, float x) {
  int lo = 0, hi = n;  // first index with !(a_j < x)
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (a[mid] < x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

PARQ_HD int count_less(const Finder& f, float x) {
  const float* a = f.a;
  const int n = f.n;
  if (f.mode == 0) {
    int c = 0;
    for (int j = 0; j < n; ++j) c += a[j] < x ? 1 : 0;
    return c;
  }
  if (f.mode == 1) {
    const float t = clampf((x - f.a0) * f.inv_step, 0.0f, static_cast<float>(n));
    int g = static_cast<int>(t);  // ceil(t), t in [0, n]
    g += static_cast<float>(g) < t ? 1 : 0;
    // one exact correction step each way (branch-free); verify, else search
    g -= (g > 0 && !(a[g > 0 ? g - 1 : 0] < x)) ? 1 : 0;
    g += (g < n && a[g < n ? g : n - 1] < x) ? 1 : 0;
    const bool ok = (g == 0 || a[g > 0 ? g - 1 : 0] < x) && (g == n || !(a[g < n ? g : n - 1] < x));
    return ok ? g : binary_count(a, n, x);
  }
  return binary_count(a, n, x);
}

// The quantizer of one row once its statistics are known: q(x) for the centered
// value x, and the row's level set (SPEC.md §3).
struct RowQuant {
  int kind;
  int nv;    // greedy / optimal: number of v values used by q
  float m;   // center shift (0 when not centering)
  float s;   // uniform / ternary-unif / asym scale
  float qm;  // uniform clip
  float zp;  // uniform zero point
  float r;   // uniform half range
  float z;   // asym lowest integer level
  float ztop;
  float thr;  // threshold ternary: D (v[0] = a_pos, v[1] = a_neg)
  float v[kMaxGreedyBits];
};

PARQ_HD float q_uniform(const RowQuant& rq, float x) {
  const float t = clampf(x, -rq.qm, rq.qm) / rq.s - rq.zp;
  return (rne(t) + rq.zp) * rq.s;
}
PARQ_HD float q_ternary_unif(const RowQuant& rq, float x) {
  return clampf(rne(x / rq.s), -1.0f, 1.0f) * rq.s;
}
PARQ_HD float q_asym(const RowQuant& rq, float x) {
  return clampf(rne(x / rq.s), rq.z, rq.ztop) * rq.s;
}
PARQ_HD float q_lsbq_ternary(const RowQuant& rq, float x) {
  const float v = rq.v[0];
  return x <= -v / 2 ? -v : (x <= v / 2 ? 0.0f : v);
}
// Threshold ternary (SPEC.md §9): a_pos where x >= D, -a_neg where x <= -D, else 0.
PARQ_HD float q_ternary_threshold(const RowQuant& rq, float x) {
  return x >= rq.thr ? rq.v[0] : (x <= -rq.thr ? -rq.v[1] : 0.0f);
}
// The side levels from the sums and counts of each side (SPEC.md §9): an empty side takes
// the other side's value, both empty max(D, tiny). Sums in double, one rounding each.
PARQ_HD void ternary_threshold_levels(RowQuant& rq, double sum_pos, double n_pos,
                                      double sum_neg, double n_neg) {
  const float both = maxf(rq.thr, kTiny);
  const float ap = n_pos > 0.0 ? static_cast<float>(sum_pos / n_pos) : 0.0f;
  const float an = n_neg > 0.0 ? static_cast<float>(sum_neg / n_neg) : 0.0f;
  rq.v[0] = n_pos > 0.0 ? ap : (n_neg > 0.0 ? an : both);
  rq.v[1] = n_neg > 0.0 ? an : (n_pos > 0.0 ? ap : both);
}
PARQ_HD float q_optimal_ternary(const RowQuant& rq, float x) {  // A = v[0]
  const float half = rq.v[0] / 2;
  const float s = sgn(x);
  return (s + sgn(x - s * half)) * half;
}
// Greedy (and optimal b = 1, 2): q = sum_i v_i sgn(r_{i-1}).
PARQ_HD float q_binary(const RowQuant& rq, float x) {
  float q = 0.0f, r = x;
  for (int i = 0; i < rq.nv; ++i) {
    const float step = r >= 0.0f ? rq.v[i] : -rq.v[i];
    q = q + step;
    r = r - step;
  }
  return q;
}

PARQ_HD float quant_q(const RowQuant& rq, float x) {
  switch (rq.kind) {
    case kUniform:
      return q_uniform(rq, x);
    case kTernaryUnif:
      return q_ternary_unif(rq, x);
    case kAsym:
      return q_asym(rq, x);
    case kLsbqTernary:
      return q_lsbq_ternary(rq, x);
    case kTernaryThreshold:
      return q_ternary_threshold(rq, x);
    case kLsbqOptimal:
      if (rq.nv == 0) return q_optimal_ternary(rq, x);
      return q_binary(rq, x);
    default:
      return q_binary(rq, x);
  }
}

// Writes the K levels of a binary-sum quantizer: 0 + (±v_0) + (±v_1) + ... (unsorted).
PARQ_HD void binary_levels(const float* v, int nv, float* Q) {
  const int K = 1 << nv;
  for (int c = 0; c < K; ++c) {
    float acc = 0.0f;
    for (int i = 0; i < nv; ++i) acc = acc + (((c >> (nv - 1 - i)) & 1) ? v[i] : -v[i]);
    Q[c] = acc;
  }
}

PARQ_HD void insertion_sort(float* a, int n) {
  for (int i = 1; i < n; ++i) {
    const float key = a[i];
    int j = i - 1;
    while (j >= 0 && a[j] > key) {
      a[j + 1] = a[j];
      --j;
    }
    a[j + 1] = key;
  }
}

// The level set of a row (K entries), before the center shift. Binary-sum levels
// (greedy, optimal b >= 1) come out unsorted: the caller sorts them
// (levels_need_sort), then adds the center shift.
PARQ_HD bool levels_need_sort(const RowQuant& rq) {
  return rq.kind == kLsbqGreedy || (rq.kind == kLsbqOptimal && rq.nv > 0);
}

PARQ_HD void fill_levels(const RowQuant& rq, float* Q, int K) {
  switch (rq.kind) {
    case kUniform:
      for (int j = 0; j < K; ++j) Q[j] = (static_cast<float>(j) - rq.r) * rq.s;
      return;
    case kTernaryUnif:
      Q[0] = -rq.s;
      Q[1] = 0.0f;
      Q[2] = rq.s;
      return;
    case kAsym:
      for (int j = 0; j < K; ++j) Q[j] = (rq.z + static_cast<float>(j)) * rq.s;
      return;
    case kTernaryThreshold:
      Q[0] = -rq.v[1];
      Q[1] = 0.0f;
      Q[2] = rq.v[0];
      return;
    default:
      if (levels_need_sort(rq)) {
        binary_levels(rq.v, rq.nv, Q);
      } else {  // LSBQ ternary, optimal ternary
        Q[0] = -rq.v[0];
        Q[1] = 0.0f;
        Q[2] = rq.v[0];
      }
  }
}

// Soft quantization inside [lo, hi] (SPEC.md §4); denom = sigmoid(T/2) - 1/2.
PARQ_HD float prox_soft(float x, float lo, float hi, float T, float denom) {
  const float c = (lo + hi) / 2;
  const float d = (hi - lo) / 2;
  const float u = (clampf(x, lo, hi) - lo) / (hi - lo + 1e-12f);
  const float sig = 1.0f / (1.0f + expf(-(T * (u - 0.5f))));
  return c + d * (sig - 0.5f) / denom;
}

// ProxQuant, l1 penalty: h + sgn(x - h) max(|x - h| - lam, 0) (SPEC.md §9).
PARQ_HD float prox_quant_l1(float x, float h, float lam) {
  const float d = x - h;
  const float m = maxf((d >= 0.0f ? d : -d) - lam, 0.0f);  // |d| (plain compare: host and device)
  return h + (d >= 0.0f ? m : -m);
}

// ProxQuant, l2 penalty: (x + lam h) / (1 + lam), with denom = 1 + lam rounded once.
PARQ_HD float prox_quant_l2(float x, float h, float lam, float denom) {
  return (x + lam * h) / denom;
}

// PARQ: clamp(c + (x - c) / rho, lo, hi) with c the interval's midpoint.
PARQ_HD float prox_parq(float x, float lo, float hi, float rho) {
  const float c = (lo + hi) / 2;
  return clampf(c + (x - c) / rho, lo, hi);
}

}  // namespace parq

// CPU kernels of parq_kernels_C::pack_, unpack_ and dequantize_ (SPEC.md §10; contract:
// parq_kernels/pack_ops.py).
//
// A stream of w-bit indices is cut into groups of 8 elements, which fill exactly w
// bytes: element k of group g sits at bits [k*w, (k+1)*w) of the little-endian word
// made of bytes [g*w, g*w + w). With BMI2 (x86-64-v3 builds), one pext / pdep moves
// the 8 indices (one per byte of a 64-bit word) into / out of that word; otherwise a
// shift loop does. Dequantize checks and clamps the 8 indices of a group at once (SSE2)
// and reads the levels from a per-row table in the output dtype. Groups are independent:
// at::parallel_for over groups (the result does not depend on the thread count); the
// last, partial group is read and written byte by byte.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "level.h"

PARQ_CPU_BEGIN
namespace {

static_assert(std::endian::native == std::endian::little, "the packed stream is little-endian");

constexpr int64_t kGrain = 4096;  // groups of 8 elements per parallel task, at least

constexpr uint64_t lane_mask(int w) { return 0x0101010101010101ull * ((1ull << w) - 1); }

// 8 indices (one per byte of x; the low w bits of each are kept) -> the 8w-bit word.
template <int W>
inline uint64_t compress8(uint64_t x) {
#if defined(__BMI2__)
  return _pext_u64(x, lane_mask(W));
#else
  uint64_t acc = 0;
  for (int k = 0; k < 8; ++k) acc |= ((x >> (8 * k)) & ((1ull << W) - 1)) << (k * W);
  return acc;
#endif
}

// The inverse: the 8w-bit word -> 8 indices, one per byte.
template <int W>
inline uint64_t expand8(uint64_t acc) {
#if defined(__BMI2__)
  return _pdep_u64(acc, lane_mask(W));
#else
  uint64_t x = 0;
  for (int k = 0; k < 8; ++k) x |= ((acc >> (k * W)) & ((1ull << W) - 1)) << (8 * k);
  return x;
#endif
}

int64_t stream_bytes(int64_t n, int64_t w) { return (n * w + 7) / 8; }

// The w bytes of group g of a stream of nbytes bytes, as a little-endian word: one 8-byte
// load (masked) where the stream holds 8 bytes from there, else byte by byte. (Filling a
// zeroed word with a w-byte memcpy goes through the stack and stalls store forwarding.)
template <int W>
inline uint64_t load_group(const uint8_t* in, int64_t g, int64_t nbytes) {
  const int64_t o = W * g;
  uint64_t v = 0;
  if (o + 8 <= nbytes) {
    std::memcpy(&v, in + o, 8);
    if constexpr (W < 8) v &= (uint64_t{1} << (8 * W)) - 1;
  } else {
    const int64_t m = std::min<int64_t>(W, nbytes - o);
    for (int64_t k = 0; k < m; ++k) v |= uint64_t{in[o + k]} << (8 * k);
  }
  return v;
}

// The tasks copy the pointers into locals: a uint8_t store may alias anything, and the
// compiler would reload pointers captured by reference after every one.
template <int W>
void pack_one(const uint8_t* idx, uint8_t* out, int64_t n) {
  const int64_t full = n / 8, rest = n % 8;
  at::parallel_for(0, full, kGrain, [&](int64_t b, int64_t e) {
    const uint8_t* const src = idx;
    uint8_t* const dst = out;
    for (int64_t g = b; g < e; ++g) {
      uint64_t x;
      std::memcpy(&x, src + 8 * g, 8);
      const uint64_t acc = compress8<W>(x);
      std::memcpy(dst + W * g, &acc, W);
    }
  });
  if (rest) {
    uint64_t x = 0;
    std::memcpy(&x, idx + 8 * full, rest);
    const uint64_t acc = compress8<W>(x);
    std::memcpy(out + W * full, &acc, stream_bytes(rest, W));
  }
}

template <int W>
void unpack_one(const uint8_t* in, uint8_t* idx, int64_t n) {
  const int64_t full = n / 8, rest = n % 8, nbytes = stream_bytes(n, W);
  at::parallel_for(0, full, kGrain, [&](int64_t b, int64_t e) {
    const uint8_t* const src = in;
    uint8_t* const dst = idx;
    for (int64_t g = b; g < e; ++g) {
      const uint64_t x = expand8<W>(load_group<W>(src, g, nbytes));
      std::memcpy(dst + 8 * g, &x, 8);
    }
  });
  if (rest) {
    const uint64_t x = expand8<W>(load_group<W>(in, full, nbytes));
    std::memcpy(idx + 8 * full, &x, rest);
  }
}

// Clamps the 8 indices of x (one per byte) to top; sets flag if one was above it.
inline uint64_t clamp8(uint64_t x, uint32_t top, uint32_t& flag) {
#if defined(__SSE2__)
  const __m128i v = _mm_cvtsi64_si128(static_cast<long long>(x));
  const __m128i c = _mm_min_epu8(v, _mm_set1_epi8(static_cast<char>(top)));
  flag |= static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(c, v)) ^ 0xFFFF);
  return static_cast<uint64_t>(_mm_cvtsi128_si64(c));
#else
  uint64_t out = 0;
  for (int k = 0; k < 8; ++k) {
    uint64_t b = (x >> (8 * k)) & 0xffu;
    if (b > top) {
      flag = 1;
      b = top;
    }
    out |= b << (8 * k);
  }
  return out;
#endif
}

constexpr int64_t kChunkGroups = 512;  // groups unpacked at a time (4096 indices)

// out (rows, cols) = lev[row, index] over the groups [b, e) of a stream of n = rows * cols
// elements, converted like Tensor.to (through float32). Chunk by chunk, the indices are
// unpacked (and, with CLAMP, i.e. K < 2**W, clamped to K - 1, setting the returned flag),
// then gathered row segment by row segment: from a table of the row's levels already in T
// when rows are at least K long, else converting each level read.
template <int W, bool CLAMP, typename L, typename T>
uint32_t dequantize_groups(const uint8_t* in, const L* lev, T* out, int64_t n, int64_t cols,
                           int64_t K, int64_t b, int64_t e) {
  const int64_t nbytes = stream_bytes(n, W);
  const uint32_t top = static_cast<uint32_t>(K - 1);
  const int64_t reach = std::min<int64_t>(K, 256);  // levels a uint8 index can reach
  const bool use_table = cols >= reach;
  alignas(64) uint8_t buf[8 * kChunkGroups];
  T table[256];
  int64_t table_row = -1;
  uint32_t flag = 0;
  for (int64_t g0 = b; g0 < e; g0 += kChunkGroups) {
    const int64_t g1 = std::min(e, g0 + kChunkGroups);
    for (int64_t g = g0; g < g1; ++g) {
      uint64_t x = 0;
      if constexpr (W > 0) x = expand8<W>(load_group<W>(in, g, nbytes));
      if constexpr (CLAMP) x = clamp8(x, top, flag);
      std::memcpy(buf + 8 * (g - g0), &x, 8);
    }
    const int64_t e0 = 8 * g0, e1 = std::min(n, 8 * g1);
    for (int64_t s = e0; s < e1;) {
      const int64_t r = s / cols;
      const int64_t len = std::min(e1, (r + 1) * cols) - s;
      const uint8_t* idx = buf + (s - e0);
      T* o = out + s;
      if (use_table) {
        if (r != table_row) {
          for (int64_t j = 0; j < reach; ++j) {
            table[j] = static_cast<T>(static_cast<float>(lev[r * K + j]));
          }
          table_row = r;
        }
        for (int64_t k = 0; k < len; ++k) o[k] = table[idx[k]];
      } else {
        const L* row = lev + r * K;
        for (int64_t k = 0; k < len; ++k) o[k] = static_cast<T>(static_cast<float>(row[idx[k]]));
      }
      s += len;
    }
  }
  return flag;
}

template <int W, typename L, typename T>
bool dequantize_one(const uint8_t* in, const L* lev, T* out, int64_t rows, int64_t cols,
                    int64_t K) {
  const int64_t n = rows * cols;
  std::atomic<bool> bad{false};
  at::parallel_for(0, (n + 7) / 8, kGrain, [&](int64_t b, int64_t e) {
    const bool clamp = K < (int64_t{1} << W);
    const uint32_t flag = clamp ? dequantize_groups<W, true>(in, lev, out, n, cols, K, b, e)
                                : dequantize_groups<W, false>(in, lev, out, n, cols, K, b, e);
    if (flag) bad.store(true, std::memory_order_relaxed);
  });
  return bad.load();
}

template <typename F>
void with_width(int64_t w, F&& f) {
  switch (w) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{});
  }
}

template <typename F>
void with_float_type(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: f(c10::BFloat16{});
  }
}

void check_stream(const char* op, size_t i, const at::Tensor& data, int64_t numel,
                  int64_t width) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.dim() == 1 && data.is_contiguous() &&
                  data.device().is_cpu(),
              op, ": packed[", i, "] must be a contiguous 1-D uint8 CPU tensor, got ",
              data.scalar_type(), " of shape ", data.sizes(), " on ", data.device());
  TORCH_CHECK(data.numel() == stream_bytes(numel, width), op, ": packed[", i, "] holds ",
              data.numel(), " bytes, ", numel, " elements of ", width, " bits need ",
              stream_bytes(numel, width));
}

void check_indices(const char* op, at::TensorList indices, at::TensorList packed, int64_t width) {
  TORCH_CHECK(width >= 0 && width <= 8, op, ": width must be in 0..8, got ", width);
  TORCH_CHECK(indices.size() == packed.size(), op, ": ", indices.size(),
              " index tensors but ", packed.size(), " streams");
  for (size_t i = 0; i < indices.size(); ++i) {
    const at::Tensor& idx = indices[i];
    TORCH_CHECK(idx.scalar_type() == at::kByte && idx.is_contiguous() && idx.device().is_cpu(),
                op, ": indices[", i, "] must be a contiguous uint8 CPU tensor, got ",
                idx.scalar_type(), " on ", idx.device());
    check_stream(op, i, packed[i], idx.numel(), width);
  }
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

void pack_level(at::TensorList indices, at::TensorList packed, int64_t width) {
  check_indices("pack_", indices, packed, width);
  if (width == 0) return;
  for (size_t i = 0; i < indices.size(); ++i) {
    const uint8_t* src = indices[i].data_ptr<uint8_t>();
    uint8_t* dst = packed[i].data_ptr<uint8_t>();
    const int64_t n = indices[i].numel();
    if (n == 0) continue;
    with_width(width, [&](auto w) {
      if constexpr (decltype(w)::value > 0) pack_one<decltype(w)::value>(src, dst, n);
    });
  }
}

void unpack_level(at::TensorList packed, at::TensorList indices, int64_t width) {
  check_indices("unpack_", indices, packed, width);
  for (size_t i = 0; i < indices.size(); ++i) {
    uint8_t* dst = indices[i].data_ptr<uint8_t>();
    const int64_t n = indices[i].numel();
    if (n == 0) continue;
    if (width == 0) {
      std::memset(dst, 0, static_cast<size_t>(n));
      continue;
    }
    const uint8_t* src = packed[i].data_ptr<uint8_t>();
    with_width(width, [&](auto w) {
      if constexpr (decltype(w)::value > 0) unpack_one<decltype(w)::value>(src, dst, n);
    });
  }
}

void dequantize_level(at::TensorList packed, at::TensorList levels, at::TensorList out,
                    const at::Tensor& bad, int64_t width) {
  const char* op = "dequantize_";
  TORCH_CHECK(width >= 0 && width <= 8, op, ": width must be in 0..8, got ", width);
  TORCH_CHECK(packed.size() == levels.size() && levels.size() == out.size(), op,
              ": packed, levels and out must have the same length, got ", packed.size(), ", ",
              levels.size(), ", ", out.size());
  TORCH_CHECK(bad.scalar_type() == at::kInt && bad.dim() == 1 &&
                  bad.numel() == static_cast<int64_t>(out.size()) && bad.is_contiguous() &&
                  bad.device().is_cpu(),
              op, ": bad must be a contiguous int32 CPU tensor of shape (", out.size(), ",)");
  int32_t* flags = bad.data_ptr<int32_t>();
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor& o = out[i];
    const at::Tensor& Q = levels[i];
    TORCH_CHECK(o.dim() == 2 && o.is_contiguous() && o.device().is_cpu() &&
                    is_float_type(o.scalar_type()) && o.scalar_type() == out[0].scalar_type(),
                op, ": out[", i, "] must be a contiguous 2-D ", out[0].scalar_type(),
                " CPU tensor (float32, float16 or bfloat16), got ", o.scalar_type(), " ",
                o.sizes());
    TORCH_CHECK(Q.dim() == 2 && Q.size(0) == o.size(0) && Q.is_contiguous() &&
                    Q.device().is_cpu() && is_float_type(Q.scalar_type()) &&
                    Q.scalar_type() == levels[0].scalar_type() &&
                    (o.numel() == 0 || Q.size(1) >= 1),
                op, ": levels[", i, "] must be a contiguous ", levels[0].scalar_type(),
                " CPU tensor of shape (", o.size(0), ", K >= 1), got ", Q.scalar_type(), " ",
                Q.sizes());
    check_stream(op, i, packed[i], o.numel(), width);
  }
  for (size_t i = 0; i < out.size(); ++i) {
    const at::Tensor& o = out[i];
    if (o.numel() == 0) continue;
    const at::Tensor& Q = levels[i];
    const uint8_t* src = packed[i].numel() ? packed[i].data_ptr<uint8_t>() : nullptr;
    bool flag = false;
    with_width(width, [&](auto w) {
      with_float_type(Q.scalar_type(), [&](auto l) {
        using L = decltype(l);
        with_float_type(o.scalar_type(), [&](auto t) {
          using T = decltype(t);
          flag = dequantize_one<decltype(w)::value, L, T>(src, Q.data_ptr<L>(), o.data_ptr<T>(),
                                                          o.size(0), o.size(1), Q.size(1));
        });
      });
    });
    if (flag) flags[i] = 1;
  }
}

PARQ_CPU_END

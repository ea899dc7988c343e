// CPU kernels of parq_kernels_C::pack_, unpack_ and dequantize_ (SPEC.md §10; contract:
// parq_kernels/pack_ops.py).
//
// A stream of w-bit indices is cut into groups of 8 elements, which fill exactly w
// bytes: element k of group g sits at bits [k*w, (k+1)*w) of the little-endian word
// made of bytes [g*w, g*w + w). With BMI2 (x86-64-v3 builds), one pext / pdep moves
// the 8 indices (one per byte of a 64-bit word) into / out of that word; otherwise a
// shift loop does. Groups are independent: at::parallel_for over groups (the result
// does not depend on the thread count); the last, partial group goes through a
// zero-padded word.
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

#if defined(__BMI2__)
#include <immintrin.h>
#endif

#include "../pack.h"

namespace parq {
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

template <int W>
void pack_one(const uint8_t* idx, uint8_t* out, int64_t n) {
  const int64_t full = n / 8, rest = n % 8;
  at::parallel_for(0, full, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      uint64_t x;
      std::memcpy(&x, idx + 8 * g, 8);
      const uint64_t acc = compress8<W>(x);
      std::memcpy(out + W * g, &acc, W);
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
  const int64_t full = n / 8, rest = n % 8;
  at::parallel_for(0, full, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) {
      uint64_t acc = 0;
      std::memcpy(&acc, in + W * g, W);
      const uint64_t x = expand8<W>(acc);
      std::memcpy(idx + 8 * g, &x, 8);
    }
  });
  if (rest) {
    uint64_t acc = 0;
    std::memcpy(&acc, in + W * full, stream_bytes(rest, W));
    const uint64_t x = expand8<W>(acc);
    std::memcpy(idx + 8 * full, &x, rest);
  }
}

// out (rows, cols) = lev[row, index], converted like Tensor.to (through float32). An
// index >= K reads level K - 1 and makes the call return true.
template <int W, typename L, typename T>
bool dequantize_one(const uint8_t* in, const L* lev, T* out, int64_t rows, int64_t cols,
                    int64_t K) {
  const int64_t n = rows * cols, full = n / 8, groups = (n + 7) / 8;
  const uint32_t top = static_cast<uint32_t>(K - 1);
  std::atomic<bool> bad{false};
  at::parallel_for(0, groups, kGrain, [&](int64_t b, int64_t e) {
    int64_t c = (8 * b) % cols;
    const L* row = lev + ((8 * b) / cols) * K;
    bool local = false;
    for (int64_t g = b; g < e; ++g) {
      uint64_t acc = 0;
      if constexpr (W > 0) {
        if (g < full) {
          std::memcpy(&acc, in + W * g, W);
        } else {
          std::memcpy(&acc, in + W * g, stream_bytes(n - 8 * g, W));
        }
      }
      const uint64_t x = expand8<W>(acc);
      const int m = static_cast<int>(std::min<int64_t>(8, n - 8 * g));
      T* o = out + 8 * g;
      for (int k = 0; k < m; ++k) {
        uint32_t i = static_cast<uint32_t>(x >> (8 * k)) & 0xffu;
        if (i > top) {
          local = true;
          i = top;
        }
        o[k] = static_cast<T>(static_cast<float>(row[i]));
        if (++c == cols) {
          c = 0;
          row += K;
        }
      }
    }
    if (local) bad.store(true, std::memory_order_relaxed);
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

void pack_cpu(at::TensorList indices, at::TensorList packed, int64_t width) {
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

void unpack_cpu(at::TensorList packed, at::TensorList indices, int64_t width) {
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

void dequantize_cpu(at::TensorList packed, at::TensorList levels, at::TensorList out,
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
          flag = dequantize_one<decltype(w)::value, L, T>(src, Q.data_ptr<L>(), o.data_ptr<T>(), o.size(0),
                                               o.size(1), Q.size(1));
        });
      });
    });
    if (flag) flags[i] = 1;
  }
}

}  // namespace parq

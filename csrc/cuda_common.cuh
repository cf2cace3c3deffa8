// CUDA kernels for the memory-bound estimators: per-channel moments (with min/max) and the
// bucket histogram with shared-memory privatised counters. Launched on the caller's stream.
//
// Layout of every streaming kernel (block = 8 warps = 256 threads):
//   - a thread owns VEC consecutive channels: VEC = 8 (16-bit dtypes) or 4 (fp32) with one
//     16-byte load per row ("fast path": unit channel stride, 16-byte aligned rows), or VEC = 1
//     (generic path: any strides, scalar loads);
//   - LC = lanes along channels (8 for VEC 8, 16 for VEC 4, 32 for VEC 1), so a block covers
//     CT = LC * VEC channels (64 on the fast path: 128-256 contiguous bytes per row) and the
//     32 / LC = RPW lane groups of a warp read RPW different rows; RG = 8 * RPW "row groups";
//   - blockIdx.x: channel tile, blockIdx.y: token split (rows [s*rows, (s+1)*rows)),
//     blockIdx.z (or y): sample. Row group rg reads rows t_begin + rg + RG*i; kU of them per
//     step, all loads issued before any is used (kU * 16 B in flight per thread).
// Compiled with --fmad=false: the bucket bin index must match the reference bit for bit
// (fp32 sub, fp32 mul, truncation); the moments use explicit __fmaf_rn where harmless.
//
// This header: the constants, geometry and device helpers every kernel shares, and the host
// side's checks, device selection and (dtype, vector width) dispatch. Everything is internal
// to each translation unit (anonymous namespace); the launchers are declared in entrodrop_cuda.h.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "entrodrop_cuda.h"

namespace entrodrop {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

// Streaming-kernel tuning: U rows per thread per step (all loads issued before use), MINB
// blocks per SM for __launch_bounds__ (register cap 65536 / (256 * MINB)). Reading f too
// halves U (same bytes in flight, same registers).
template <int VEC, bool STATS, bool HAS_F>
struct Cfg {
  static constexpr bool kBig = STATS && VEC == 8;  // 40 state registers + 8 per row
  static constexpr int U = (kBig ? 6 : 4) / (HAS_F ? 2 : 1);
  static constexpr int MINB = kBig ? 2 : 3;
};

template <int VEC>
struct Geo {
  static constexpr int LC = VEC == 1 ? 32 : 64 / VEC;  // lanes along channels
  static constexpr int RPW = 32 / LC;                  // rows per warp per load
  static constexpr int RG = kWarps * RPW;              // row groups per block
  static constexpr int CT = LC * VEC;                  // channels per block
};

__device__ __forceinline__ float bf16_lo(uint32_t w) {
  return __uint_as_float(w << 16);
}
__device__ __forceinline__ float bf16_hi(uint32_t w) {
  return __uint_as_float(w & 0xffff0000u);
}

// NaN-propagating min / max (PTX min.NaN / max.NaN, sm_80+): one NaN among the values makes
// the result NaN, and an Inf makes min or max infinite, so every kernel's min/max carries its
// non-finite report (docs/CONTRACT.md "Non-finite values") at no cost in the loops.
__device__ __forceinline__ float fmin_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return isnan(a) || isnan(b) ? __int_as_float(0x7fffffff) : fminf(a, b);
#endif
}
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return isnan(a) || isnan(b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

// The (NaN-propagating) min and max of a channel's valid values tell whether one of them was
// NaN or +-Inf (finite values cannot make them infinite); an empty channel (no valid token:
// min = +Inf, max = -Inf) is not such a channel.
__device__ __forceinline__ bool nonfinite_range(float lo, float hi) {
  return !(isfinite(lo) && isfinite(hi)) && !(lo == INFINITY && hi == -INFINITY);
}

template <typename T>
__device__ __forceinline__ float scalar_to_float(const T* p) {
  if constexpr (sizeof(T) == 4) {
    return __ldg(reinterpret_cast<const float*>(p));
  } else {
    const unsigned short bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      return __uint_as_float(static_cast<uint32_t>(bits) << 16);
    } else {
      return __half2float(__ushort_as_half(bits));
    }
  }
}

// VEC consecutive channels at p as fp32 (VEC 8 / 4: one 16-byte load, p 16-byte aligned).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&o)[VEC]) {
  if constexpr (VEC == 1) {
    o[0] = scalar_to_float<T>(p);
  } else if constexpr (sizeof(T) == 4) {
    static_assert(VEC == 4, "fp32 fast path reads 4 channels");
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    o[0] = q.x;
    o[1] = q.y;
    o[2] = q.z;
    o[3] = q.w;
  } else {
    static_assert(VEC == 8, "16-bit fast path reads 8 channels");
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        o[2 * i] = bf16_lo(w[i]);
        o[2 * i + 1] = bf16_hi(w[i]);
      } else {
        o[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
        o[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
      }
    }
  }
}

// ok[i]: row t0 + i*STEP of sample b is a valid token for this thread (dvalid: its channels
// exist). Rows past t_end and masked rows are not.
template <int U, int STEP>
__device__ __forceinline__ int rows_ok(const Input& in, int64_t b, int64_t t0, int64_t t_end, bool dvalid,
                                       bool (&ok)[U]) {
  int n = 0;
#pragma unroll
  for (int i = 0; i < U; ++i) {
    const int64_t t = t0 + static_cast<int64_t>(i) * STEP;
    bool v = dvalid && t < t_end;
    if (v && in.mask != nullptr) v = __ldg(in.mask + b * in.smb + t * in.smt) != 0;
    ok[i] = v;
    n += v ? 1 : 0;
  }
  return n;
}

// v[i] = Y at row t0 + i*STEP for the thread's VEC channels starting at d (only where ok[i]);
// every load is issued before the first add.
template <typename T, int VEC, int U, int STEP, bool HAS_F>
__device__ __forceinline__ void load_rows(const Input& in, int64_t b, int64_t t0, int64_t d,
                                          const bool (&ok)[U], float (&v)[U][VEC]) {
  const T* __restrict__ px = static_cast<const T*>(in.x) + (b * in.sxb + t0 * in.sxt + d * in.sxd);
  if constexpr (!HAS_F) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (ok[i]) {
        load_vec<T, VEC>(px + static_cast<int64_t>(i) * STEP * in.sxt, v[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
      }
    }
  } else {
    const T* __restrict__ pf = static_cast<const T*>(in.f) + (b * in.sfb + t0 * in.sft + d * in.sfd);
    float w[U][VEC];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      if (ok[i]) {
        load_vec<T, VEC>(px + static_cast<int64_t>(i) * STEP * in.sxt, v[i]);
        load_vec<T, VEC>(pf + static_cast<int64_t>(i) * STEP * in.sft, w[i]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          v[i][k] = 0.f;
          w[i][k] = 0.f;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < U; ++i)
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = __fadd_rn(v[i][k], w[i][k]);
  }
}

// Chan's merge of (nb, mb, qb) into (na, ma, qa), fp64. The caller updates na afterwards.
__device__ __forceinline__ void chan_merge(double na, double& ma, double& qa, double nb, double mb,
                                           double qb) {
  if (nb == 0.0) return;
  if (na == 0.0) {
    ma = mb;
    qa = qb;
    return;
  }
  const double n = na + nb;
  const double d = mb - ma;
  ma = ma + d * (nb / n);
  qa = qa + qb + d * d * (na * nb / n);
}

// ------------------------------------------------------------------ host side

inline const char* prepare(int device) {
  int cur = -1;
  cudaError_t e = cudaGetDevice(&cur);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (cur != device) {
    e = cudaSetDevice(device);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  return nullptr;
}

inline const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Bad arguments throw std::invalid_argument (ValueError), named after the launcher `where`.
inline void check_input(const Input& in, const char* where) {
  ED_CHECK_IN(where, in.B >= 1 && in.T >= 1 && in.D >= 1, "empty input");
  ED_CHECK_IN(where, in.B <= kMaxSamples, "at most ", kMaxSamples, " samples per call, got ", in.B);
  ED_CHECK_IN(where, valid_dtype(in.dtype), "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got ",
              in.dtype);
  if (in.vec != 1) {
    const int want = in.dtype == DT_F32 ? 4 : 8;
    ED_CHECK_IN(where, in.vec == want, "vec must be 1, 4 (fp32) or 8 (fp16/bf16), got ", in.vec);
    auto aligned = [&](const void* p, int64_t sb, int64_t st, int64_t sd) {
      return reinterpret_cast<uintptr_t>(p) % 16 == 0 && sb % in.vec == 0 && st % in.vec == 0 && sd == 1;
    };
    ED_CHECK_IN(where,
                in.D % in.vec == 0 && aligned(in.x, in.sxb, in.sxt, in.sxd) &&
                    (in.f == nullptr || aligned(in.f, in.sfb, in.sft, in.sfd)),
                "vec > 1 needs D % vec == 0, unit channel stride and 16-byte aligned rows");
  }
}

inline void check_split(const Input& in, int S, int64_t rows, const char* where) {
  ED_CHECK_IN(where, S >= 1 && S <= kMaxSplits && rows >= 1 && rows * S >= in.T, "bad token split (S = ", S,
              ", rows = ", rows, ", T = ", in.T, ")");
}

inline void check_bins(int bins, const char* where) {
  ED_CHECK_IN(where, bins >= 1 && bins <= kMaxBins, "bins must be in [1, ", kMaxBins, "], got ", bins);
}

inline int channel_tile(int vec) {
  return vec == 1 ? Geo<1>::CT : (vec == 4 ? Geo<4>::CT : Geo<8>::CT);
}

inline dim3 stream_grid(const Input& in, int S) {
  const int64_t ct = channel_tile(in.vec);
  return dim3(static_cast<unsigned>((in.D + ct - 1) / ct), static_cast<unsigned>(S),
              static_cast<unsigned>(in.B));
}

inline int smem_optin(int device) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return optin;
}

// The element type of a dtype code and its 16-byte vector width.
template <int DT>
struct Elem;
template <>
struct Elem<DT_F32> {
  using type = float;
  static constexpr int fast_vec = 4;
};
template <>
struct Elem<DT_F16> {
  using type = __half;
  static constexpr int fast_vec = 8;
};
template <>
struct Elem<DT_BF16> {
  using type = __nv_bfloat16;
  static constexpr int fast_vec = 8;
};
template <typename T, int V>
struct Layout {
  using type = T;
  static constexpr int vec = V;
};

// fn(Layout<T, VEC>{}) for the input's dtype (through entrodrop_common.h's dispatch_dtype, as
// the CPU kernels) and vector width: VEC = 4 / 8 on the 16-byte path, else 1.
template <typename Fn>
void dispatch_input(const Input& in, Fn&& fn) {
  dispatch_dtype(in.dtype, [&](auto dt) {
    using E = Elem<decltype(dt)::value>;
    if (in.vec == E::fast_vec) {
      fn(Layout<typename E::type, E::fast_vec>{});
    } else {
      fn(Layout<typename E::type, 1>{});
    }
  });
}

// Runs BODY with the type T and the int VEC of the input's dtype and vector width.
#define ENTRODROP_DISPATCH(in, ...)                           \
  ::entrodrop::cuda::dispatch_input((in), [&](auto layout_) { \
    using T = typename decltype(layout_)::type;               \
    constexpr int VEC = decltype(layout_)::vec;               \
    __VA_ARGS__                                               \
  })

template <typename K>
const char* allow_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return nullptr;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace
}  // namespace cuda
}  // namespace entrodrop

namespace entrodrop {
namespace cuda {
namespace detail {
// Resident blocks per SM, asked by occupancy() (launch_cuda.cu) of the source that owns the
// kernel: the streaming statistics (moments_cuda.cu: stats true, or the min/max pass), the
// histogram pass (bucket_hist_cuda.cu), the single-read bucket (bucket_fused_cuda.cu).
const char* occupancy_stats(const Input& in, bool stats, int* n);
const char* occupancy_hist(const Input& in, int bins, int optin, int* n);
const char* occupancy_fused(const Input& in, int bins, int optin, int* n);
}  // namespace detail
}  // namespace cuda
}  // namespace entrodrop

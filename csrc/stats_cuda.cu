// CUDA kernels for the memory-bound estimators: per-channel moments (with min/max) and the
// bucket histogram with shared-memory privatised counters. Launched on the caller's stream.
//
// Layout of every streaming kernel: a block is 8 warps; lane l of every warp owns channel(s)
// (blockIdx.x * 32 + l) * VEC (+ k); blockIdx.y is a chunk ("split") of tokens, blockIdx.z the
// sample. Warp w reads rows t0 + w*R .. + R of each group of 8*R rows, R rows at a time, all R
// loads issued before any is used. A warp reads 32*VEC consecutive channels of a row
// (64-128 contiguous bytes). Compiled with --fmad=false: the bucket bin index must match the
// reference bit for bit; the moments use explicit __fmaf_rn where contraction is harmless.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>

#include "entrodrop_cuda.h"

namespace entrodrop {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 8;  // rows per warp per step (loads in flight per thread)
constexpr int kMinBlocks = 3;  // blocks per SM: caps registers at 85 (24 warps/SM resident, no spills)

template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint16_t bits);
template <>
__device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
template <>
__device__ __forceinline__ float half_bits_to_float<__half>(uint16_t bits) {
  return __half2float(__ushort_as_half(bits));
}

// Load VEC consecutive channels starting at p as fp32.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (sizeof(T) == 4) {
    static_assert(VEC == 1, "fp32 is read one channel per lane");
    out[0] = __ldg(reinterpret_cast<const float*>(p));
  } else if constexpr (VEC == 1) {
    out[0] = half_bits_to_float<T>(__ldg(reinterpret_cast<const unsigned short*>(p)));
  } else {
    static_assert(VEC == 2, "VEC is 1 or 2");
    const uint32_t w = __ldg(reinterpret_cast<const unsigned int*>(p));
    out[0] = half_bits_to_float<T>(static_cast<uint16_t>(w & 0xffffu));
    out[1] = half_bits_to_float<T>(static_cast<uint16_t>(w >> 16));
  }
}

// Load kRows rows of Y = x (+ f) for this lane's channels; bit i of the result: row i is a
// valid token (the same for every lane of the warp).
template <typename T, int VEC>
__device__ __forceinline__ unsigned load_rows(const Input& in, int64_t b, int64_t d0, bool dvalid,
                                              int64_t t0, int64_t t_end, float (&v)[kRows][VEC]) {
  unsigned ok = 0;
  const uint8_t* __restrict__ pm = in.mask ? in.mask + b * in.smb + t0 * in.smt : nullptr;
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    bool valid = t0 + i < t_end;
    if (valid && pm != nullptr) valid = __ldg(pm + i * in.smt) != 0;
    ok |= valid ? (1u << i) : 0u;
  }
  const T* __restrict__ px = static_cast<const T*>(in.x) + (b * in.sxb + d0 * in.sxd + t0 * in.sxt);
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (((ok >> i) & 1u) && dvalid) {
      load_vec<T, VEC>(px + i * in.sxt, v[i]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
    }
  }
  if (in.f != nullptr && dvalid) {
    const T* __restrict__ pf = static_cast<const T*>(in.f) + (b * in.sfb + d0 * in.sfd + t0 * in.sft);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if ((ok >> i) & 1u) {
        float w[VEC];
        load_vec<T, VEC>(pf + i * in.sft, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[i][k] = __fadd_rn(v[i][k], w[k]);
      }
    }
  }
  return ok;
}

// STATS: count/mean/M2 (+ min/max); !STATS: min/max only (phase 1 of bucket).
// Per lane, the statistics are of z = y - shift (shift = mean of the first valid step), each
// step's M2 about the step's own mean, merged into the running state with Chan's formulas;
// M2 accumulates in fp64. The 8 warps of a block are merged in fp64 through shared memory.
template <typename T, int VEC, bool STATS>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    stats_partial_kernel(Input in, int S, int64_t rows, float* __restrict__ pn,
                         double* __restrict__ pmean, double* __restrict__ pm2,
                         float* __restrict__ pmin, float* __restrict__ pmax) {
  constexpr int CH = 32 * VEC;
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int64_t b = blockIdx.z;
  const int s = blockIdx.y;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x) * 32 + lane) * VEC;
  const bool dvalid = d0 < in.D;  // VEC == 2 only when D is even
  const int64_t t_begin = static_cast<int64_t>(s) * rows;
  const int64_t t_end = min(t_begin + rows, in.T);

  int n = 0;
  float shift[VEC], mean[VEC], mn[VEC], mx[VEC];
  double m2[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    shift[k] = 0.f; mean[k] = 0.f; m2[k] = 0.0; mn[k] = INFINITY; mx[k] = -INFINITY;
  }
  for (int64_t t0 = t_begin + warp * kRows; t0 < t_end; t0 += kWarps * kRows) {
    float v[kRows][VEC];
    const unsigned okm = load_rows<T, VEC>(in, b, d0, dvalid, t0, t_end, v);
    if (okm == 0) continue;  // uniform across the warp
    const int nb = __popc(okm);
    bool ok[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) ok[i] = (okm >> i) & 1u;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        if (ok[i]) { mn[k] = fminf(mn[k], v[i][k]); mx[k] = fmaxf(mx[k], v[i][k]); }
      }
      if constexpr (STATS) {
        const float inv_nb = 1.f / static_cast<float>(nb);
        if (n == 0) {
          float s0 = 0.f;
#pragma unroll
          for (int i = 0; i < kRows; ++i) s0 += ok[i] ? v[i][k] : 0.f;
          shift[k] = s0 * inv_nb;
        }
        float sz = 0.f;
#pragma unroll
        for (int i = 0; i < kRows; ++i) sz += ok[i] ? v[i][k] - shift[k] : 0.f;
        const float mb = sz * inv_nb;
        float q = 0.f;
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const float dd = ok[i] ? (v[i][k] - shift[k]) - mb : 0.f;
          q = __fmaf_rn(dd, dd, q);
        }
        const float w = static_cast<float>(nb) / static_cast<float>(n + nb);
        const float delta = mb - mean[k];
        mean[k] = __fmaf_rn(delta, w, mean[k]);
        m2[k] += static_cast<double>(q) + static_cast<double>(delta) * delta * (static_cast<double>(n) * w);
      }
    }
    n += nb;
  }

  // merge the warps: each writes its state, warp 0 combines them
  __shared__ int s_n[kWarps];
  __shared__ double s_mean[STATS ? kWarps : 1][CH];
  __shared__ double s_m2[STATS ? kWarps : 1][CH];
  __shared__ float s_mn[kWarps][CH];
  __shared__ float s_mx[kWarps][CH];
  if (lane == 0) s_n[warp] = n;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int c = lane * VEC + k;
    if constexpr (STATS) {
      s_mean[warp][c] = static_cast<double>(shift[k]) + static_cast<double>(mean[k]);
      s_m2[warp][c] = m2[k];
    }
    s_mn[warp][c] = mn[k];
    s_mx[warp][c] = mx[k];
  }
  __syncthreads();
  if (warp != 0) return;
  int ntot = 0;
  for (int w = 0; w < kWarps; ++w) ntot += s_n[w];
  const int64_t out0 = (b * S + s) * in.D;
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const int c = lane * VEC + k;
    float a = INFINITY, z = -INFINITY;
    double N = 0.0, M = 0.0, Q = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      a = fminf(a, s_mn[w][c]);
      z = fmaxf(z, s_mx[w][c]);
      if constexpr (STATS) {
        const double nb = s_n[w];
        if (nb == 0.0) continue;
        const double nt = N + nb;
        const double delta = s_mean[w][c] - M;
        M += delta * (nb / nt);
        Q += s_m2[w][c] + delta * delta * (N * nb / nt);
        N = nt;
      }
    }
    if (dvalid) {
      pmin[out0 + d0 + k] = a;
      pmax[out0 + d0 + k] = z;
      if constexpr (STATS) {
        pmean[out0 + d0 + k] = M;
        pm2[out0 + d0 + k] = Q;
      }
    }
  }
  if (STATS && lane == 0 && blockIdx.x == 0) pn[b * S + s] = static_cast<float>(ntot);
}

__global__ void moments_merge_kernel(int64_t B, int64_t D, int S, const float* __restrict__ pn,
                                     const double* __restrict__ pmean,
                                     const double* __restrict__ pm2,
                                     const float* __restrict__ pmin,
                                     const float* __restrict__ pmax, double* __restrict__ count,
                                     double* __restrict__ mean, double* __restrict__ m2,
                                     float* __restrict__ mn, float* __restrict__ mx) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (d >= D) return;
  double N = 0.0, M = 0.0, Q = 0.0;
  float a = INFINITY, z = -INFINITY;
  for (int s = 0; s < S; ++s) {
    const double nb = pn[b * S + s];
    if (nb == 0.0) continue;
    const int64_t i = (b * S + s) * D + d;
    const double nt = N + nb;
    const double delta = pmean[i] - M;
    M += delta * (nb / nt);
    Q += pm2[i] + delta * delta * (N * nb / nt);
    N = nt;
    a = fminf(a, pmin[i]);
    z = fmaxf(z, pmax[i]);
  }
  mean[b * D + d] = M;
  m2[b * D + d] = Q;
  mn[b * D + d] = a;
  mx[b * D + d] = z;
  if (d == 0) count[b] = N;
}

// Phase 2 of bucket. Counters: shared memory [bins][32*VEC] int32, bin-major with the lane as
// the fastest index, so the 32 lanes of a warp always hit 32 different banks; flushed to
// global memory with one atomicAdd per non-empty counter. GLOBAL: counters straight in
// global memory (bins too many for shared memory).
template <typename T, int VEC, bool GLOBAL>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    bucket_hist_kernel(Input in, int Sp, const float* __restrict__ pmin,
                       const float* __restrict__ pmax, int64_t rows, int bins,
                       int32_t* __restrict__ hist) {
  constexpr int CH = 32 * VEC;
  extern __shared__ int32_t sh[];
  const int lane = threadIdx.x, warp = threadIdx.y;
  const int tid = warp * 32 + lane;
  const int64_t b = blockIdx.z;
  const int64_t d0 = (static_cast<int64_t>(blockIdx.x) * 32 + lane) * VEC;
  const bool dvalid = d0 < in.D;
  if constexpr (!GLOBAL) {
    for (int i = tid; i < bins * CH; i += kThreads) sh[i] = 0;
  }
  float lo[VEC], scale[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float a = INFINITY, z = -INFINITY;
    if (dvalid) {
      for (int s = 0; s < Sp; ++s) {
        a = fminf(a, pmin[(b * Sp + s) * in.D + d0 + k]);
        z = fmaxf(z, pmax[(b * Sp + s) * in.D + d0 + k]);
      }
    }
    const float width = __fsub_rn(z, a);
    lo[k] = a;
    scale[k] = (width == 0.f || !dvalid) ? 0.f : __fdiv_rn(static_cast<float>(bins), width);
  }
  if constexpr (!GLOBAL) __syncthreads();

  const int64_t t_begin = static_cast<int64_t>(blockIdx.y) * rows;
  const int64_t t_end = min(t_begin + rows, in.T);
  for (int64_t t0 = t_begin + warp * kRows; t0 < t_end; t0 += kWarps * kRows) {
    float v[kRows][VEC];
    const unsigned okm = load_rows<T, VEC>(in, b, d0, dvalid, t0, t_end, v);
    if (!dvalid) continue;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (!((okm >> i) & 1u)) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        // the contract's formula: fp32 sub, then fp32 mul, truncation, clamp to the last bin
        int j = static_cast<int>(__fmul_rn(__fsub_rn(v[i][k], lo[k]), scale[k]));
        j = min(max(j, 0), bins - 1);
        if constexpr (GLOBAL) {
          atomicAdd(hist + (b * in.D + d0 + k) * bins + j, 1);
        } else {
          atomicAdd(sh + j * CH + k * 32 + lane, 1);
        }
      }
    }
  }
  if constexpr (!GLOBAL) {
    __syncthreads();
    for (int i = tid; i < bins * CH; i += kThreads) {
      const int c = sh[i];
      if (c == 0) continue;
      const int j = i / CH, r = i % CH, k = r / 32, l = r % 32;
      const int64_t d = (static_cast<int64_t>(blockIdx.x) * 32 + l) * VEC + k;
      atomicAdd(hist + (b * in.D + d) * bins + j, c);
    }
  }
}

__global__ void bucket_entropy_kernel(int64_t B, int64_t D, int bins,
                                      const int32_t* __restrict__ hist, int paper_exact,
                                      double* __restrict__ out) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (d >= D) return;
  const int32_t* c = hist + (b * D + d) * bins;
  int64_t n = 0;
  for (int j = 0; j < bins; ++j) n += c[j];
  double h = 0.0;
  for (int j = 0; j < bins; ++j) {
    double p = static_cast<double>(c[j]) / static_cast<double>(n > 0 ? n : 1);
    if (paper_exact) p = fmax(p, 1e-10);
    if (p > 0.0) h -= p * log(p);
  }
  out[b * D + d] = h;
}

// ------------------------------------------------------------------ host side

const char* prepare(int device) {
  int cur = -1;
  cudaError_t e = cudaGetDevice(&cur);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  if (cur != device) {
    e = cudaSetDevice(device);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  return nullptr;
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

const char* check_input(const Input& in, int S, int64_t rows) {
  if (in.B < 1 || in.T < 1 || in.D < 1) return "empty input";
  if (in.B > 65535) return "at most 65535 samples per call";
  if (S < 1 || S > 65535 || rows < 1 || rows * S < in.T) return "bad token split";
  if (in.vec == 2 && (in.dtype == kF32 || in.D % 2 != 0 || in.sxd != 1 || (in.f && in.sfd != 1)))
    return "vec=2 needs a 16-bit dtype, an even D and unit channel strides";
  if (in.vec != 1 && in.vec != 2) return "vec must be 1 or 2";
  if (in.dtype < kF32 || in.dtype > kBF16) return "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  return nullptr;
}

dim3 stream_grid(const Input& in, int S) {
  const int64_t lanes = (in.D + in.vec - 1) / in.vec;
  return dim3(static_cast<unsigned>((lanes + 31) / 32), static_cast<unsigned>(S),
              static_cast<unsigned>(in.B));
}

// Runs BODY with the type T and the int VEC of the input's dtype and vector width.
#define ENTRODROP_DISPATCH(in, ...)                                   \
  do {                                                                \
    if ((in).dtype == kF32) {                                         \
      using T = float;                                                \
      constexpr int VEC = 1;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).dtype == kF16 && (in).vec == 2) {                 \
      using T = __half;                                               \
      constexpr int VEC = 2;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).dtype == kF16) {                                  \
      using T = __half;                                               \
      constexpr int VEC = 1;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).vec == 2) {                                       \
      using T = __nv_bfloat16;                                        \
      constexpr int VEC = 2;                                          \
      __VA_ARGS__                                                     \
    } else {                                                          \
      using T = __nv_bfloat16;                                        \
      constexpr int VEC = 1;                                          \
      __VA_ARGS__                                                     \
    }                                                                 \
  } while (0)

}  // namespace

const char* moments_partial(const Input& in, int S, int64_t rows, float* pn, double* pmean,
                            double* pm2, float* pmin, float* pmax, int device, void* stream) {
  if (const char* e = check_input(in, S, rows)) return e;
  if (const char* e = prepare(device)) return e;
  const dim3 grid = stream_grid(in, S), block(32, kWarps);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stats_partial_kernel<T, VEC, true><<<grid, block, 0, st>>>(in, S, rows, pn, pmean, pm2, pmin, pmax););
  return last_error();
}

const char* minmax_partial(const Input& in, int S, int64_t rows, float* pmin, float* pmax,
                           int device, void* stream) {
  if (const char* e = check_input(in, S, rows)) return e;
  if (const char* e = prepare(device)) return e;
  const dim3 grid = stream_grid(in, S), block(32, kWarps);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stats_partial_kernel<T, VEC, false><<<grid, block, 0, st>>>(in, S, rows, nullptr, nullptr, nullptr, pmin, pmax););
  return last_error();
}

const char* moments_merge(int64_t B, int64_t D, int S, const float* pn, const double* pmean,
                          const double* pm2, const float* pmin, const float* pmax, double* count,
                          double* mean, double* m2, float* mn, float* mx, int device, void* stream) {
  if (const char* e = prepare(device)) return e;
  const dim3 grid(static_cast<unsigned>((D + 127) / 128), static_cast<unsigned>(B));
  moments_merge_kernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(B, D, S, pn, pmean, pm2, pmin, pmax, count, mean, m2, mn, mx);
  return last_error();
}

const char* bucket_hist(const Input& in, int S_partial, const float* pmin, const float* pmax, int S,
                        int64_t rows, int bins, int32_t* hist, int device, void* stream) {
  if (const char* e = check_input(in, S, rows)) return e;
  if (bins < 1) return "bins must be >= 1";
  if (const char* e = prepare(device)) return e;
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  Input run = in;
  size_t smem = static_cast<size_t>(bins) * 32 * run.vec * sizeof(int32_t);
  if (smem > static_cast<size_t>(optin) && run.vec == 2) {  // halve the channels per block
    run.vec = 1;
    smem /= 2;
  }
  const bool global = smem > static_cast<size_t>(optin);
  const dim3 grid = stream_grid(run, S), block(32, kWarps);
  auto st = static_cast<cudaStream_t>(stream);
  cudaError_t attr = cudaSuccess;
  ENTRODROP_DISPATCH(run, {
    if (global) {
      bucket_hist_kernel<T, VEC, true><<<grid, block, 0, st>>>(run, S_partial, pmin, pmax, rows, bins, hist);
    } else {
      auto kernel = bucket_hist_kernel<T, VEC, false>;
      if (smem > 48 * 1024)
        attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (attr == cudaSuccess) kernel<<<grid, block, smem, st>>>(run, S_partial, pmin, pmax, rows, bins, hist);
    }
  });
  if (attr != cudaSuccess) return cudaGetErrorString(attr);
  return last_error();
}

const char* bucket_entropy(int64_t B, int64_t D, int bins, const int32_t* hist, int paper_exact,
                           double* out, int device, void* stream) {
  if (const char* e = prepare(device)) return e;
  const dim3 grid(static_cast<unsigned>((D + 127) / 128), static_cast<unsigned>(B));
  bucket_entropy_kernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(B, D, bins, hist, paper_exact, out);
  return last_error();
}

}  // namespace cuda
}  // namespace entrodrop

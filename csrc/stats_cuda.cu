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
// moments: per thread, chunks of kU rows are reduced two-pass in registers (chunk mean, then
// squared deviations about it), about a per-thread shift c (the mean of its first chunk) so
// that large offsets cost no precision, and merged into the thread's running (n, mean, M2)
// in fp32 with Chan's formula (one division per chunk per thread, none per element). Threads
// are merged in fp64: lanes by shuffles, warps through shared memory, splits by a second
// small kernel. No fp64 in the streaming loop.
//
// bucket: two passes over x (min/max, then the bins) are unavoidable for a large sample that
// does not fit on chip, so bucket's rate is capped at about half of x.sum()'s on one 512 MB
// sample; the min/max pass is the moments kernel without the moments. The binning pass keeps
// 16-bit counters packed two per 32-bit shared-memory word, [bins/2][VEC][32 lanes], so the
// 32 lanes of a warp always hit 32 different banks; at the end the RPW row-group copies are
// summed by shuffles into a [channel][bins] staging array and written with coalesced plain
// stores to a per-split partial histogram [B, S, D, bins] (no global atomics; S is small,
// about one wave of blocks). Short samples (T <= 256, fast path): one block per (sample,
// channel tile) loads its whole tile into registers once, computes min/max, bins and the
// entropy in one read of global memory (bucket_fused).
//
// Non-finite values: every min/max here propagates NaN (PTX min.NaN / max.NaN), so a
// channel's min or max is NaN or infinite exactly when one of its valid values of Y was NaN
// or Inf (x + f overflowing fp32 included); the merge kernels turn that into the contract's
// report (moments: NaN statistics; bucket: counts -1 in bin 0, H_d = NaN), no extra pass.
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
constexpr int kFusedRows = 256;   // max tokens per sample of the fused bucket kernel
constexpr int kMaxRowsPerHistBlock = 65535;  // 16-bit shared-memory counters

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

__device__ __forceinline__ float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

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
    o[0] = q.x; o[1] = q.y; o[2] = q.z; o[3] = q.w;
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
__device__ __forceinline__ int rows_ok(const Input& in, int64_t b, int64_t t0, int64_t t_end,
                                       bool dvalid, bool (&ok)[U]) {
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
        for (int k = 0; k < VEC; ++k) { v[i][k] = 0.f; w[i][k] = 0.f; }
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

// STATS: count/mean/M2 + min/max per (sample, split, channel); !STATS: min/max only.
// (The body of the kernels below: block (channel tile `tile`, split s, sample b).)
template <typename T, int VEC, bool STATS, bool HAS_F>
__device__ __forceinline__ void stream_stats_body(const Input& in, int S, int64_t rows,
                                                  float* __restrict__ pn,
                                                  double* __restrict__ pmean,
                                                  double* __restrict__ pm2,
                                                  float* __restrict__ pmin,
                                                  float* __restrict__ pmax, unsigned tile, int s,
                                                  int64_t b) {
  using G = Geo<VEC>;
  constexpr int kU = Cfg<VEC, STATS, HAS_F>::U;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cl = lane % G::LC, rw = lane / G::LC, rg = warp * G::RPW + rw;
  const int64_t dt = static_cast<int64_t>(tile) * G::CT;
  const int64_t d0 = dt + cl * VEC;
  const bool dvalid = d0 < in.D;  // VEC > 1 only when D % VEC == 0: all VEC channels exist
  const int64_t t_begin = static_cast<int64_t>(s) * rows;
  const int64_t t_end = min(t_begin + rows, in.T);

  float n = 0.f;  // exact: at most rows / RG per thread
  bool have_c = false;
  float c[VEC], mz[VEC], q2[VEC], mn[VEC], mx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    c[k] = 0.f; mz[k] = 0.f; q2[k] = 0.f; mn[k] = INFINITY; mx[k] = -INFINITY;
  }
  for (int64_t t0 = t_begin + rg; t0 < t_end; t0 += static_cast<int64_t>(G::RG) * kU) {
    bool ok[kU];
    const int nbi = rows_ok<kU, G::RG>(in, b, t0, t_end, dvalid, ok);
    float v[kU][VEC];
    load_rows<T, VEC, kU, G::RG, HAS_F>(in, b, t0, d0, ok, v);
    if (nbi == 0) continue;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
#pragma unroll
      for (int i = 0; i < kU; ++i)
        if (ok[i]) { mn[k] = fmin_nan(mn[k], v[i][k]); mx[k] = fmax_nan(mx[k], v[i][k]); }
    if constexpr (STATS) {
      const float nb = static_cast<float>(nbi);
      const float inv = __frcp_rn(nb);  // the chunk mean need not be exact: q is about it
      if (!have_c) {
        have_c = true;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          float s0 = 0.f;
#pragma unroll
          for (int i = 0; i < kU; ++i) s0 = __fadd_rn(s0, ok[i] ? v[i][k] : 0.f);
          c[k] = __fmul_rn(s0, inv);
        }
      }
      const float nt = __fadd_rn(n, nb);
      const float w = __fdiv_rn(nb, nt);  // weight of the chunk
      const float nw = __fmul_rn(n, w);   // n * nb / nt
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        // z = y - c (exact for offset channels: y and c within a factor 2), then the chunk's
        // squared deviations about its own mean: no cancellation, whatever the offset
        float zs = 0.f;
#pragma unroll
        for (int i = 0; i < kU; ++i) {
          v[i][k] = __fsub_rn(v[i][k], c[k]);
          zs = __fadd_rn(zs, ok[i] ? v[i][k] : 0.f);
        }
        const float mb = __fmul_rn(zs, inv);  // chunk mean of z
        float q = 0.f;
#pragma unroll
        for (int i = 0; i < kU; ++i) {
          const float dd = ok[i] ? __fsub_rn(v[i][k], mb) : 0.f;
          q = __fmaf_rn(dd, dd, q);
        }
        const float delta = __fsub_rn(mb, mz[k]);
        mz[k] = __fmaf_rn(delta, w, mz[k]);
        q2[k] = __fadd_rn(q2[k], __fmaf_rn(__fmul_rn(delta, delta), nw, q));
      }
      n = nt;
    }
  }

  // lanes of one channel group (same cl, different rw) merge by shuffles
  double dn = n;
  double dm[STATS ? VEC : 1], dq[STATS ? VEC : 1];
  if constexpr (STATS) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      dm[k] = static_cast<double>(c[k]) + static_cast<double>(mz[k]);
      dq[k] = static_cast<double>(q2[k]);
    }
  }
#pragma unroll
  for (int off = G::LC; off < 32; off <<= 1) {
    const double on = __shfl_xor_sync(0xffffffffu, dn, off);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      mn[k] = fmin_nan(mn[k], __shfl_xor_sync(0xffffffffu, mn[k], off));
      mx[k] = fmax_nan(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], off));
      if constexpr (STATS) {
        const double om = __shfl_xor_sync(0xffffffffu, dm[k], off);
        const double oq = __shfl_xor_sync(0xffffffffu, dq[k], off);
        chan_merge(dn, dm[k], dq[k], on, om, oq);
      }
    }
    dn += on;
  }

  // warps merge through shared memory
  __shared__ double s_n[kWarps];
  __shared__ double s_mean[STATS ? kWarps : 1][STATS ? G::CT : 1];
  __shared__ double s_m2[STATS ? kWarps : 1][STATS ? G::CT : 1];
  __shared__ float s_mn[kWarps][G::CT];
  __shared__ float s_mx[kWarps][G::CT];
  if (lane == 0) s_n[warp] = dn;  // lane 0's channel (the tile's first) always exists
  if (rw == 0) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      s_mn[warp][cl * VEC + k] = mn[k];
      s_mx[warp][cl * VEC + k] = mx[k];
      if constexpr (STATS) {
        s_mean[warp][cl * VEC + k] = dm[k];
        s_m2[warp][cl * VEC + k] = dq[k];
      }
    }
  }
  __syncthreads();
  if (tid < G::CT && dt + tid < in.D) {
    const int64_t o = (b * S + s) * in.D + dt + tid;
    float a = INFINITY, z = -INFINITY;
    double N = 0.0, M = 0.0, Q = 0.0;
    for (int w = 0; w < kWarps; ++w) {
      a = fmin_nan(a, s_mn[w][tid]);
      z = fmax_nan(z, s_mx[w][tid]);
      if constexpr (STATS) {
        chan_merge(N, M, Q, s_n[w], s_mean[w][tid], s_m2[w][tid]);
        N += s_n[w];
      }
    }
    pmin[o] = a;
    pmax[o] = z;
    if constexpr (STATS) {
      pmean[o] = M;
      pm2[o] = Q;
      if (tile == 0 && tid == 0) pn[b * S + s] = static_cast<float>(N);
    }
  }
}

template <typename T, int VEC, bool STATS, bool HAS_F>
__global__ void __launch_bounds__(kThreads, (Cfg<VEC, STATS, HAS_F>::MINB))
    stream_stats_kernel(Input in, int S, int64_t rows, float* __restrict__ pn,
                        double* __restrict__ pmean, double* __restrict__ pm2,
                        float* __restrict__ pmin, float* __restrict__ pmax) {
  stream_stats_body<T, VEC, STATS, HAS_F>(in, S, rows, pn, pmean, pm2, pmin, pmax, blockIdx.x,
                                          blockIdx.y, blockIdx.z);
}

// Pair launch (delta_entropy): blockIdx.x = 2 * tile + half, half 0 the statistics of
// Y = x + f, half 1 those of x, each by the very code (and splits) of its single launch, so
// the outputs are the single launches' bit for bit. The two blocks of a tile are adjacent in
// launch order and stream the same rows of x together: x comes from HBM once, the second
// read from L2. MINB does not depend on HAS_F: the same register cap as the single kernels.
template <typename T, int VEC, bool STATS>
__global__ void __launch_bounds__(kThreads, (Cfg<VEC, STATS, true>::MINB))
    stream_stats_pair_kernel(Input in, StatsHalf y, StatsHalf x) {
  static_assert(Cfg<VEC, STATS, true>::MINB == Cfg<VEC, STATS, false>::MINB, "same register cap");
  const unsigned tile = blockIdx.x >> 1;
  const int s = static_cast<int>(blockIdx.y);
  if ((blockIdx.x & 1u) == 0u) {
    if (s < y.S)
      stream_stats_body<T, VEC, STATS, true>(in, y.S, y.rows, y.pn, y.pmean, y.pm2, y.pmin,
                                             y.pmax, tile, s, blockIdx.z);
  } else if (s < x.S) {
    Input ix = in;
    ix.f = nullptr;
    stream_stats_body<T, VEC, STATS, false>(ix, x.S, x.rows, x.pn, x.pmean, x.pm2, x.pmin,
                                            x.pmax, tile, s, blockIdx.z);
  }
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
    const int64_t i = (b * S + s) * D + d;
    a = fmin_nan(a, pmin[i]);
    z = fmax_nan(z, pmax[i]);
    if (nb == 0.0) continue;
    chan_merge(N, M, Q, nb, pmean[i], pm2[i]);
    N += nb;
  }
  Q = Q > 0.0 ? Q : 0.0;  // (as before: rounding below 0, or NaN from fp32 overflow on finite values)
  if (nonfinite_range(a, z)) {  // the contract's report: NaN for every statistic of the channel
    const double qn = __longlong_as_double(0x7ff8000000000000LL);
    M = qn;
    Q = qn;
    a = z = __int_as_float(0x7fffffff);
  }
  mean[b * D + d] = M;
  m2[b * D + d] = Q;
  mn[b * D + d] = a;
  mx[b * D + d] = z;
  if (d == 0) count[b] = N;
}

// The contract's bin index: fp32 sub, then fp32 mul, truncation, clamp to the last bin.
__device__ __forceinline__ int bin_index(float y, float lo, float scale, int bins) {
  const int j = static_cast<int>(__fmul_rn(__fsub_rn(y, lo), scale));
  return min(max(j, 0), bins - 1);
}

// A channel whose fp32 width hi - lo or scale bins / width is not finite (ranges past 3.4e38,
// or below bins * 2^-128: subnormal ranges) is binned with the same formula in fp64, as the
// reference does ("wide" channels). Their scale is set to NaN, which the fp32 bin_index turns
// into bin 0 (cvt.rzi of NaN is 0), so the hot loops stay as they are; a second, rare pass
// (wide_fixup) then moves each of their values from bin 0 to its fp64 bin.
__device__ __forceinline__ float bin_scale_or_nan(float lo, float hi, int bins) {
  const float width = __fsub_rn(hi, lo);
  if (width == 0.f) return 0.f;
  const float scale = __fdiv_rn(static_cast<float>(bins), width);
  return isfinite(width) && isfinite(scale) ? scale : __int_as_float(0x7fffffff);
}

__device__ __forceinline__ int bin_index_wide(float y, float lo, float hi, int bins) {
  const double scale = __ddiv_rn(static_cast<double>(bins), __dsub_rn(hi, lo));
  const double u = __dmul_rn(__dsub_rn(y, lo), scale);
  const int last = bins - 1;
  const int j = u >= 0.0 ? (u < static_cast<double>(bins) ? static_cast<int>(u) : last) : 0;  // NaN -> 0
  return min(j, last);
}

// Bit k set: channel k of the thread is wide (its scale is NaN).
template <int VEC>
__device__ __forceinline__ unsigned wide_bits(const float (&scale)[VEC]) {
  unsigned w = 0u;
#pragma unroll
  for (int k = 0; k < VEC; ++k) w |= isnan(scale[k]) ? 1u << k : 0u;
  return w;
}

// Move value v of wide channel k from bin 0 (where the fp32 loop counted it) to its fp64 bin:
// in shared memory (packed 16-bit counters of this lane: -1 on bin 0's half, +1 on bin j's;
// the same lane counted it, so no half goes below 0) or in global memory.
template <int VEC, bool GLOBAL>
__device__ __forceinline__ void wide_move(float v, float lo, float hi, int bins, int k, int lane,
                                          uint32_t* cnt, int32_t* gch) {
  const int j = bin_index_wide(v, lo, hi, bins);
  if (j == 0) return;
  if constexpr (GLOBAL) {
    atomicSub(gch, 1);
    atomicAdd(gch + j, 1);
  } else {
    atomicSub(cnt + k * 32 + lane, 1u);
    atomicAdd(cnt + ((j >> 1) * VEC + k) * 32 + lane, 1u << ((j & 1) << 4));
  }
}

// counters [nbp][VEC][32 lanes] (two 16-bit counts per word) -> stage [CT][sp] int32
// (sum over the RPW row groups of a warp). Called by all threads, after a barrier.
template <int VEC>
__device__ __forceinline__ void stage_counts(const uint32_t* __restrict__ cnt,
                                             int32_t* __restrict__ stage, int nbp, int bins,
                                             int sp, int lane, int warp) {
  using G = Geo<VEC>;
  const int cl = lane % G::LC, rw = lane / G::LC;
  for (int pk = warp; pk < nbp * VEC; pk += kWarps) {  // uniform per warp
    const uint32_t w = cnt[pk * 32 + lane];
    uint32_t lo = w & 0xffffu, hi = w >> 16;
#pragma unroll
    for (int off = G::LC; off < 32; off <<= 1) {
      lo += __shfl_xor_sync(0xffffffffu, lo, off);
      hi += __shfl_xor_sync(0xffffffffu, hi, off);
    }
    if (rw == 0) {
      const int bp = pk / VEC, k = pk % VEC;
      int32_t* row = stage + (cl * VEC + k) * sp;
      row[2 * bp] = static_cast<int32_t>(lo);
      if (2 * bp + 1 < bins) row[2 * bp + 1] = static_cast<int32_t>(hi);
    }
  }
}

// Phase 2 of bucket: bin counts of split s into phist [B, S, D, bins] (every entry written).
// GLOBAL: counters straight in global memory (too many bins for shared memory; phist zeroed).
template <typename T, int VEC, bool GLOBAL, bool HAS_F>
__device__ __forceinline__ void bucket_hist_body(const Input& in, int Sp,
                                                 const float* __restrict__ pmin,
                                                 const float* __restrict__ pmax, int S,
                                                 int64_t rows, int bins,
                                                 int32_t* __restrict__ phist, unsigned tile,
                                                 int s, int64_t b) {
  using G = Geo<VEC>;
  constexpr int kU = Cfg<VEC, false, HAS_F>::U;
  extern __shared__ __align__(16) uint32_t sh[];
  const int nbp = (bins + 1) / 2, sp = bins | 1;
  uint32_t* cnt = sh;
  int32_t* stage = reinterpret_cast<int32_t*>(sh + nbp * VEC * 32);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cl = lane % G::LC, rw = lane / G::LC, rg = warp * G::RPW + rw;
  const int64_t dt = static_cast<int64_t>(tile) * G::CT;
  const int64_t d0 = dt + cl * VEC;
  const bool dvalid = d0 < in.D;
  if constexpr (!GLOBAL) {
    for (int i = tid; i < nbp * VEC * 32; i += kThreads) cnt[i] = 0u;
  }
  float lo[VEC], scale[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float a = 0.f, z = 0.f;
    if (dvalid) {
      a = INFINITY; z = -INFINITY;
      for (int p = 0; p < Sp; ++p) {
        a = fmin_nan(a, pmin[(b * Sp + p) * in.D + d0 + k]);
        z = fmax_nan(z, pmax[(b * Sp + p) * in.D + d0 + k]);
      }
    }
    lo[k] = a;
    // a channel with a non-finite value: everything to bin 0 (its counts are replaced below)
    scale[k] = dvalid && !nonfinite_range(a, z) ? bin_scale_or_nan(a, z, bins) : 0.f;
  }
  const unsigned wide = wide_bits<VEC>(scale);
  if constexpr (!GLOBAL) __syncthreads();

  const int64_t t_begin = static_cast<int64_t>(s) * rows;
  const int64_t t_end = min(t_begin + rows, in.T);
  int32_t* __restrict__ gh = phist + ((b * S + s) * in.D) * bins;
  for (int64_t t0 = t_begin + rg; t0 < t_end; t0 += static_cast<int64_t>(G::RG) * kU) {
    bool ok[kU];
    rows_ok<kU, G::RG>(in, b, t0, t_end, dvalid, ok);
    float v[kU][VEC];
    load_rows<T, VEC, kU, G::RG, HAS_F>(in, b, t0, d0, ok, v);
#pragma unroll
    for (int i = 0; i < kU; ++i) {
      if (!ok[i]) continue;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const int j = bin_index(v[i][k], lo[k], scale[k], bins);
        if constexpr (GLOBAL) {
          atomicAdd(gh + (d0 + k) * bins + j, 1);
        } else {
          atomicAdd(cnt + ((j >> 1) * VEC + k) * 32 + lane, 1u << ((j & 1) << 4));
        }
      }
    }
  }
  if (__syncthreads_or(wide != 0u)) {  // rare: the wide channels' rows read again, one by one
#pragma unroll 1
    for (int k = 0; k < VEC; ++k) {
      if (!((wide >> k) & 1u)) continue;
      float a = INFINITY, z = -INFINITY;  // (lo and scale are not kept live for this)
      for (int p = 0; p < Sp; ++p) {
        a = fmin_nan(a, pmin[(b * Sp + p) * in.D + d0 + k]);
        z = fmax_nan(z, pmax[(b * Sp + p) * in.D + d0 + k]);
      }
      for (int64_t t = t_begin + rg; t < t_end; t += G::RG) {  // this thread's rows, as above
        if (in.mask != nullptr && __ldg(in.mask + b * in.smb + t * in.smt) == 0) continue;
        float y = scalar_to_float<T>(static_cast<const T*>(in.x) + (b * in.sxb + t * in.sxt + (d0 + k) * in.sxd));
        if constexpr (HAS_F)
          y = __fadd_rn(y, scalar_to_float<T>(static_cast<const T*>(in.f) + (b * in.sfb + t * in.sft + (d0 + k) * in.sfd)));
        wide_move<VEC, GLOBAL>(y, a, z, bins, k, lane, cnt, gh + (d0 + k) * bins);
      }
    }
  }
  if constexpr (!GLOBAL) {
    __syncthreads();
    stage_counts<VEC>(cnt, stage, nbp, bins, sp, lane, warp);
    __syncthreads();
    const int nch = static_cast<int>(min(static_cast<int64_t>(G::CT), in.D - dt));
    int32_t* __restrict__ out = gh + dt * bins;  // nch * bins contiguous ints
    for (int i = tid; i < nch * bins; i += kThreads) {
      const int ch = i / bins, j = i - ch * bins;
      out[i] = stage[ch * sp + j];
    }
  }
  // the report of a channel with a non-finite value: bin 0 = -1, the others 0, in this split's
  // counts (bucket_entropy turns a negative count into H_d = NaN); min/max read again rather
  // than kept in a register through the loop
  unsigned bad = 0u;
  if (rw == 0 && dvalid) {
#pragma unroll 1
    for (int k = 0; k < VEC; ++k) {
      float a = INFINITY, z = -INFINITY;
      for (int p = 0; p < Sp; ++p) {
        a = fmin_nan(a, pmin[(b * Sp + p) * in.D + d0 + k]);
        z = fmax_nan(z, pmax[(b * Sp + p) * in.D + d0 + k]);
      }
      bad |= nonfinite_range(a, z) ? 1u << k : 0u;
    }
  }
  if (__syncthreads_or(bad != 0u) && rw == 0) {
#pragma unroll 1
    for (int k = 0; k < VEC; ++k) {
      if (!((bad >> k) & 1u)) continue;
      int32_t* __restrict__ h = gh + (d0 + k) * bins;
      for (int j = 0; j < bins; ++j) h[j] = j == 0 ? -1 : 0;
    }
  }
}

template <typename T, int VEC, bool GLOBAL, bool HAS_F>
__global__ void __launch_bounds__(kThreads, (Cfg<VEC, false, HAS_F>::MINB))
    bucket_hist_kernel(Input in, int Sp, const float* __restrict__ pmin,
                       const float* __restrict__ pmax, int S, int64_t rows, int bins,
                       int32_t* __restrict__ phist) {
  bucket_hist_body<T, VEC, GLOBAL, HAS_F>(in, Sp, pmin, pmax, S, rows, bins, phist, blockIdx.x,
                                          blockIdx.y, blockIdx.z);
}

// Pair launch: as stream_stats_pair_kernel (half 0: Y = x + f, half 1: x; same shared memory).
template <typename T, int VEC, bool GLOBAL>
__global__ void __launch_bounds__(kThreads, (Cfg<VEC, false, true>::MINB))
    bucket_hist_pair_kernel(Input in, int bins, HistHalf y, HistHalf x) {
  static_assert(Cfg<VEC, false, true>::MINB == Cfg<VEC, false, false>::MINB, "same register cap");
  const unsigned tile = blockIdx.x >> 1;
  const int s = static_cast<int>(blockIdx.y);
  if ((blockIdx.x & 1u) == 0u) {
    if (s < y.S)
      bucket_hist_body<T, VEC, GLOBAL, true>(in, y.Sp, y.pmin, y.pmax, y.S, y.rows, bins, y.phist,
                                             tile, s, blockIdx.z);
  } else if (s < x.S) {
    Input ix = in;
    ix.f = nullptr;
    bucket_hist_body<T, VEC, GLOBAL, false>(ix, x.Sp, x.pmin, x.pmax, x.S, x.rows, bins, x.phist,
                                            tile, s, blockIdx.z);
  }
}

// H_d of the block's nch channels from their counts stage[ch * sp + j] into o[ch], one warp per
// channel, with table[c] = c ln c: H = ln N - (sum_j c_j ln c_j) / N (= -sum_j p_j ln p_j);
// paper_exact adds -1e-10 ln(1e-10) per empty bin (p_j = c_j / N >= 1/N > 1e-10 for the
// others); a negative count (a channel holding a non-finite value) gives NaN.
__device__ __forceinline__ void write_entropy(const int32_t* __restrict__ stage, int sp, int bins,
                                              const double* __restrict__ table, int nch,
                                              int paper_exact, double* __restrict__ o, int lane,
                                              int warp) {
  for (int ch = warp; ch < nch; ch += kWarps) {
    int nsum = 0, nempty = 0;
    bool neg = false;
    double sl = 0.0;
    for (int j = lane; j < bins; j += 32) {
      const int c = stage[ch * sp + j];
      nsum += c;
      nempty += c == 0 ? 1 : 0;
      neg |= c < 0;
      sl += table[c < 0 ? 0 : c];
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      nsum += __shfl_xor_sync(0xffffffffu, nsum, off);
      nempty += __shfl_xor_sync(0xffffffffu, nempty, off);
      sl += __shfl_xor_sync(0xffffffffu, sl, off);
    }
    neg = __any_sync(0xffffffffu, neg);
    if (lane == 0) {
      const double N = nsum > 0 ? static_cast<double>(nsum) : 1.0;
      double h = log(N) - sl / N;
      if (h < 0.0) h = 0.0;  // a constant channel: ln N - N ln N / N may round below 0
      if (paper_exact) h += static_cast<double>(nempty) * (-1e-10 * log(1e-10));
      o[ch] = neg ? __longlong_as_double(0x7ff8000000000000LL) : h;
    }
  }
}

// One read of global memory for short samples (T <= kFusedRows, fast path): a block per
// (channel tile, sample) holds its rows in registers, computes min/max, bins, and writes the
// counts (counts [B, D, bins], if not null) and/or the entropy (out [B, D], if not null).
template <typename T, int VEC, bool HAS_F>
__device__ __forceinline__ void bucket_fused_body(const Input& in, int bins, int paper_exact,
                                                  int32_t* __restrict__ counts,
                                                  double* __restrict__ out, unsigned tile,
                                                  int64_t b) {
  using G = Geo<VEC>;
  constexpr int UF = kFusedRows / G::RG;
  extern __shared__ __align__(16) uint32_t sh[];
  const int nbp = (bins + 1) / 2, sp = bins | 1;
  uint32_t* cnt = sh;
  int32_t* stage = reinterpret_cast<int32_t*>(sh + nbp * VEC * 32);
  double* table = reinterpret_cast<double*>(stage + G::CT * sp);  // c * ln(c), c <= kFusedRows
  float* s_mn = reinterpret_cast<float*>(table + kFusedRows + 1);  // [kWarps][CT]
  float* s_mx = s_mn + kWarps * G::CT;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int cl = lane % G::LC, rw = lane / G::LC, rg = warp * G::RPW + rw;
  const int64_t dt = static_cast<int64_t>(tile) * G::CT;
  const int64_t d0 = dt + cl * VEC;
  const bool dvalid = d0 < in.D;

  bool ok[UF];
  rows_ok<UF, G::RG>(in, b, rg, in.T, dvalid, ok);
  float v[UF][VEC];
  load_rows<T, VEC, UF, G::RG, false>(in, b, rg, d0, ok, v);
  if constexpr (HAS_F) {  // f in two halves: registers for x's rows and half of f's
    constexpr int H = UF / 2;
    const T* __restrict__ pf = static_cast<const T*>(in.f) + (b * in.sfb + rg * in.sft + d0 * in.sfd);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float w[H][VEC];
#pragma unroll
      for (int i = 0; i < H; ++i) {
        if (ok[h * H + i]) {
          load_vec<T, VEC>(pf + static_cast<int64_t>(h * H + i) * G::RG * in.sft, w[i]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) w[i][k] = 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < H; ++i)
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[h * H + i][k] = __fadd_rn(v[h * H + i][k], w[i][k]);
    }
  }

  // while the loads are in flight
  for (int i = tid; i < nbp * VEC * 32; i += kThreads) cnt[i] = 0u;
  if (out != nullptr) {
    for (int i = tid; i <= kFusedRows; i += kThreads) table[i] = i == 0 ? 0.0 : i * log(static_cast<double>(i));
  }

  float mn[VEC], mx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    mn[k] = INFINITY; mx[k] = -INFINITY;
#pragma unroll
    for (int i = 0; i < UF; ++i)
      if (ok[i]) { mn[k] = fmin_nan(mn[k], v[i][k]); mx[k] = fmax_nan(mx[k], v[i][k]); }
#pragma unroll
    for (int off = G::LC; off < 32; off <<= 1) {
      mn[k] = fmin_nan(mn[k], __shfl_xor_sync(0xffffffffu, mn[k], off));
      mx[k] = fmax_nan(mx[k], __shfl_xor_sync(0xffffffffu, mx[k], off));
    }
    if (rw == 0) {
      s_mn[warp * G::CT + cl * VEC + k] = mn[k];
      s_mx[warp * G::CT + cl * VEC + k] = mx[k];
    }
  }
  __syncthreads();
  float lo[VEC], scale[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    float a = INFINITY, z = -INFINITY;
    for (int w = 0; w < kWarps; ++w) {
      a = fmin_nan(a, s_mn[w * G::CT + cl * VEC + k]);
      z = fmax_nan(z, s_mx[w * G::CT + cl * VEC + k]);
    }
    lo[k] = a;
    scale[k] = dvalid && !nonfinite_range(a, z) ? bin_scale_or_nan(a, z, bins) : 0.f;  // bad: bin 0
  }
#pragma unroll
  for (int i = 0; i < UF; ++i) {
    if (!ok[i]) continue;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int j = bin_index(v[i][k], lo[k], scale[k], bins);
      atomicAdd(cnt + ((j >> 1) * VEC + k) * 32 + lane, 1u << ((j & 1) << 4));
    }
  }
  const unsigned wide = wide_bits<VEC>(scale);
  if (wide != 0u) {  // rare: the wide channels' values (still in registers) to their fp64 bins
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      if (!((wide >> k) & 1u)) continue;
      float z = -INFINITY;
      for (int w = 0; w < kWarps; ++w) z = fmax_nan(z, s_mx[w * G::CT + cl * VEC + k]);
#pragma unroll
      for (int i = 0; i < UF; ++i)
        if (ok[i]) wide_move<VEC, false>(v[i][k], lo[k], z, bins, k, lane, cnt, nullptr);
    }
  }
  __syncthreads();
  // channels with a non-finite value (bits; min/max from shared memory again, no register
  // kept live through the loops for it): counts bin 0 = -1, the others 0, and H_d = NaN below
  unsigned bad = 0u;
  if (rw == 0 && dvalid) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float a = INFINITY, z = -INFINITY;
      for (int w = 0; w < kWarps; ++w) {
        a = fmin_nan(a, s_mn[w * G::CT + cl * VEC + k]);
        z = fmax_nan(z, s_mx[w * G::CT + cl * VEC + k]);
      }
      bad |= nonfinite_range(a, z) ? 1u << k : 0u;
    }
  }
  stage_counts<VEC>(cnt, stage, nbp, bins, sp, lane, warp);
  if (__syncthreads_or(bad != 0u)) {  // rare
#pragma unroll 1
    for (int k = 0; k < VEC; ++k) {
      if (!((bad >> k) & 1u)) continue;
      for (int j = 0; j < bins; ++j) stage[(cl * VEC + k) * sp + j] = j == 0 ? -1 : 0;
    }
    __syncthreads();
  }
  const int nch = static_cast<int>(min(static_cast<int64_t>(G::CT), in.D - dt));
  if (counts != nullptr) {
    int32_t* __restrict__ o = counts + (b * in.D + dt) * bins;
    for (int i = tid; i < nch * bins; i += kThreads) {
      const int ch = i / bins, j = i - ch * bins;
      o[i] = stage[ch * sp + j];
    }
  }
  if (out != nullptr) {
    write_entropy(stage, sp, bins, table, nch, paper_exact, out + b * in.D + dt, lane, warp);
  }
}

template <typename T, int VEC, bool HAS_F>
__global__ void __launch_bounds__(kThreads, 2)
    bucket_fused_kernel(Input in, int bins, int paper_exact, int32_t* __restrict__ counts,
                        double* __restrict__ out) {
  bucket_fused_body<T, VEC, HAS_F>(in, bins, paper_exact, counts, out, blockIdx.x, blockIdx.y);
}

// Pair launch: blockIdx.x = 2 * tile + half (0: Y = x + f, 1: x), as stream_stats_pair_kernel.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 2)
    bucket_fused_pair_kernel(Input in, int bins, int paper_exact, FusedHalf y, FusedHalf x) {
  const unsigned tile = blockIdx.x >> 1;
  if ((blockIdx.x & 1u) == 0u) {
    bucket_fused_body<T, VEC, true>(in, bins, paper_exact, y.counts, y.out, tile, blockIdx.y);
  } else {
    Input ix = in;
    ix.f = nullptr;
    bucket_fused_body<T, VEC, false>(ix, bins, paper_exact, x.counts, x.out, tile, blockIdx.y);
  }
}

// bucket_tile: the occupancy design of the single read for short samples (T <= kFusedRows,
// 16-byte rows), an alternative to bucket_fused (which holds the rows in registers: 106-128
// registers, 25% occupancy, latency-bound). A block per (32-channel tile, sample) stages the
// sample's tile of Y in shared memory (fp32 [kFusedRows][32]: 32 KB), then every thread owns
// one channel (lane) and an eighth of the rows (warp) and counts them into its own 8-bit
// counters in shared memory (at most 32 rows each): no atomics; thread t's counters of bins
// 4q..4q+3 are the 32-bit word q * 256 + t, so a warp's 32 lanes hit 32 different banks
// whatever their bins. <= 64 registers (4 blocks per SM by registers; shared memory ~45 KB at
// 20 bins: 5 blocks per SM, 62% occupancy, against 25% for bucket_fused).
constexpr int kTileCh = 32;

// Shared memory of bucket_tile (host and device agree through this function).
struct TileSmem {
  size_t ys, table, mn, mx, flag, stage, cnt, valid, total;
  __host__ __device__ static TileSmem of(int bins) {
    TileSmem m{};
    m.ys = 0;                                                          // float [kFusedRows][kTileCh]
    m.table = m.ys + sizeof(float) * kFusedRows * kTileCh;             // double [kFusedRows + 1]
    m.mn = m.table + sizeof(double) * (kFusedRows + 1);                // float [kWarps][kTileCh]
    m.mx = m.mn + sizeof(float) * kWarps * kTileCh;                    // float [kWarps][kTileCh]
    m.flag = m.mx + sizeof(float) * kWarps * kTileCh;                  // int [kTileCh]: 1 bad channel
    m.stage = m.flag + sizeof(int) * kTileCh;                          // int32 [kTileCh][bins | 1]
    m.cnt = m.stage + sizeof(int32_t) * kTileCh * static_cast<size_t>(bins | 1);  // uint8, tile_counter
    m.valid = m.cnt + static_cast<size_t>((bins + 3) / 4) * 4 * kThreads;  // uint8 [kFusedRows]
    m.total = m.valid + kFusedRows;
    return m;
  }
};

// Byte offset of thread t's 8-bit counter of bin j: the word (j / 4) * kThreads + t.
__device__ __forceinline__ int tile_counter(int j, int t) { return (((j >> 2) * kThreads + t) << 2) + (j & 3); }

template <typename T, int VEC, bool HAS_F>
__global__ void __launch_bounds__(kThreads, 4)
    bucket_tile_kernel(Input in, int bins, int paper_exact, int32_t* __restrict__ counts,
                       double* __restrict__ out) {
  constexpr int LT = kTileCh / VEC;     // threads per row in the load phase (4 or 8)
  constexpr int RP = kThreads / LT;     // rows per load pass (64 or 32)
  constexpr int U = HAS_F ? 2 : 4;      // rows per thread in flight
  constexpr int RW = kFusedRows / kWarps;  // rows per warp in the counting phase (32)
  extern __shared__ __align__(16) unsigned char smem[];
  const TileSmem L = TileSmem::of(bins);
  float* ys = reinterpret_cast<float*>(smem + L.ys);
  double* table = reinterpret_cast<double*>(smem + L.table);
  float* s_mn = reinterpret_cast<float*>(smem + L.mn);
  float* s_mx = reinterpret_cast<float*>(smem + L.mx);
  int* s_flag = reinterpret_cast<int*>(smem + L.flag);
  int32_t* stage = reinterpret_cast<int32_t*>(smem + L.stage);
  uint8_t* cnt = reinterpret_cast<uint8_t*>(smem + L.cnt);
  uint8_t* valid = reinterpret_cast<uint8_t*>(smem + L.valid);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.y;
  const int64_t dt = static_cast<int64_t>(blockIdx.x) * kTileCh;
  const int sp = bins | 1;

  // 1. the tile of Y into shared memory (16-byte loads, U rows in flight per thread)
  {
    const int cg = tid % LT, r0 = tid / LT;
    const int64_t d0 = dt + cg * VEC;
    const bool dvalid = d0 < in.D;  // D % VEC == 0 on this path: all VEC channels exist
    for (int t0 = r0; t0 < kFusedRows; t0 += RP * U) {
      bool ok[U];
      float v[U][VEC];
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int t = t0 + i * RP;
        bool valid_row = t < in.T;
        if (valid_row && in.mask != nullptr) valid_row = __ldg(in.mask + b * in.smb + t * in.smt) != 0;
        if (cg == 0 && t < kFusedRows) valid[t] = valid_row ? 1 : 0;
        ok[i] = valid_row && dvalid;
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int64_t t = t0 + i * RP;
        if (ok[i]) {
          load_vec<T, VEC>(static_cast<const T*>(in.x) + (b * in.sxb + t * in.sxt + d0 * in.sxd), v[i]);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[i][k] = 0.f;
        }
      }
      if constexpr (HAS_F) {
        float w[U][VEC];
#pragma unroll
        for (int i = 0; i < U; ++i) {
          const int64_t t = t0 + i * RP;
          if (ok[i]) {
            load_vec<T, VEC>(static_cast<const T*>(in.f) + (b * in.sfb + t * in.sft + d0 * in.sfd), w[i]);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) w[i][k] = 0.f;
          }
        }
#pragma unroll
        for (int i = 0; i < U; ++i)
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[i][k] = __fadd_rn(v[i][k], w[i][k]);
      }
#pragma unroll
      for (int i = 0; i < U; ++i) {
        const int t = t0 + i * RP;
        if (t < kFusedRows) {
          float4* row = reinterpret_cast<float4*>(ys + t * kTileCh + cg * VEC);
#pragma unroll
          for (int h = 0; h < VEC / 4; ++h) row[h] = make_float4(v[i][4 * h], v[i][4 * h + 1], v[i][4 * h + 2], v[i][4 * h + 3]);
        }
      }
    }
  }
  if (out != nullptr) {
    for (int i = tid; i <= kFusedRows; i += kThreads) table[i] = i == 0 ? 0.0 : i * log(static_cast<double>(i));
  }
  for (int i = tid; i < (bins + 3) / 4 * kThreads; i += kThreads) reinterpret_cast<uint32_t*>(cnt)[i] = 0u;
  __syncthreads();

  // 2. thread (warp w, lane c) owns channel c on rows [w * RW, (w + 1) * RW): min/max, then bins
  const int c = lane;
  const bool cvalid = dt + c < in.D;
  const int rbeg = warp * RW;
  {
    float mn = INFINITY, mx = -INFINITY;
    for (int t = rbeg; t < rbeg + RW; ++t) {
      if (valid[t]) {
        const float y = ys[t * kTileCh + c];
        mn = fmin_nan(mn, y);
        mx = fmax_nan(mx, y);
      }
    }
    s_mn[warp * kTileCh + c] = mn;
    s_mx[warp * kTileCh + c] = mx;
  }
  __syncthreads();
  float lo = INFINITY, hi = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    lo = fmin_nan(lo, s_mn[w * kTileCh + c]);
    hi = fmax_nan(hi, s_mx[w * kTileCh + c]);
  }
  const bool bad = cvalid && nonfinite_range(lo, hi);
  if (warp == 0) s_flag[c] = bad ? 1 : 0;
  const float scale = cvalid && !bad ? bin_scale_or_nan(lo, hi, bins) : 0.f;  // bad: bin 0
  const bool wide = isnan(scale);
  if (cvalid) {
    for (int t = rbeg; t < rbeg + RW; ++t) {
      if (!valid[t]) continue;
      const float y = ys[t * kTileCh + c];
      const int j = wide ? bin_index_wide(y, lo, hi, bins) : bin_index(y, lo, scale, bins);
      uint8_t* q = cnt + tile_counter(j, tid);
      *q = static_cast<uint8_t>(*q + 1);
    }
  }
  __syncthreads();

  // 3. the 8 row parts of each channel summed into stage [kTileCh][sp]; reports; outputs
  const int nch = static_cast<int>(min(static_cast<int64_t>(kTileCh), in.D - dt));
  for (int i = tid; i < nch * bins; i += kThreads) {
    const int ch = i / bins, j = i - ch * bins;
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += cnt[tile_counter(j, w * 32 + ch)];
    stage[ch * sp + j] = s_flag[ch] ? (j == 0 ? -1 : 0) : sum;
  }
  __syncthreads();
  if (counts != nullptr) {
    int32_t* __restrict__ o = counts + (b * in.D + dt) * bins;
    for (int i = tid; i < nch * bins; i += kThreads) {
      const int ch = i / bins, j = i - ch * bins;
      o[i] = stage[ch * sp + j];
    }
  }
  if (out != nullptr) write_entropy(stage, sp, bins, table, nch, paper_exact, out + b * in.D + dt, lane, warp);
}

// H_d from the split partials phist [B, S, D, bins]: one warp per (sample, channel).
__global__ void bucket_entropy_kernel(int64_t B, int64_t D, int bins, int S,
                                      const int32_t* __restrict__ phist, int paper_exact,
                                      double* __restrict__ out) {
  const int64_t gw = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (gw >= B * D) return;  // uniform per warp
  const int64_t b = gw / D, d = gw - b * D;
  long long n = 0;
  bool neg = false;  // a negative count: the channel held a non-finite value (H_d = NaN)
  for (int j = lane; j < bins; j += 32)
    for (int s = 0; s < S; ++s) {
      const int32_t c = phist[((b * S + s) * D + d) * bins + j];
      n += c;
      neg |= c < 0;
    }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) n += __shfl_xor_sync(0xffffffffu, n, off);
  if (__any_sync(0xffffffffu, neg)) {
    if (lane == 0) out[b * D + d] = __longlong_as_double(0x7ff8000000000000LL);
    return;
  }
  const double N = static_cast<double>(n > 0 ? n : 1);
  double h = 0.0;
  for (int j = lane; j < bins; j += 32) {
    long long c = 0;
    for (int s = 0; s < S; ++s) c += phist[((b * S + s) * D + d) * bins + j];
    double p = static_cast<double>(c) / N;
    if (paper_exact) p = fmax(p, 1e-10);
    if (p > 0.0) h -= p * log(p);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) h += __shfl_xor_sync(0xffffffffu, h, off);
  if (lane == 0) out[b * D + d] = h;
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

const char* check_input(const Input& in) {
  if (in.B < 1 || in.T < 1 || in.D < 1) return "empty input";
  if (in.B > 65535) return "at most 65535 samples per call";
  if (in.dtype < kF32 || in.dtype > kBF16) return "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)";
  if (in.vec != 1) {
    const int want = in.dtype == kF32 ? 4 : 8;
    if (in.vec != want) return "vec must be 1, 4 (fp32) or 8 (fp16/bf16)";
    auto aligned = [&](const void* p, int64_t sb, int64_t st, int64_t sd) {
      return reinterpret_cast<uintptr_t>(p) % 16 == 0 && sb % in.vec == 0 && st % in.vec == 0 && sd == 1;
    };
    if (in.D % in.vec != 0 || !aligned(in.x, in.sxb, in.sxt, in.sxd) ||
        (in.f != nullptr && !aligned(in.f, in.sfb, in.sft, in.sfd)))
      return "vec > 1 needs D % vec == 0, unit channel stride and 16-byte aligned rows";
  }
  return nullptr;
}

const char* check_split(const Input& in, int S, int64_t rows) {
  if (S < 1 || S > 65535 || rows < 1 || rows * S < in.T) return "bad token split";
  return nullptr;
}

int channel_tile(int vec) { return vec == 1 ? Geo<1>::CT : (vec == 4 ? Geo<4>::CT : Geo<8>::CT); }

dim3 stream_grid(const Input& in, int S) {
  const int64_t ct = channel_tile(in.vec);
  return dim3(static_cast<unsigned>((in.D + ct - 1) / ct), static_cast<unsigned>(S),
              static_cast<unsigned>(in.B));
}

size_t hist_smem(int bins, int vec) {
  const size_t nbp = (bins + 1) / 2;
  return nbp * vec * 32 * sizeof(uint32_t) +
         static_cast<size_t>(channel_tile(vec)) * (bins | 1) * sizeof(int32_t);
}

size_t fused_smem(int bins, int vec) {
  return hist_smem(bins, vec) + (kFusedRows + 1) * sizeof(double) +
         2 * kWarps * channel_tile(vec) * sizeof(float);
}

int smem_optin(int device) {
  int optin = 0;
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return optin;
}

// Runs BODY with the type T and the int VEC of the input's dtype and vector width.
#define ENTRODROP_DISPATCH(in, ...)                                   \
  do {                                                                \
    if ((in).dtype == kF32 && (in).vec == 4) {                        \
      using T = float;                                                \
      constexpr int VEC = 4;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).dtype == kF32) {                                  \
      using T = float;                                                \
      constexpr int VEC = 1;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).dtype == kF16 && (in).vec == 8) {                 \
      using T = __half;                                               \
      constexpr int VEC = 8;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).dtype == kF16) {                                  \
      using T = __half;                                               \
      constexpr int VEC = 1;                                          \
      __VA_ARGS__                                                     \
    } else if ((in).vec == 8) {                                       \
      using T = __nv_bfloat16;                                        \
      constexpr int VEC = 8;                                          \
      __VA_ARGS__                                                     \
    } else {                                                          \
      using T = __nv_bfloat16;                                        \
      constexpr int VEC = 1;                                          \
      __VA_ARGS__                                                     \
    }                                                                 \
  } while (0)

template <typename K>
const char* allow_smem(K kernel, size_t smem) {
  if (smem <= 48 * 1024) return nullptr;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Kernel pointers by (T, VEC, has f); templates so that `if constexpr` discards what a
// combination does not have (no fused kernel for VEC 1).
template <typename T, int VEC, bool STATS>
auto stats_kernel(bool has_f) {
  return has_f ? stream_stats_kernel<T, VEC, STATS, true> : stream_stats_kernel<T, VEC, STATS, false>;
}
template <typename T, int VEC, bool GLOBAL>
auto hist_kernel(bool has_f) {
  return has_f ? bucket_hist_kernel<T, VEC, GLOBAL, true> : bucket_hist_kernel<T, VEC, GLOBAL, false>;
}

template <typename T, int VEC>
const char* launch_fused(const Input& in, dim3 grid, size_t smem, cudaStream_t st, int bins,
                         int paper_exact, int32_t* counts, double* out) {
  if constexpr (VEC == 1) {
    return "bucket_fused needs the 16-byte fast path (vec 4 or 8)";
  } else {
    auto kernel = in.f != nullptr ? bucket_fused_kernel<T, VEC, true> : bucket_fused_kernel<T, VEC, false>;
    if (const char* e = allow_smem(kernel, smem)) return e;
    kernel<<<grid, kThreads, smem, st>>>(in, bins, paper_exact, counts, out);
    return nullptr;
  }
}

template <typename T, int VEC>
const char* occupancy_of(int kind, int bins, bool has_f, int optin, int* n) {
  cudaError_t e = cudaSuccess;
  if (kind == 0) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, stats_kernel<T, VEC, true>(has_f), kThreads, 0);
  } else if (kind == 1) {
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, stats_kernel<T, VEC, false>(has_f), kThreads, 0);
  } else if (kind == 2) {
    const size_t smem = hist_smem(bins, VEC);
    if (smem > static_cast<size_t>(optin)) {  // bucket_hist uses global counters
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, hist_kernel<T, VEC, true>(has_f), kThreads, 0);
    } else {
      auto kernel = hist_kernel<T, VEC, false>(has_f);
      if (const char* err = allow_smem(kernel, smem)) return err;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, kThreads, smem);
    }
  } else {
    const size_t smem = fused_smem(bins, VEC);
    if (VEC == 1 || smem > static_cast<size_t>(optin)) {
      *n = 0;
    } else if constexpr (VEC > 1) {
      auto kernel = has_f ? bucket_fused_kernel<T, VEC, true> : bucket_fused_kernel<T, VEC, false>;
      if (const char* err = allow_smem(kernel, smem)) return err;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, kThreads, smem);
    }
  }
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

const char* moments_partial(const Input& in, int S, int64_t rows, float* pn, double* pmean,
                            double* pm2, float* pmin, float* pmax, int device, void* stream) {
  if (const char* e = check_input(in)) return e;
  if (const char* e = check_split(in, S, rows)) return e;
  if (const char* e = prepare(device)) return e;
  const dim3 grid = stream_grid(in, S);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stats_kernel<T, VEC, true>(in.f != nullptr)<<<grid, kThreads, 0, st>>>(in, S, rows, pn, pmean, pm2, pmin, pmax););
  return last_error();
}

const char* minmax_partial(const Input& in, int S, int64_t rows, float* pmin, float* pmax,
                           int device, void* stream) {
  if (const char* e = check_input(in)) return e;
  if (const char* e = check_split(in, S, rows)) return e;
  if (const char* e = prepare(device)) return e;
  const dim3 grid = stream_grid(in, S);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stats_kernel<T, VEC, false>(in.f != nullptr)<<<grid, kThreads, 0, st>>>(in, S, rows, nullptr, nullptr, nullptr, pmin, pmax););
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
                        int64_t rows, int bins, int32_t* phist, int device, void* stream) {
  if (const char* e = check_input(in)) return e;
  if (const char* e = check_split(in, S, rows)) return e;
  if (bins < 1 || bins > 65536) return "bins must be in [1, 65536]";
  if (const char* e = prepare(device)) return e;
  const size_t smem = hist_smem(bins, in.vec);
  const bool global = smem > static_cast<size_t>(smem_optin(device)) || rows > kMaxRowsPerHistBlock;
  const dim3 grid = stream_grid(in, S);
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  if (global) {
    const cudaError_t e = cudaMemsetAsync(phist, 0, static_cast<size_t>(in.B) * S * in.D * bins * sizeof(int32_t), st);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  ENTRODROP_DISPATCH(in, {
    if (global) {
      hist_kernel<T, VEC, true>(in.f != nullptr)<<<grid, kThreads, 0, st>>>(in, S_partial, pmin, pmax, S, rows, bins, phist);
    } else {
      auto kernel = hist_kernel<T, VEC, false>(in.f != nullptr);
      err = allow_smem(kernel, smem);
      if (err == nullptr) kernel<<<grid, kThreads, smem, st>>>(in, S_partial, pmin, pmax, S, rows, bins, phist);
    }
  });
  if (err != nullptr) return err;
  return last_error();
}

const char* bucket_fused(const Input& in, int bins, int paper_exact, int32_t* counts, double* out,
                         int device, void* stream) {
  if (const char* e = check_input(in)) return e;
  if (in.vec == 1) return "bucket_fused needs the 16-byte fast path (vec 4 or 8)";
  if (in.T > kFusedRows) return "bucket_fused needs T <= 256";
  if (bins < 1 || bins > 65536) return "bins must be in [1, 65536]";
  if (const char* e = prepare(device)) return e;
  const size_t smem = fused_smem(bins, in.vec);
  if (smem > static_cast<size_t>(smem_optin(device))) return "bucket_fused: too many bins for shared memory";
  const int64_t ct = channel_tile(in.vec);
  const dim3 grid(static_cast<unsigned>((in.D + ct - 1) / ct), static_cast<unsigned>(in.B));
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, err = launch_fused<T, VEC>(in, grid, smem, st, bins, paper_exact, counts, out););
  if (err != nullptr) return err;
  return last_error();
}

const char* bucket_entropy(int64_t B, int64_t D, int bins, int S, const int32_t* phist,
                           int paper_exact, double* out, int device, void* stream) {
  if (const char* e = prepare(device)) return e;
  const int64_t warps = B * D;
  const dim3 grid(static_cast<unsigned>((warps + 7) / 8));
  bucket_entropy_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(B, D, bins, S, phist, paper_exact, out);
  return last_error();
}

namespace {

const char* check_pair(const Input& in, const StatsHalf& y, const StatsHalf& x) {
  if (in.f == nullptr) return "a pair launch needs f";
  if (const char* e = check_input(in)) return e;
  if (const char* e = check_split(in, y.S, y.rows)) return e;
  return check_split(in, x.S, x.rows);
}

dim3 pair_grid(const Input& in, int Sy, int Sx) {
  const int64_t ct = channel_tile(in.vec);
  return dim3(static_cast<unsigned>(2 * ((in.D + ct - 1) / ct)), static_cast<unsigned>(Sy > Sx ? Sy : Sx),
              static_cast<unsigned>(in.B));
}

}  // namespace

const char* moments_pair_partial(const Input& in, const StatsHalf& y, const StatsHalf& x,
                                 int device, void* stream) {
  if (const char* e = check_pair(in, y, x)) return e;
  if (const char* e = prepare(device)) return e;
  const dim3 grid = pair_grid(in, y.S, x.S);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stream_stats_pair_kernel<T, VEC, true><<<grid, kThreads, 0, st>>>(in, y, x););
  return last_error();
}

const char* minmax_pair_partial(const Input& in, const StatsHalf& y, const StatsHalf& x,
                                int device, void* stream) {
  if (const char* e = check_pair(in, y, x)) return e;
  if (const char* e = prepare(device)) return e;
  const dim3 grid = pair_grid(in, y.S, x.S);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stream_stats_pair_kernel<T, VEC, false><<<grid, kThreads, 0, st>>>(in, y, x););
  return last_error();
}

const char* bucket_hist_pair(const Input& in, int bins, const HistHalf& y, const HistHalf& x,
                             int device, void* stream) {
  if (in.f == nullptr) return "a pair launch needs f";
  if (const char* e = check_input(in)) return e;
  if (const char* e = check_split(in, y.S, y.rows)) return e;
  if (const char* e = check_split(in, x.S, x.rows)) return e;
  if (bins < 1 || bins > 65536) return "bins must be in [1, 65536]";
  if (const char* e = prepare(device)) return e;
  const size_t smem = hist_smem(bins, in.vec);
  const int64_t rows = y.rows > x.rows ? y.rows : x.rows;
  const bool global = smem > static_cast<size_t>(smem_optin(device)) || rows > kMaxRowsPerHistBlock;
  const dim3 grid = pair_grid(in, y.S, x.S);
  auto st = static_cast<cudaStream_t>(stream);
  if (global) {
    for (const HistHalf* h : {&y, &x}) {
      const size_t n = static_cast<size_t>(in.B) * h->S * in.D * bins * sizeof(int32_t);
      const cudaError_t e = cudaMemsetAsync(h->phist, 0, n, st);
      if (e != cudaSuccess) return cudaGetErrorString(e);
    }
  }
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, {
    if (global) {
      bucket_hist_pair_kernel<T, VEC, true><<<grid, kThreads, 0, st>>>(in, bins, y, x);
    } else {
      auto kernel = bucket_hist_pair_kernel<T, VEC, false>;
      err = allow_smem(kernel, smem);
      if (err == nullptr) kernel<<<grid, kThreads, smem, st>>>(in, bins, y, x);
    }
  });
  if (err != nullptr) return err;
  return last_error();
}

namespace {
template <typename T, int VEC>
const char* launch_fused_pair(const Input& in, dim3 grid, size_t smem, cudaStream_t st, int bins,
                              int paper_exact, const FusedHalf& y, const FusedHalf& x) {
  if constexpr (VEC == 1) {
    return "bucket_fused needs the 16-byte fast path (vec 4 or 8)";
  } else {
    auto kernel = bucket_fused_pair_kernel<T, VEC>;
    if (const char* e = allow_smem(kernel, smem)) return e;
    kernel<<<grid, kThreads, smem, st>>>(in, bins, paper_exact, y, x);
    return nullptr;
  }
}
}  // namespace

const char* bucket_fused_pair(const Input& in, int bins, int paper_exact, const FusedHalf& y,
                              const FusedHalf& x, int device, void* stream) {
  if (in.f == nullptr) return "a pair launch needs f";
  if (const char* e = check_input(in)) return e;
  if (in.vec == 1) return "bucket_fused needs the 16-byte fast path (vec 4 or 8)";
  if (in.T > kFusedRows) return "bucket_fused needs T <= 256";
  if (bins < 1 || bins > 65536) return "bins must be in [1, 65536]";
  if (const char* e = prepare(device)) return e;
  const size_t smem = fused_smem(bins, in.vec);
  if (smem > static_cast<size_t>(smem_optin(device))) return "bucket_fused: too many bins for shared memory";
  const int64_t ct = channel_tile(in.vec);
  const dim3 grid(static_cast<unsigned>(2 * ((in.D + ct - 1) / ct)), static_cast<unsigned>(in.B));
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, err = launch_fused_pair<T, VEC>(in, grid, smem, st, bins, paper_exact, y, x););
  if (err != nullptr) return err;
  return last_error();
}

namespace {
template <typename T, int VEC>
const char* launch_tile(const Input& in, dim3 grid, size_t smem, cudaStream_t st, int bins,
                        int paper_exact, int32_t* counts, double* out) {
  if constexpr (VEC == 1) {
    return "bucket_tile needs the 16-byte fast path (vec 4 or 8)";
  } else {
    auto kernel = in.f != nullptr ? bucket_tile_kernel<T, VEC, true> : bucket_tile_kernel<T, VEC, false>;
    if (const char* e = allow_smem(kernel, smem)) return e;
    kernel<<<grid, kThreads, smem, st>>>(in, bins, paper_exact, counts, out);
    return nullptr;
  }
}
}  // namespace

const char* bucket_tile(const Input& in, int bins, int paper_exact, int32_t* counts, double* out,
                        int device, void* stream) {
  if (const char* e = check_input(in)) return e;
  if (in.vec == 1) return "bucket_tile needs the 16-byte fast path (vec 4 or 8)";
  if (in.T > kFusedRows) return "bucket_tile needs T <= 256";
  if (bins < 1 || bins > 65536) return "bins must be in [1, 65536]";
  if (const char* e = prepare(device)) return e;
  const size_t smem = TileSmem::of(bins).total;
  if (smem > static_cast<size_t>(smem_optin(device))) return "bucket_tile: too many bins for shared memory";
  const dim3 grid(static_cast<unsigned>((in.D + kTileCh - 1) / kTileCh), static_cast<unsigned>(in.B));
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, err = launch_tile<T, VEC>(in, grid, smem, st, bins, paper_exact, counts, out););
  if (err != nullptr) return err;
  return last_error();
}

int fused_max_rows() { return kFusedRows; }
int hist_max_rows() { return kMaxRowsPerHistBlock; }

const char* occupancy(int kind, int dtype, int vec, int bins, int has_f, int device, int* blocks_per_sm) {
  if (const char* e = prepare(device)) return e;
  Input in;
  in.dtype = dtype;
  in.vec = vec;
  const char* err = nullptr;
  *blocks_per_sm = 0;
  const int optin = smem_optin(device);
  ENTRODROP_DISPATCH(in, err = occupancy_of<T, VEC>(kind, bins, has_f != 0, optin, blocks_per_sm););
  return err;
}

}  // namespace cuda
}  // namespace entrodrop

// The streaming statistics kernel: per (sample, token split, channel) count/mean/M2 and
// min/max (moments, STATS) or min/max only (bucket's first pass), and its pair launch.
#pragma once
#include "cuda_common.cuh"

namespace entrodrop {
namespace cuda {
namespace {

// STATS: count/mean/M2 + min/max per (sample, split, channel); !STATS: min/max only.
// (The body of the kernels below: block (channel tile `tile`, split s, sample b).)
template <typename T, int VEC, bool STATS, bool HAS_F>
__device__ __forceinline__ void stream_stats_body(const Input& in, int S, int64_t rows,
                                                  float* __restrict__ pn, double* __restrict__ pmean,
                                                  double* __restrict__ pm2, float* __restrict__ pmin,
                                                  float* __restrict__ pmax, unsigned tile, int s, int64_t b) {
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
    c[k] = 0.f;
    mz[k] = 0.f;
    q2[k] = 0.f;
    mn[k] = INFINITY;
    mx[k] = -INFINITY;
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
        if (ok[i]) {
          mn[k] = fmin_nan(mn[k], v[i][k]);
          mx[k] = fmax_nan(mx[k], v[i][k]);
        }
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
    stream_stats_kernel(Input in, int S, int64_t rows, float* __restrict__ pn, double* __restrict__ pmean,
                        double* __restrict__ pm2, float* __restrict__ pmin, float* __restrict__ pmax) {
  stream_stats_body<T, VEC, STATS, HAS_F>(in, S, rows, pn, pmean, pm2, pmin, pmax, blockIdx.x, blockIdx.y,
                                          blockIdx.z);
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
      stream_stats_body<T, VEC, STATS, true>(in, y.S, y.rows, y.pn, y.pmean, y.pm2, y.pmin, y.pmax, tile, s,
                                             blockIdx.z);
  } else if (s < x.S) {
    Input ix = in;
    ix.f = nullptr;
    stream_stats_body<T, VEC, STATS, false>(ix, x.S, x.rows, x.pn, x.pmean, x.pm2, x.pmin, x.pmax, tile, s,
                                            blockIdx.z);
  }
}

// Kernel pointers by (T, VEC, has f).
template <typename T, int VEC, bool STATS>
auto stats_kernel(bool has_f) {
  return has_f ? stream_stats_kernel<T, VEC, STATS, true> : stream_stats_kernel<T, VEC, STATS, false>;
}

inline void check_pair(const Input& in, const StatsHalf& y, const StatsHalf& x, const char* where) {
  ED_CHECK_IN(where, in.f != nullptr, "a pair launch needs f");
  check_input(in, where);
  check_split(in, y.S, y.rows, where);
  check_split(in, x.S, x.rows, where);
}

inline dim3 pair_grid(const Input& in, int Sy, int Sx) {
  const int64_t ct = channel_tile(in.vec);
  return dim3(static_cast<unsigned>(2 * ((in.D + ct - 1) / ct)), static_cast<unsigned>(Sy > Sx ? Sy : Sx),
              static_cast<unsigned>(in.B));
}

}  // namespace
}  // namespace cuda
}  // namespace entrodrop

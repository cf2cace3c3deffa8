// CUDA kernels of the bucket estimator for samples of any length: a min/max pass (the
// streaming statistics kernel without the moments), a binning pass into per-split partial
// histograms, and the entropy of the summed counts. See bucket_common.cuh for the design.
#include "bucket_common.cuh"
#include "stream_stats.cuh"

namespace entrodrop {
namespace cuda {
namespace {

// Phase 2 of bucket: bin counts of split s into phist [B, S, D, bins] (every entry written).
// GLOBAL: counters straight in global memory (too many bins for shared memory; phist zeroed).
template <typename T, int VEC, bool GLOBAL, bool HAS_F>
__device__ __forceinline__ void bucket_hist_body(const Input& in, int Sp, const float* __restrict__ pmin,
                                                 const float* __restrict__ pmax, int S, int64_t rows,
                                                 int bins, int32_t* __restrict__ phist, unsigned tile, int s,
                                                 int64_t b) {
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
      a = INFINITY;
      z = -INFINITY;
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
        float y =
            scalar_to_float<T>(static_cast<const T*>(in.x) + (b * in.sxb + t * in.sxt + (d0 + k) * in.sxd));
        if constexpr (HAS_F)
          y = __fadd_rn(y, scalar_to_float<T>(static_cast<const T*>(in.f) +
                                              (b * in.sfb + t * in.sft + (d0 + k) * in.sfd)));
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
    bucket_hist_kernel(Input in, int Sp, const float* __restrict__ pmin, const float* __restrict__ pmax,
                       int S, int64_t rows, int bins, int32_t* __restrict__ phist) {
  bucket_hist_body<T, VEC, GLOBAL, HAS_F>(in, Sp, pmin, pmax, S, rows, bins, phist, blockIdx.x, blockIdx.y,
                                          blockIdx.z);
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
      bucket_hist_body<T, VEC, GLOBAL, true>(in, y.Sp, y.pmin, y.pmax, y.S, y.rows, bins, y.phist, tile, s,
                                             blockIdx.z);
  } else if (s < x.S) {
    Input ix = in;
    ix.f = nullptr;
    bucket_hist_body<T, VEC, GLOBAL, false>(ix, x.Sp, x.pmin, x.pmax, x.S, x.rows, bins, x.phist, tile, s,
                                            blockIdx.z);
  }
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

template <typename T, int VEC, bool GLOBAL>
auto hist_kernel(bool has_f) {
  return has_f ? bucket_hist_kernel<T, VEC, GLOBAL, true> : bucket_hist_kernel<T, VEC, GLOBAL, false>;
}

}  // namespace

const char* minmax_partial(const Input& in, int S, int64_t rows, float* pmin, float* pmax, int device,
                           void* stream) {
  check_input(in, "minmax_partial");
  check_split(in, S, rows, "minmax_partial");
  if (const char* e = prepare(device)) return e;
  const dim3 grid = stream_grid(in, S);
  auto st = static_cast<cudaStream_t>(stream);
  // clang-format breaks the launch syntax inside this macro argument:
  // clang-format off
  ENTRODROP_DISPATCH(in, stats_kernel<T, VEC, false>(in.f != nullptr)<<<grid, kThreads, 0, st>>>(in, S, rows, nullptr, nullptr, nullptr, pmin, pmax););
  // clang-format on
  return last_error();
}

const char* bucket_hist(const Input& in, int S_partial, const float* pmin, const float* pmax, int S,
                        int64_t rows, int bins, int32_t* phist, int device, void* stream) {
  check_input(in, "bucket_hist");
  check_split(in, S, rows, "bucket_hist");
  check_bins(bins, "bucket_hist");
  if (const char* e = prepare(device)) return e;
  const size_t smem = hist_smem(bins, in.vec);
  const bool global = smem > static_cast<size_t>(smem_optin(device)) || rows > kMaxRowsPerHistBlock;
  const dim3 grid = stream_grid(in, S);
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  if (global) {
    const cudaError_t e =
        cudaMemsetAsync(phist, 0, static_cast<size_t>(in.B) * S * in.D * bins * sizeof(int32_t), st);
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  ENTRODROP_DISPATCH(in, {
    if (global) {
      hist_kernel<T, VEC, true>(in.f != nullptr)<<<grid, kThreads, 0, st>>>(in, S_partial, pmin, pmax, S,
                                                                            rows, bins, phist);
    } else {
      auto kernel = hist_kernel<T, VEC, false>(in.f != nullptr);
      err = allow_smem(kernel, smem);
      if (err == nullptr)
        kernel<<<grid, kThreads, smem, st>>>(in, S_partial, pmin, pmax, S, rows, bins, phist);
    }
  });
  if (err != nullptr) return err;
  return last_error();
}

const char* bucket_entropy(int64_t B, int64_t D, int bins, int S, const int32_t* phist, int paper_exact,
                           double* out, int device, void* stream) {
  if (const char* e = prepare(device)) return e;
  const int64_t warps = B * D;
  const dim3 grid(static_cast<unsigned>((warps + 7) / 8));
  bucket_entropy_kernel<<<grid, 256, 0, static_cast<cudaStream_t>(stream)>>>(B, D, bins, S, phist,
                                                                             paper_exact, out);
  return last_error();
}

const char* minmax_pair_partial(const Input& in, const StatsHalf& y, const StatsHalf& x, int device,
                                void* stream) {
  check_pair(in, y, x, "minmax_pair_partial");
  if (const char* e = prepare(device)) return e;
  const dim3 grid = pair_grid(in, y.S, x.S);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stream_stats_pair_kernel<T, VEC, false><<<grid, kThreads, 0, st>>>(in, y, x););
  return last_error();
}

const char* bucket_hist_pair(const Input& in, int bins, const HistHalf& y, const HistHalf& x, int device,
                             void* stream) {
  ED_CHECK_IN("bucket_hist_pair", in.f != nullptr, "a pair launch needs f");
  check_input(in, "bucket_hist_pair");
  check_split(in, y.S, y.rows, "bucket_hist_pair");
  check_split(in, x.S, x.rows, "bucket_hist_pair");
  check_bins(bins, "bucket_hist_pair");
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

int hist_max_rows() {
  return kMaxRowsPerHistBlock;
}

namespace detail {
const char* occupancy_hist(const Input& in, int bins, int optin, int* n) {
  cudaError_t e = cudaSuccess;
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, {
    const size_t smem = hist_smem(bins, VEC);
    if (smem > static_cast<size_t>(optin)) {  // bucket_hist uses global counters
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, hist_kernel<T, VEC, true>(in.f != nullptr),
                                                        kThreads, 0);
    } else {
      auto kernel = hist_kernel<T, VEC, false>(in.f != nullptr);
      err = allow_smem(kernel, smem);
      if (err == nullptr) e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, kernel, kThreads, smem);
    }
  });
  if (err != nullptr) return err;
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
}  // namespace detail

}  // namespace cuda
}  // namespace entrodrop

// CUDA kernel of the bucket estimator for short samples (T <= kFusedRows on the 16-byte path):
// one read of global memory per (sample, channel tile), the rows held in registers; and its
// pair launch. See bucket_common.cuh for the design.
#include "bucket_common.cuh"

namespace entrodrop {
namespace cuda {
namespace {

// One read of global memory for short samples (T <= kFusedRows, fast path): a block per
// (channel tile, sample) holds its rows in registers, computes min/max, bins, and writes the
// counts (counts [B, D, bins], if not null) and/or the entropy (out [B, D], if not null).
template <typename T, int VEC, bool HAS_F>
__device__ __forceinline__ void bucket_fused_body(const Input& in, int bins, int paper_exact,
                                                  int32_t* __restrict__ counts, double* __restrict__ out,
                                                  unsigned tile, int64_t b) {
  using G = Geo<VEC>;
  constexpr int UF = kFusedRows / G::RG;
  extern __shared__ __align__(16) uint32_t sh[];
  const int nbp = (bins + 1) / 2, sp = bins | 1;
  uint32_t* cnt = sh;
  int32_t* stage = reinterpret_cast<int32_t*>(sh + nbp * VEC * 32);
  double* table = reinterpret_cast<double*>(stage + G::CT * sp);   // c * ln(c), c <= kFusedRows
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
    for (int i = tid; i <= kFusedRows; i += kThreads)
      table[i] = i == 0 ? 0.0 : i * log(static_cast<double>(i));
  }

  float mn[VEC], mx[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    mn[k] = INFINITY;
    mx[k] = -INFINITY;
#pragma unroll
    for (int i = 0; i < UF; ++i)
      if (ok[i]) {
        mn[k] = fmin_nan(mn[k], v[i][k]);
        mx[k] = fmax_nan(mx[k], v[i][k]);
      }
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

template <typename T, int VEC>
const char* launch_fused(const Input& in, dim3 grid, size_t smem, cudaStream_t st, int bins, int paper_exact,
                         int32_t* counts, double* out) {
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

// The single read's own requirements (after check_input), for `where`.
void check_fused(const Input& in, int bins, const char* where) {
  ED_CHECK_IN(where, in.vec != 1, "needs the 16-byte fast path (vec 4 or 8)");
  ED_CHECK_IN(where, in.T <= kFusedRows, "needs T <= ", kFusedRows, ", got ", in.T);
  check_bins(bins, where);
}

}  // namespace

const char* bucket_fused(const Input& in, int bins, int paper_exact, int32_t* counts, double* out, int device,
                         void* stream) {
  check_input(in, "bucket_fused");
  check_fused(in, bins, "bucket_fused");
  if (const char* e = prepare(device)) return e;
  const size_t smem = fused_smem(bins, in.vec);
  ED_CHECK_IN("bucket_fused", smem <= static_cast<size_t>(smem_optin(device)),
              "too many bins for shared memory (", bins, ")");
  const int64_t ct = channel_tile(in.vec);
  const dim3 grid(static_cast<unsigned>((in.D + ct - 1) / ct), static_cast<unsigned>(in.B));
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, err = launch_fused<T, VEC>(in, grid, smem, st, bins, paper_exact, counts, out););
  if (err != nullptr) return err;
  return last_error();
}

const char* bucket_fused_pair(const Input& in, int bins, int paper_exact, const FusedHalf& y,
                              const FusedHalf& x, int device, void* stream) {
  ED_CHECK_IN("bucket_fused_pair", in.f != nullptr, "a pair launch needs f");
  check_input(in, "bucket_fused_pair");
  check_fused(in, bins, "bucket_fused_pair");
  if (const char* e = prepare(device)) return e;
  const size_t smem = fused_smem(bins, in.vec);
  ED_CHECK_IN("bucket_fused_pair", smem <= static_cast<size_t>(smem_optin(device)),
              "too many bins for shared memory (", bins, ")");
  const int64_t ct = channel_tile(in.vec);
  const dim3 grid(static_cast<unsigned>(2 * ((in.D + ct - 1) / ct)), static_cast<unsigned>(in.B));
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, err = launch_fused_pair<T, VEC>(in, grid, smem, st, bins, paper_exact, y, x););
  if (err != nullptr) return err;
  return last_error();
}

int fused_max_rows() {
  return kFusedRows;
}

namespace detail {
const char* occupancy_fused(const Input& in, int bins, int optin, int* n) {
  cudaError_t e = cudaSuccess;
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, {
    const size_t smem = fused_smem(bins, VEC);
    if (VEC == 1 || smem > static_cast<size_t>(optin)) {
      *n = 0;
    } else if constexpr (VEC > 1) {
      auto kernel = in.f != nullptr ? bucket_fused_kernel<T, VEC, true> : bucket_fused_kernel<T, VEC, false>;
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

// CUDA kernel of the bucket estimator for short samples, the occupancy design (an alternative
// to bucket_fused_cuda.cu's register kernel, selected by cuda_backend.FUSED_KERNEL = "tile").
#include "bucket_common.cuh"

namespace entrodrop {
namespace cuda {
namespace {

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
    m.ys = 0;                                               // float [kFusedRows][kTileCh]
    m.table = m.ys + sizeof(float) * kFusedRows * kTileCh;  // double [kFusedRows + 1]
    m.mn = m.table + sizeof(double) * (kFusedRows + 1);     // float [kWarps][kTileCh]
    m.mx = m.mn + sizeof(float) * kWarps * kTileCh;         // float [kWarps][kTileCh]
    m.flag = m.mx + sizeof(float) * kWarps * kTileCh;       // int [kTileCh]: 1 bad channel
    m.stage = m.flag + sizeof(int) * kTileCh;               // int32 [kTileCh][bins | 1]
    m.cnt = m.stage + sizeof(int32_t) * kTileCh * static_cast<size_t>(bins | 1);  // uint8, tile_counter
    m.valid = m.cnt + static_cast<size_t>((bins + 3) / 4) * 4 * kThreads;         // uint8 [kFusedRows]
    m.total = m.valid + kFusedRows;
    return m;
  }
};

// Byte offset of thread t's 8-bit counter of bin j: the word (j / 4) * kThreads + t.
__device__ __forceinline__ int tile_counter(int j, int t) {
  return (((j >> 2) * kThreads + t) << 2) + (j & 3);
}

template <typename T, int VEC, bool HAS_F>
__global__ void __launch_bounds__(kThreads, 4)
    bucket_tile_kernel(Input in, int bins, int paper_exact, int32_t* __restrict__ counts,
                       double* __restrict__ out) {
  constexpr int LT = kTileCh / VEC;        // threads per row in the load phase (4 or 8)
  constexpr int RP = kThreads / LT;        // rows per load pass (64 or 32)
  constexpr int U = HAS_F ? 2 : 4;         // rows per thread in flight
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
          for (int h = 0; h < VEC / 4; ++h)
            row[h] = make_float4(v[i][4 * h], v[i][4 * h + 1], v[i][4 * h + 2], v[i][4 * h + 3]);
        }
      }
    }
  }
  if (out != nullptr) {
    for (int i = tid; i <= kFusedRows; i += kThreads)
      table[i] = i == 0 ? 0.0 : i * log(static_cast<double>(i));
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
  if (out != nullptr)
    write_entropy(stage, sp, bins, table, nch, paper_exact, out + b * in.D + dt, lane, warp);
}

template <typename T, int VEC>
const char* launch_tile(const Input& in, dim3 grid, size_t smem, cudaStream_t st, int bins, int paper_exact,
                        int32_t* counts, double* out) {
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

const char* bucket_tile(const Input& in, int bins, int paper_exact, int32_t* counts, double* out, int device,
                        void* stream) {
  check_input(in, "bucket_tile");
  ED_CHECK_IN("bucket_tile", in.vec != 1, "needs the 16-byte fast path (vec 4 or 8)");
  ED_CHECK_IN("bucket_tile", in.T <= kFusedRows, "needs T <= ", kFusedRows, ", got ", in.T);
  check_bins(bins, "bucket_tile");
  if (const char* e = prepare(device)) return e;
  const size_t smem = TileSmem::of(bins).total;
  ED_CHECK_IN("bucket_tile", smem <= static_cast<size_t>(smem_optin(device)),
              "too many bins for shared memory (", bins, ")");
  const dim3 grid(static_cast<unsigned>((in.D + kTileCh - 1) / kTileCh), static_cast<unsigned>(in.B));
  auto st = static_cast<cudaStream_t>(stream);
  const char* err = nullptr;
  ENTRODROP_DISPATCH(in, err = launch_tile<T, VEC>(in, grid, smem, st, bins, paper_exact, counts, out););
  if (err != nullptr) return err;
  return last_error();
}

}  // namespace cuda
}  // namespace entrodrop

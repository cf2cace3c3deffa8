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
//
// This header: the bin index, the fp64 path of "wide" channels, the staging of counters and
// the entropy of a block's channels, shared by the two-pass (bucket_hist_cuda.cu) and the
// single-read (bucket_fused_cuda.cu, bucket_tile_cuda.cu) histograms.
#pragma once
#include "cuda_common.cuh"

namespace entrodrop {
namespace cuda {
namespace {

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
__device__ __forceinline__ void stage_counts(const uint32_t* __restrict__ cnt, int32_t* __restrict__ stage,
                                             int nbp, int bins, int sp, int lane, int warp) {
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

// H_d of the block's nch channels from their counts stage[ch * sp + j] into o[ch], one warp per
// channel, with table[c] = c ln c: H = ln N - (sum_j c_j ln c_j) / N (= -sum_j p_j ln p_j);
// paper_exact adds -1e-10 ln(1e-10) per empty bin (p_j = c_j / N >= 1/N > 1e-10 for the
// others); a negative count (a channel holding a non-finite value) gives NaN.
__device__ __forceinline__ void write_entropy(const int32_t* __restrict__ stage, int sp, int bins,
                                              const double* __restrict__ table, int nch, int paper_exact,
                                              double* __restrict__ o, int lane, int warp) {
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

inline size_t hist_smem(int bins, int vec) {
  const size_t nbp = (bins + 1) / 2;
  return nbp * vec * 32 * sizeof(uint32_t) +
         static_cast<size_t>(channel_tile(vec)) * (bins | 1) * sizeof(int32_t);
}

inline size_t fused_smem(int bins, int vec) {
  return hist_smem(bins, vec) + (kFusedRows + 1) * sizeof(double) +
         2 * kWarps * channel_tile(vec) * sizeof(float);
}

}  // namespace
}  // namespace cuda
}  // namespace entrodrop

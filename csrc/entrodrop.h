// The CPU kernels' entry points (*_cpu.cpp), bound in bindings.cpp. No pybind11 here: the
// shared boundary (dtype codes, checks, limits) is entrodrop_common.h.
//
//   x, f, other : [B, T, D], dtype code DT_F32 / DT_F16 / DT_BF16, strides (sb, st, sd)
//   mask        : [B, T] bool (1 byte per element), strides (mb, mt), or pointer 0 = none
//   f / other   : pointer 0 = none
#pragma once
#include <cstdint>
#include <string>

#include "entrodrop_common.h"

namespace entrodrop {

// ----------------------------------------------------------------- CPU kernels (*_cpu.cpp)
// moments: per sample b, per channel d, over valid tokens of y = x (+ f) in fp32:
//   count [B] f64, mean [B, D] f64, m2 [B, D] f64 (sum of squared deviations), min/max [B, D] f32.
void moments_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape, const Dims& xstride,
                 const Dims& fstride, const Dims& mstride, uintptr_t count, uintptr_t mean, uintptr_t m2,
                 uintptr_t mn, uintptr_t mx, int nthreads);
// bucket: per-channel histogram entropy H_d in nats, f64 [B, D] (docs/CONTRACT.md, exactly).
void bucket_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape, const Dims& xstride,
                const Dims& fstride, const Dims& mstride, int bins, bool paper_exact, uintptr_t out,
                int nthreads);
// The pairs (delta_entropy): both of Y = x + f (out_y / *_y) and of x alone (out_x / *_x),
// from one read of x and f; f is required.
void moments_pair_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                      const Dims& xstride, const Dims& fstride, const Dims& mstride, uintptr_t count,
                      uintptr_t mean_y, uintptr_t m2_y, uintptr_t mn_y, uintptr_t mx_y, uintptr_t mean_x,
                      uintptr_t m2_x, uintptr_t mn_x, uintptr_t mx_x, int nthreads);
void bucket_pair_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                     const Dims& xstride, const Dims& fstride, const Dims& mstride, int bins,
                     bool paper_exact, uintptr_t out_y, uintptr_t out_x, int nthreads);
// bucket_cosine: bucket_cpu's H_d of Y = x (+ f) into out, and the cosine between Y and its
// partner (x when f is given, else c) summed over valid tokens f64 [B] with the count f64 [B],
// as cosine_cpu: one read of x, f and c (the cosine's per-token sums ride on the tile's
// gather). Exactly one of f and c.
void bucket_cosine_cpu(uintptr_t x, uintptr_t f, uintptr_t c, uintptr_t mask, int dtype, const Dims& shape,
                       const Dims& xstride, const Dims& fstride, const Dims& cstride, const Dims& mstride,
                       int bins, bool paper_exact, uintptr_t out, uintptr_t cos_sum, uintptr_t cos_count,
                       int nthreads);
// cosine: sum over valid tokens of cos(x_t, Y_t) f64 [B] and the count f64 [B];
// Y = x + other (fused) or other.
void cosine_cpu(uintptr_t x, uintptr_t other, uintptr_t mask, int dtype, const Dims& shape,
                const Dims& xstride, const Dims& ostride, const Dims& mstride, bool fused, uintptr_t out_sum,
                uintptr_t out_count, int nthreads);
// knn (see knn_cpu.cpp for the method): x [N, D] with strides xstride (2), sqn fp32 [N]
// squared norms of the effective vectors, delta a bound on the fp32 error of the expanded
// squared distances |v_i|^2 + |v_j|^2 - 2 v_i.v_j. Outputs are exact fp64 distances from a
// row to its k-th nearest other row (self excluded by index), recomputed from x.
// knn_sqnorm: out f64 [N] += sum over the column ranges [(start, stop), ...] of x^2, fp64
// accumulation; x fp32 [N, D] with row stride ld and channel stride 1.
void knn_sqnorm_cpu(uintptr_t x, int64_t N, int64_t D, int64_t ld, const Dims& ranges, uintptr_t out,
                    int nthreads);
// knn_tile: one tile gram fp32 [nr, nc] (row stride ld) = v[r0:r0+nr] . v[c0:c0+nc]^T, on the
// diagonal (r0 == c0) or above it; offers its distances to the candidate lists val fp32 /
// idx int32 [N, cap], cnt int32 [N] (start 0), thr fp32 [N] (start +inf).
void knn_tile_cpu(uintptr_t gram, int64_t ld, uintptr_t sqn, int64_t N, int64_t r0, int64_t nr, int64_t c0,
                  int64_t nc, int k, double delta, uintptr_t val, uintptr_t idx, uintptr_t cnt, uintptr_t thr,
                  int64_t cap, int nthreads);
// knn_finish: the k-th distances f64 [N] from the lists once every tile is in; NaN for a row
// whose list overflowed (cnt -1), to be answered by knn_select. unit: the Gram tiles, norms
// and delta are of the rows x / unit (scaled by a power of two into fp32 range; 1 if not).
void knn_finish_cpu(uintptr_t val, uintptr_t idx, uintptr_t cnt, int64_t N, int64_t cap, int k, double delta,
                    uintptr_t x, int dtype, const Dims& xstride, int64_t D, uintptr_t out, int nthreads,
                    double unit);
// knn_select: whole rows; gram fp32 [R, N] contiguous, gram[r, j] = v_{rows[r]} . v_j,
// rows int64 [R]; writes f64 [R]. unit as knn_finish.
void knn_select_cpu(uintptr_t gram, uintptr_t sqn, int64_t R, int64_t N, uintptr_t rows, int k, double delta,
                    uintptr_t x, int dtype, const Dims& xstride, int64_t D, uintptr_t out, int nthreads,
                    double unit);
// knn_fused: every sample of y = x (+ f) [B, T, D] (mask [B, T] or 0) with at most 512 valid
// tokens, in one call (knn_fused_cpu.cpp): out f64 [B, T] = distance from each valid token to
// its k-th nearest other valid token (NaN at masked tokens), count f64 [B] = valid tokens,
// logsum f64 [B] = sum over valid tokens of ln(r + 1e-10). Samples with more valid tokens
// are skipped (out NaN, logsum NaN, count set); returns how many. Raises when a sample has
// <= k valid tokens.
// Most valid tokens of a sample knn_fused_cpu answers (Python: _C.KNN_FUSED_MAX_N).
constexpr int64_t kKnnFusedMaxN = 512;
int64_t knn_fused_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                      const Dims& xstride, const Dims& fstride, const Dims& mstride, int k, uintptr_t out,
                      uintptr_t count, uintptr_t logsum, int nthreads);
// Which copy of knn_fused's kernels runs here: "x86-64-v4", "x86-64-v3" or "baseline".
std::string knn_isa_cpu();
// Which threads the CPU kernels run on: "pool", "openmp team of <runtime path>" or "std::thread".
std::string thread_pool_cpu();
// This process was forked after the package was imported: the CPU kernels use the pool.
void mark_forked_cpu();
}  // namespace entrodrop

// k-th nearest neighbour distance for the Kozachenko-Leonenko estimator.
//
// Division of labour (see entrodrop_fast/ops/cpp_backend.py): Python computes tiles of the
// Gram matrix G = v v^T of effective vectors v (x with its massive channels centred; same
// distances) with torch.mm/addmm (BLAS), only the tiles on and above the diagonal, into one
// reused T x T buffer. knn_tile_cpu turns a tile into approximate squared distances
// a_ij = |v_i|^2 + |v_j|^2 - 2 G_ij and offers each to row i and, for an off-diagonal tile,
// to row j (the symmetric half is never computed). Each row keeps a short candidate list
// (capacity `cap`, O(N k) memory in all) of the a_j not above its threshold; when the list
// is full it is compacted: threshold = (k-th smallest so far) + 2 delta, which only
// decreases, so nothing dropped can be within 2 delta of the final k-th smallest A_k.
// knn_finish_cpu then refines exactly: fp32 Gram distances cancel badly when rows share a
// large component (LLM activations); with |a_j - t_j| <= delta (t the true squared
// distance), rows with a_j < A_k - 2 delta are surely among the k nearest, rows with
// a_j > A_k + 2 delta surely not, and the k-th distance is the (k - sure)-th smallest
// *exact* fp64 distance within the band in between (usually a handful of rows). A row whose
// list cannot be compacted below 3/4 of cap (many near-ties, e.g. duplicated rows) is marked
// (count -1) and answered by knn_select_cpu from a full Gram row instead.
#include <cmath>
#include <limits>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

ED_CLONES void fill_d2(const float* g, const float* sqn, float si, int64_t N, float* d2) {
  for (int64_t j = 0; j < N; ++j) d2[j] = (si + sqn[j]) - 2.0f * g[j];
}

template <int DT>
ED_INLINE double dist_impl(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) {
  double acc[8] = {};
  int64_t d = 0;
  auto val = [&](const uint8_t* p, int64_t j) -> double {
    if constexpr (DT == DT_F32)
      return reinterpret_cast<const float*>(p)[j * sd];
    else if constexpr (DT == DT_F16)
      return f16_to_f32(reinterpret_cast<const uint16_t*>(p)[j * sd]);
    else
      return bf16_to_f32(reinterpret_cast<const uint16_t*>(p)[j * sd]);
  };
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) {
      const double e = val(a, d + j) - val(b, d + j);
      acc[j] += e * e;
    }
  for (int j = 0; d + j < D; ++j) {
    const double e = val(a, d + j) - val(b, d + j);
    acc[j] += e * e;
  }
  double s = 0;
  for (int j = 0; j < 8; ++j) s += acc[j];
  return std::sqrt(s);
}
// Contiguous fp32 rows (the common case): 8 lanes of fp64 per step, two accumulators.
typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
ED_CLONES double dist_f32_dense(const float* a, const float* b, int64_t D) {
  D8 acc0 = {}, acc1 = {};  // (common_cpu.h: not a 64-byte vector)
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const D8 e0 =
        to_d8(*reinterpret_cast<const v8f_u*>(a + d)) - to_d8(*reinterpret_cast<const v8f_u*>(b + d));
    const D8 e1 =
        to_d8(*reinterpret_cast<const v8f_u*>(a + d + 8)) - to_d8(*reinterpret_cast<const v8f_u*>(b + d + 8));
    acc0 += e0 * e0;
    acc1 += e1 * e1;
  }
  acc0 += acc1;
  double s = 0;
  for (int j = 0; j < 8; ++j) s += lane(acc0, j);
  for (; d < D; ++d) {
    const double e = double(a[d]) - double(b[d]);
    s += e * e;
  }
  return std::sqrt(s);
}
ED_CLONES double dist_f32(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) {
  if (sd == 1) return dist_f32_dense(reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), D);
  return dist_impl<DT_F32>(a, b, sd, D);
}
ED_CLONES double dist_f16(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) {
  return dist_impl<DT_F16>(a, b, sd, D);
}
ED_CLONES double dist_bf16(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) {
  return dist_impl<DT_BF16>(a, b, sd, D);
}

// Exact fp64 distance between rows i and j of x [N, D] (strides in elements).
struct ExactDist {
  const uint8_t* base;
  int dtype;
  int64_t s0, sd, D, es;
  ExactDist(uintptr_t x, int dt, const Dims& stride, int64_t d)
      : base(reinterpret_cast<const uint8_t*>(x)),
        dtype(dt),
        s0(stride[0]),
        sd(stride[1]),
        D(d),
        es(dt == DT_F32 ? 4 : 2),
        dist(by_dtype(dt, dist_f32, dist_f16, dist_bf16)) {}
  double (*dist)(const uint8_t*, const uint8_t*, int64_t, int64_t);
  double operator()(int64_t i, int64_t j) const {
    return dist(base + i * s0 * es, base + j * s0 * es, sd, D);
  }
};

// The exact k-th distance of row i from the approximate squared distances a[0..n) of its
// candidates j = cand(t) (every j with a_j <= A_k + 2 delta must be among them, self
// excluded). `scratch` and `band` are per-thread buffers. `unit`: the a_j are squared
// distances of the rows x / unit (scaled by a power of two into fp32 range; 1 if not).
template <typename Cand>
double refine_kth(const float* a, int64_t n, Cand cand, int64_t i, int k, double delta, double unit,
                  const ExactDist& exact, std::vector<float>& scratch, std::vector<double>& band) {
  scratch.assign(a, a + n);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
  const double ak = scratch[size_t(k - 1)];
  const double lo = ak - 2 * delta, hi = ak + 2 * delta;
  int64_t sure = 0;
  band.clear();
  for (int64_t t = 0; t < n; ++t) {
    const double v = a[t];
    if (v < lo)
      ++sure;
    else if (v <= hi)
      band.push_back(exact(i, cand(t)));
  }
  const int64_t want = k - sure;                // 1-based rank within the band
  if (want < 1 || want > int64_t(band.size()))  // cannot happen when delta bounds the error
    return std::sqrt(std::max(0.0, ak)) * unit;
  std::nth_element(band.begin(), band.begin() + (want - 1), band.end());
  return band[size_t(want - 1)];
}

// Per-row candidate lists: row i holds cnt[i] pairs (val, idx) in slots [i*cap, i*cap+cap);
// thr[i] is the largest a still worth keeping; cnt[i] = -1 marks a row left to the fallback.
struct Candidates {
  float* val;
  int32_t* idx;
  int32_t* cnt;
  float* thr;
  int64_t cap;
  int k;
  double delta;

  // kth: the k-th smallest of some of row i's values, so >= the final A_k. The threshold is
  // rounded up, so that the fp32 comparison never drops a value <= kth + 2 delta.
  void lower(int64_t i, float kth) {
    const float t = std::nextafter(float(double(kth) + 2 * delta), std::numeric_limits<float>::infinity());
    if (t < thr[i]) thr[i] = t;
  }
  // Drop what can no longer matter; returns false (and marks the row) when too little goes.
  bool compact(int64_t i, std::vector<float>& scratch) {
    float* v = val + i * cap;
    int32_t* id = idx + i * cap;
    const int64_t n = cnt[i];
    scratch.assign(v, v + n);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
    lower(i, scratch[size_t(k - 1)]);
    int64_t m = 0;
    for (int64_t s = 0; s < n; ++s)
      if (v[s] <= thr[i]) {
        v[m] = v[s];
        id[m] = id[s];
        ++m;
      }
    if (4 * m > 3 * cap) {
      cnt[i] = -1;
      thr[i] = -std::numeric_limits<float>::infinity();  // nothing more is offered
      return false;
    }
    cnt[i] = int32_t(m);
    return true;
  }
  // Offer (a, j) to row i; the caller has checked a <= thr[i].
  ED_INLINE void push(int64_t i, float a, int64_t j, std::vector<float>& scratch) {
    if (cnt[i] == cap && !compact(i, scratch)) return;
    const int64_t c = cnt[i];
    if (a > thr[i]) return;  // the compaction may have lowered the threshold
    val[i * cap + c] = a;
    idx[i * cap + c] = int32_t(j);
    cnt[i] = int32_t(c + 1);
  }
};

constexpr int64_t kChunk = 64;

// hit[0..n) = the t < w with a[t] <= th(t), written branch-free (hits are a few percent of
// a chunk, at random places: a branch per element would mispredict); returns n.
template <typename Th>
ED_INLINE int hit_list(const float* a, int w, Th th, int* hit) {
  int n = 0;
  for (int t = 0; t < w; ++t) {
    hit[n] = t;
    n += a[t] <= th(t);
  }
  return n;
}

// Row side of a tile: rows [i0, i1) (tile-local) against all nc columns.
ED_CLONES void tile_rows(const float* g, int64_t ld, const float* sq, int64_t r0, int64_t c0, int64_t i0,
                         int64_t i1, int64_t nc, Candidates& cs, std::vector<float>& scratch) {
  float a[kChunk];
  const bool diag = r0 == c0;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t gi = r0 + i;
    if (cs.cnt[gi] < 0) continue;
    const float si = sq[gi];
    const float* gr = g + i * ld;
    if (cs.cnt[gi] == 0 && nc - int64_t(diag) >= cs.k) {
      // First sight of this row (the diagonal tiles come first): its threshold from the k-th
      // smallest of the whole tile row, so that only ~k values are pushed, not a flood.
      scratch.resize(size_t(nc));
      for (int64_t t = 0; t < nc; ++t) scratch[size_t(t)] = (si + sq[c0 + t]) - 2.0f * gr[t];
      if (diag) scratch[size_t(i)] = std::numeric_limits<float>::infinity();
      std::nth_element(scratch.begin(), scratch.begin() + (cs.k - 1), scratch.end());
      cs.lower(gi, scratch[size_t(cs.k - 1)]);
    }
    for (int64_t b = 0; b < nc; b += kChunk) {
      const int64_t w = std::min(kChunk, nc - b);
      const float th = cs.thr[gi];
      int any = 0;
      for (int64_t t = 0; t < w; ++t) {
        a[t] = (si + sq[c0 + b + t]) - 2.0f * gr[b + t];
        any |= a[t] <= th;
      }
      if (!any) continue;
      int hit[kChunk];
      const int nh = hit_list(a, int(w), [&](int) { return th; }, hit);
      for (int h = 0; h < nh; ++h) {
        const int64_t gj = c0 + b + hit[h];
        if (gj != gi && a[hit[h]] <= cs.thr[gi]) cs.push(gi, a[hit[h]], gj, scratch);
      }
    }
  }
}

// Column side of an off-diagonal tile: columns [j0, j1) (tile-local) against all nr rows,
// offered to the column's own row (the transposed half of the Gram matrix).
ED_CLONES void tile_cols(const float* g, int64_t ld, const float* sq, int64_t r0, int64_t c0, int64_t j0,
                         int64_t j1, int64_t nr, Candidates& cs, std::vector<float>& scratch) {
  float a[kChunk];
  for (int64_t b = j0; b < j1; b += kChunk) {
    const int64_t w = std::min(kChunk, j1 - b);
    const float* sqc = sq + c0 + b;
    const float* thc = cs.thr + c0 + b;
    for (int64_t i = 0; i < nr; ++i) {
      const float si = sq[r0 + i];
      const float* gr = g + i * ld + b;
      int any = 0;
      for (int64_t t = 0; t < w; ++t) {
        a[t] = (si + sqc[t]) - 2.0f * gr[t];
        any |= a[t] <= thc[t];
      }
      if (!any) continue;
      int hit[kChunk];
      const int nh = hit_list(a, int(w), [&](int t) { return thc[t]; }, hit);
      for (int h = 0; h < nh; ++h)
        if (a[hit[h]] <= thc[hit[h]]) cs.push(c0 + b + hit[h], a[hit[h]], r0 + i, scratch);
    }
  }
}

ED_CLONES double sqnorm_f32(const float* a, int64_t n) {
  D8 acc0 = {}, acc1 = {};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    const D8 e0 = to_d8(*reinterpret_cast<const v8f_u*>(a + d));
    const D8 e1 = to_d8(*reinterpret_cast<const v8f_u*>(a + d + 8));
    acc0 += e0 * e0;
    acc1 += e1 * e1;
  }
  acc0 += acc1;
  double s = 0;
  for (int j = 0; j < 8; ++j) s += lane(acc0, j);
  for (; d < n; ++d) s += double(a[d]) * double(a[d]);
  return s;
}

}  // namespace
}  // namespace cpu

// The arguments knn_select_cpu and knn_finish_cpu share: x [N, D] (read for the exact
// distances) and out (a macro, so that messages name the kernel).
#define ED_CHECK_ROWS_ARGS()                            \
  do {                                                  \
    ED_CHECK_PTR(x);                                    \
    ED_CHECK_PTR(out);                                  \
    ED_CHECK_DTYPE(dtype);                              \
    ED_CHECK_NDIM(xstride, 2);                          \
    ED_CHECK_NONNEG(xstride);                           \
    ED_CHECK(unit > 0, "unit must be > 0, got ", unit); \
  } while (0)

void knn_sqnorm_cpu(uintptr_t x, int64_t N, int64_t D, int64_t ld, const Dims& ranges, uintptr_t out,
                    int nthreads) {
  using namespace cpu;
  ED_CHECK_PTR(x);
  ED_CHECK_PTR(out);
  ED_CHECK(N >= 0 && D >= 0 && ld >= D, "need N, D >= 0 and ld >= D, got ", N, ", ", D, ", ", ld);
  ED_CHECK(ranges.size() % 2 == 0, "ranges must hold (start, stop) pairs, got ", ranges.size(), " entries");
  for (size_t r = 0; r < ranges.size(); r += 2)
    ED_CHECK(0 <= ranges[r] && ranges[r] <= ranges[r + 1] && ranges[r + 1] <= D, "range [", ranges[r], ", ",
             ranges[r + 1], ") must lie in [0, ", D, "]");
  const float* X = reinterpret_cast<const float*>(x);
  double* o = reinterpret_cast<double*>(out);
  const int nt = clamp_threads(nthreads, N, N * D);
  parallel_for(nt, nt, [&](int64_t p, int) {
    for (int64_t i = N * p / nt; i < N * (p + 1) / nt; ++i)
      for (size_t r = 0; r < ranges.size(); r += 2)
        o[i] += sqnorm_f32(X + i * ld + ranges[r], ranges[r + 1] - ranges[r]);
  });
}

void knn_select_cpu(uintptr_t gram, uintptr_t sqn, int64_t R, int64_t N, uintptr_t rows, int k, double delta,
                    uintptr_t x, int dtype, const Dims& xstride, int64_t D, uintptr_t out, int nthreads,
                    double unit) {
  using namespace cpu;
  ED_CHECK_PTR(gram);
  ED_CHECK_PTR(sqn);
  ED_CHECK_PTR(rows);
  ED_CHECK_ROWS_ARGS();
  ED_CHECK(R >= 0 && N >= 0, "rows and n must be >= 0, got ", R, " and ", N);
  ED_CHECK(k >= 1 && k < N, "k must be in [1, N - 1] = [1, ", N - 1, "], got ", k);
  ED_CHECK(delta >= 0, "delta must be >= 0, got ", delta);
  const float* G = reinterpret_cast<const float*>(gram);
  const float* sq = reinterpret_cast<const float*>(sqn);
  const int64_t* ri = reinterpret_cast<const int64_t*>(rows);
  for (int64_t r = 0; r < R; ++r)
    ED_CHECK(ri[r] >= 0 && ri[r] < N, "row index ", ri[r], " outside [0, ", N, ")");
  const ExactDist exact(x, dtype, xstride, D);
  double* o = reinterpret_cast<double*>(out);
  const int nt = clamp_threads(nthreads, R, R * N, 1 << 14);
  std::vector<std::vector<float>> d2s(static_cast<size_t>(nt)), sel(static_cast<size_t>(nt));
  std::vector<std::vector<double>> band(static_cast<size_t>(nt));
  parallel_for(R, nt, [&](int64_t r, int tid) {
    const int64_t i = ri[r];
    auto& d2 = d2s[size_t(tid)];
    d2.resize(size_t(N));
    fill_d2(G + r * N, sq, sq[i], N, d2.data());
    std::swap(d2[size_t(i)], d2[size_t(N - 1)]);  // self moved to the end and left out
    o[r] = refine_kth(
        d2.data(), N - 1, [&](int64_t t) { return t == i ? N - 1 : t; }, i, k, delta, unit, exact,
        sel[size_t(tid)], band[size_t(tid)]);
  });
}

void knn_tile_cpu(uintptr_t gram, int64_t ld, uintptr_t sqn, int64_t N, int64_t r0, int64_t nr, int64_t c0,
                  int64_t nc, int k, double delta, uintptr_t val, uintptr_t idx, uintptr_t cnt, uintptr_t thr,
                  int64_t cap, int nthreads) {
  using namespace cpu;
  ED_CHECK_PTR(gram);
  ED_CHECK_PTR(sqn);
  ED_CHECK_PTR(val);
  ED_CHECK_PTR(idx);
  ED_CHECK_PTR(cnt);
  ED_CHECK_PTR(thr);
  ED_CHECK(N >= 0 && N < (int64_t(1) << 31), "n must be in [0, 2^31), got ", N);
  ED_CHECK(r0 >= 0 && nr >= 0 && r0 + nr <= N && c0 >= 0 && nc >= 0 && c0 + nc <= N, "tile rows [", r0, ", ",
           r0 + nr, ") and columns [", c0, ", ", c0 + nc, ") must lie in [0, ", N, ")");
  ED_CHECK(r0 == c0 ? nr == nc : (r0 + nr <= c0 || c0 + nc <= r0),
           "a tile must be diagonal (r0 == c0, square) or not overlap the diagonal");
  ED_CHECK(ld >= nc, "ld must be >= nc, got ", ld, " < ", nc);
  ED_CHECK(k >= 1 && cap > k, "need 1 <= k < cap, got k = ", k, ", cap = ", cap);
  ED_CHECK(delta >= 0, "delta must be >= 0, got ", delta);
  Candidates cs{reinterpret_cast<float*>(val),
                reinterpret_cast<int32_t*>(idx),
                reinterpret_cast<int32_t*>(cnt),
                reinterpret_cast<float*>(thr),
                cap,
                k,
                delta};
  const float* G = reinterpret_cast<const float*>(gram);
  const float* sq = reinterpret_cast<const float*>(sqn);
  const bool diag = r0 == c0;
  // Work items own disjoint rows' lists: row chunks of the tile's rows, and (off the
  // diagonal) column chunks, whose lists are those of the tile's column indices.
  const int nt = clamp_threads(nthreads, nr + nc, nr * nc, 1 << 14);
  const int64_t parts = nt == 1 ? 1 : 2 * int64_t(nt);
  const int64_t items = diag ? parts : 2 * parts;
  std::vector<std::vector<float>> scratch(static_cast<size_t>(nt));
  parallel_for(items, nt, [&](int64_t it, int tid) {
    const bool rows_side = it < parts;
    const int64_t p = rows_side ? it : it - parts;
    const int64_t n = rows_side ? nr : nc;
    const int64_t lo = n * p / parts, hi = n * (p + 1) / parts;
    if (rows_side)
      tile_rows(G, ld, sq, r0, c0, lo, hi, nc, cs, scratch[size_t(tid)]);
    else
      tile_cols(G, ld, sq, r0, c0, lo, hi, nr, cs, scratch[size_t(tid)]);
  });
}

void knn_finish_cpu(uintptr_t val, uintptr_t idx, uintptr_t cnt, int64_t N, int64_t cap, int k, double delta,
                    uintptr_t x, int dtype, const Dims& xstride, int64_t D, uintptr_t out, int nthreads,
                    double unit) {
  using namespace cpu;
  ED_CHECK_PTR(val);
  ED_CHECK_PTR(idx);
  ED_CHECK_PTR(cnt);
  ED_CHECK_ROWS_ARGS();
  ED_CHECK(k >= 1 && k < N && cap > k, "need 1 <= k < min(N, cap), got k = ", k, ", N = ", N,
           ", cap = ", cap);
  const float* v = reinterpret_cast<const float*>(val);
  const int32_t* id = reinterpret_cast<const int32_t*>(idx);
  const int32_t* c = reinterpret_cast<const int32_t*>(cnt);
  const ExactDist exact(x, dtype, xstride, D);
  double* o = reinterpret_cast<double*>(out);
  const int nt = clamp_threads(nthreads, N, N * cap, 1 << 12);
  std::vector<std::vector<float>> sel(static_cast<size_t>(nt));
  std::vector<std::vector<double>> band(static_cast<size_t>(nt));
  parallel_for(N, nt, [&](int64_t i, int tid) {
    if (c[i] < k) {  // left to the fallback (-1); fewer than k cannot happen otherwise
      o[i] = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    const int32_t* ids = id + i * cap;
    o[i] = refine_kth(
        v + i * cap, c[i], [&](int64_t t) { return int64_t(ids[t]); }, i, k, delta, unit, exact,
        sel[size_t(tid)], band[size_t(tid)]);
  });
}

}  // namespace entrodrop

// k-th nearest neighbour distance for the Kozachenko-Leonenko estimator.
//
// Division of labour (see entrodrop_fast/ops/cpp_backend.py): Python computes one row
// block of the Gram matrix G = v[r0:r1] @ v.T of effective vectors v (x with its massive
// channels centred; same distances) with torch.mm/addmm (BLAS) into a reused buffer;
// knn_select_cpu turns it into approximate squared distances a_j = |v_i|^2 + |v_j|^2 - 2 G_ij
// and finds the k-th smallest A_k (nth_element, O(N) per row). fp32 Gram distances cancel
// badly when rows share a large component (LLM activations), so the answer is refined
// exactly: with |a_j - t_j| <= delta (t the true squared distance), rows with
// a_j < A_k - 2 delta are surely among the k nearest, rows with a_j > A_k + 2 delta surely
// not, and the k-th distance is the (k - sure)-th smallest *exact* fp64 distance within the
// band in between (usually a handful of rows). Memory: the R x N block + O(N) per thread.
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
    if constexpr (DT == DT_F32) return reinterpret_cast<const float*>(p)[j * sd];
    else if constexpr (DT == DT_F16) return f16_to_f32(reinterpret_cast<const uint16_t*>(p)[j * sd]);
    else return bf16_to_f32(reinterpret_cast<const uint16_t*>(p)[j * sd]);
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
typedef double v8d __attribute__((vector_size(64)));
ED_CLONES double dist_f32_dense(const float* a, const float* b, int64_t D) {
  v8d acc0 = {}, acc1 = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const v8d e0 = __builtin_convertvector(*reinterpret_cast<const v8f_u*>(a + d), v8d) -
                   __builtin_convertvector(*reinterpret_cast<const v8f_u*>(b + d), v8d);
    const v8d e1 = __builtin_convertvector(*reinterpret_cast<const v8f_u*>(a + d + 8), v8d) -
                   __builtin_convertvector(*reinterpret_cast<const v8f_u*>(b + d + 8), v8d);
    acc0 += e0 * e0;
    acc1 += e1 * e1;
  }
  acc0 += acc1;
  double s = 0;
  for (int j = 0; j < 8; ++j) s += acc0[j];
  for (; d < D; ++d) {
    const double e = double(a[d]) - double(b[d]);
    s += e * e;
  }
  return std::sqrt(s);
}
ED_CLONES double dist_f32(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) {
  if (sd == 1)
    return dist_f32_dense(reinterpret_cast<const float*>(a), reinterpret_cast<const float*>(b), D);
  return dist_impl<DT_F32>(a, b, sd, D);
}
ED_CLONES double dist_f16(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) { return dist_impl<DT_F16>(a, b, sd, D); }
ED_CLONES double dist_bf16(const uint8_t* a, const uint8_t* b, int64_t sd, int64_t D) { return dist_impl<DT_BF16>(a, b, sd, D); }

}  // namespace
}  // namespace cpu

void knn_select_cpu(uintptr_t gram, uintptr_t sqn, int64_t R, int64_t N, int64_t row0, int k,
                    double delta, uintptr_t x, int dtype, const Dims& xstride, int64_t D,
                    uintptr_t out, int nthreads) {
  using namespace cpu;
  ED_CHECK_PTR(gram);
  ED_CHECK_PTR(sqn);
  ED_CHECK_PTR(x);
  ED_CHECK_PTR(out);
  ED_CHECK_DTYPE(dtype);
  ED_CHECK_NDIM(xstride, 2);
  ED_CHECK_NONNEG(xstride);
  ED_CHECK(R >= 0 && N >= 0 && row0 >= 0 && row0 + R <= N, "rows [", row0, ", ", row0 + R,
           ") must lie in [0, ", N, ")");
  ED_CHECK(k >= 1 && k < N, "k must be in [1, N - 1] = [1, ", N - 1, "], got ", k);
  ED_CHECK(delta >= 0, "delta must be >= 0, got ", delta);
  const float* G = reinterpret_cast<const float*>(gram);
  const float* sq = reinterpret_cast<const float*>(sqn);
  const auto* base = reinterpret_cast<const uint8_t*>(x);
  const int64_t es = dtype == DT_F32 ? 4 : 2;
  double* o = reinterpret_cast<double*>(out);
  auto exact = [&](int64_t i, int64_t j) {
    const uint8_t* a = base + i * xstride[0] * es;
    const uint8_t* b = base + j * xstride[0] * es;
    if (dtype == DT_F16) return dist_f16(a, b, xstride[1], D);
    if (dtype == DT_BF16) return dist_bf16(a, b, xstride[1], D);
    return dist_f32(a, b, xstride[1], D);
  };
  const int nt = clamp_threads(nthreads, R, R * N, 1 << 14);
  std::vector<std::vector<float>> d2s(static_cast<size_t>(nt)), sel(static_cast<size_t>(nt));
  std::vector<std::vector<double>> band(static_cast<size_t>(nt));
  parallel_for(R, nt, [&](int64_t r, int tid) {
    const int64_t i = row0 + r;
    auto& d2 = d2s[size_t(tid)];
    auto& s = sel[size_t(tid)];
    auto& bd = band[size_t(tid)];
    d2.resize(size_t(N));
    fill_d2(G + r * N, sq, sq[i], N, d2.data());
    d2[size_t(i)] = std::numeric_limits<float>::infinity();  // self excluded by index
    s.assign(d2.begin(), d2.end());
    std::nth_element(s.begin(), s.begin() + (k - 1), s.end());
    const double ak = s[size_t(k - 1)];
    const double lo = ak - 2 * delta, hi = ak + 2 * delta;
    int64_t sure = 0;
    bd.clear();
    for (int64_t j = 0; j < N; ++j) {
      if (j == i) continue;
      const double a = d2[size_t(j)];
      if (a < lo) ++sure;
      else if (a <= hi) bd.push_back(exact(i, j));
    }
    const int64_t want = k - sure;  // 1-based rank within the band
    if (want < 1 || want > int64_t(bd.size())) {  // cannot happen when delta bounds the error
      o[r] = std::sqrt(std::max(0.0, ak));
      return;
    }
    std::nth_element(bd.begin(), bd.begin() + (want - 1), bd.end());
    o[r] = bd[size_t(want - 1)];
  });
}

}  // namespace entrodrop

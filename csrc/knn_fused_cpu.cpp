// knn for samples of up to kFusedMaxN valid tokens (an LLM calibration window: 256 tokens in
// the paper), the whole batch in one call: no torch op, no BLAS, one pool job per batch (or
// three per sample when there are fewer samples than threads).
//
// Per sample, over its valid rows y = x (+ f) in fp32 (mask applied):
//  1. a centre mu: the fp64 mean of up to 32 rows spread over the sample. Distances do not
//     depend on it; it only has to take away the large component LLM activations share
//     (massive channels), which would make the fp32 Gram trick cancel. v = fp32(y - mu),
//     zero-padded to a multiple of 16 channels, scaled by a power of two when its largest
//     squared norm leaves [2^-90, 2^120] (exact; the distances are scaled back).
//  2. the Gram matrix of v on and above the diagonal, by our own outer-product micro-kernel
//     (MR rows x a 16-column panel of v, AVX-512 / AVX2 / baseline chosen at run time; half
//     the work of a full product), turned at once into approximate squared distances
//     a_ij = |v_i|^2 + |v_j|^2 - 2 v_i.v_j, written to both halves of an N x N fp32 matrix
//     (at most 1 MiB), +inf on the diagonal.
//  3. per group of 16 (8) rows, one lane per row: a branch-free insertion network keeps the
//     KC >= k smallest a_ij of every row (k <= 64; beyond, nth_element per row), then a
//     second pass counts the values surely among the k nearest (a < A_k - 2 delta) and lists
//     the band [A_k - 2 delta, A_k + 2 delta], whose distances are recomputed exactly in
//     fp64 from y (usually none or a few): the k-th distance is the (k - sure)-th smallest of
//     them. delta bounds the fp32 error of a_ij as in the tiled path (knn_cpu.cpp).
// Outputs: the radii per token (NaN at masked tokens), and per sample the number of valid
// tokens and sum of ln(r + 1e-10) (the paper's estimator needs only that). Samples with more
// than kFusedMaxN valid tokens are left to the tiled path (radii NaN, count set, sum NaN).
// A sample with a NaN/Inf among its valid rows of y (x + f overflowing fp32 included) gets
// NaN radii and a NaN sum: the packing pass, which reads every value, checks them.
//
// This file is compiled with -ffp-contract=fast (CMakeLists.txt): the micro-kernel needs
// fused multiply-adds, and nothing here relies on bit-exact rounding (delta bounds the
// error of either rounding).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

constexpr int64_t kFusedMaxN = kKnnFusedMaxN;           // entrodrop.h (exported to Python)
constexpr int64_t kPanel = 1024;                        // channels per pass over a tile (its rows stay in L2)
constexpr int kMaxNet = 64;                             // the largest k for the insertion network
constexpr int kCentreRows = 32;                         // rows averaged for the centre mu
constexpr double kSmaxLo = 0x1p-90, kSmaxHi = 0x1p120;  // as KNN_SMAX_RANGE (cpp_backend.py)
constexpr float kInf = std::numeric_limits<float>::infinity();

typedef float v8f_u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));

template <int W>
struct Vt;
template <>
struct Vt<16> {
  using F = v16f;
  using FU = v16f_u;
  using I = v16i;
};
template <>
struct Vt<8> {
  using F = v8f;
  using FU = v8f_u;
  using I = v8i;
};

#if defined(__clang__)
#define ED_SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define ED_SHUF8(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// ----------------------------------------------------------------- the Gram matrix
// Outer-product form (as BLAS micro-kernels): V's rows are also stored in column panels of
// kPanelW rows, P[J][d][r] = V[J * kPanelW + r][d], so that for one channel d a panel's
// kPanelW values are contiguous vectors. A micro-tile of MR rows i x kPanelW columns keeps
// MR * kPanelW accumulators in registers; per channel it broadcasts MR values of V and
// loads kPanelW / W vectors of P: no horizontal sums, and about 1.5 loads per 2 fused
// multiply-adds (the dot-product form, 4 rows x 2 columns of W-lane sums, needed 6 loads per
// 8 and reached ~58% of one core's FMA peak on Zen 3; this form ~90% in isolation).
// Channels run in chunks of kChunkD, each summed from zero in registers and then added to
// the tile's total: at most kChunkD + Dp / kChunkD - 1 roundings stand between a product and
// the total (the 4-row form had Dp / 8 + 3), well inside delta's sqrt(D) (+ 8) eps for the
// magnitudes involved, and the panel's chunk (kChunkD x 64 B) stays in L1 while the rows of
// an item go by.
constexpr int64_t kPanelW = 16;   // columns per panel (a multiple of every W)
constexpr int64_t kChunkD = 128;  // channels summed in registers before joining the total
constexpr int kItemBlocks = 8;    // row blocks (of MR rows) per work item

// Columns 16 J .. 16 J + 15 of V (row-major, ld floats per row) as the panel P_J [Dp][16],
// by 8 x 8 transposes in registers.
ED_INLINE void transpose8(const float* src, int64_t ld, float* dst, int64_t dld) {
  v8f r[8], t[8], u[8];
  for (int q = 0; q < 8; ++q) r[q] = *reinterpret_cast<const v8f_u*>(src + q * ld);
  for (int q = 0; q < 8; q += 2) {
    t[q] = ED_SHUF8(r[q], r[q + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[q + 1] = ED_SHUF8(r[q], r[q + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int q = 0; q < 8; q += 4)
    for (int h = 0; h < 2; ++h) {
      u[q + 2 * h] = ED_SHUF8(t[q + h], t[q + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[q + 2 * h + 1] = ED_SHUF8(t[q + h], t[q + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  // u[c] (c < 4) holds rows 0-3 of columns c and c + 4; u[4 + c] rows 4-7 of the same
  for (int c = 0; c < 4; ++c) {
    *reinterpret_cast<v8f_u*>(dst + c * dld) = ED_SHUF8(u[c], u[4 + c], 0, 1, 2, 3, 8, 9, 10, 11);
    *reinterpret_cast<v8f_u*>(dst + (c + 4) * dld) = ED_SHUF8(u[c], u[4 + c], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
ED_CLONES void make_panel(const float* V, int64_t ld, int64_t Dp, float* P) {
  for (int64_t d = 0; d < Dp; d += 8)
    for (int64_t h = 0; h < kPanelW; h += 8) transpose8(V + h * ld + d, ld, P + d * kPanelW + h, kPanelW);
}

// x in every lane, as one broadcast load (GCC compiles both F{} + x and a lane-by-lane
// initializer to a chain of inserts; a shuffle of lane 0 becomes vbroadcastss)
template <int W>
ED_INLINE typename Vt<W>::F splat(float x) {
  using F = typename Vt<W>::F;
#if defined(__clang__)
  return F{} + x;
#else
  return __builtin_shuffle(F{x}, typename Vt<W>::I{});
#endif
}

template <int W, int MR>
struct Micro {
  using F = typename Vt<W>::F;
  using FU = typename Vt<W>::FU;
  static constexpr int NV = int(kPanelW) / W;  // vectors per panel row
  // acc[r * NV + v] += sum over d < kc of V[i + r][d] * P[d][v * W ..], for r < mr (<= MR);
  // a: row i's channel 0 of the chunk, p: the panel's.
  template <int M>
  static ED_INLINE void run(const float* a, int64_t ld, const float* p, int64_t kc, F* acc) {
    F c[M * NV];
    for (int q = 0; q < M * NV; ++q) c[q] = F{};
    for (int64_t d = 0; d < kc; ++d) {
      F b[NV];
      for (int v = 0; v < NV; ++v) b[v] = *reinterpret_cast<const FU*>(p + d * kPanelW + v * W);
#pragma GCC unroll 16
      for (int r = 0; r < M; ++r) {
        const F xr = splat<W>(a[r * ld + d]);  // a broadcast load
        for (int v = 0; v < NV; ++v) c[r * NV + v] += xr * b[v];
      }
    }
    for (int q = 0; q < M * NV; ++q) acc[q] += c[q];
  }
  static ED_INLINE void any(int mr, const float* a, int64_t ld, const float* p, int64_t kc, F* acc) {
    if (mr == MR) return run<MR>(a, ld, p, kc, acc);
    for (int r = 0; r < mr; ++r) run<1>(a + r * ld, ld, p, kc, acc + r * NV);
  }
};

// Rows [i0, i1) (at most kItemBlocks * MR) against the columns of panel J: G = V_i . V_j,
// turned at once into a_ij = s_i + s_j - 2 G and written to A[i][j] and A[j][i] for i <= j < n
// (+inf on the diagonal).
template <int W, int MR>
ED_INLINE void gram_item_impl(const float* V, int64_t ld, int64_t Dp, const float* P, const float* s,
                              int64_t J, int64_t i0, int64_t i1, int64_t n, float* A, int64_t lda) {
  using M = Micro<W, MR>;
  using F = typename M::F;
  constexpr int NV = M::NV;
  F tot[kItemBlocks][MR * NV];
  const int nblk = int((i1 - i0 + MR - 1) / MR);
  for (int bk = 0; bk < nblk; ++bk)
    for (int q = 0; q < MR * NV; ++q) tot[bk][q] = F{};
  const float* PJ = P + J * Dp * kPanelW;
  for (int64_t d0 = 0; d0 < Dp; d0 += kChunkD) {
    const int64_t kc = std::min(kChunkD, Dp - d0);
    for (int bk = 0; bk < nblk; ++bk) {
      const int64_t i = i0 + int64_t(bk) * MR;
      M::any(int(std::min<int64_t>(MR, i1 - i)), V + i * ld + d0, ld, PJ + d0 * kPanelW, kc, tot[bk]);
    }
  }
  const int64_t j0 = J * kPanelW, j1 = std::min(j0 + kPanelW, n);
  for (int bk = 0; bk < nblk; ++bk)
    for (int r = 0; r < MR; ++r) {
      const int64_t gi = i0 + int64_t(bk) * MR + r;
      if (gi >= i1) break;
      const float si = s[gi];
      for (int64_t gj = std::max(gi, j0); gj < j1; ++gj) {
        const int64_t j = gj - j0;
        const float g = tot[bk][r * NV + j / W][j % W];
        const float a = gi == gj ? kInf : (si + s[gj]) - 2.0f * g;
        A[gi * lda + gj] = a;
        A[gj * lda + gi] = a;
      }
    }
}

// 2 delta_i for row i: a bound on the fp32 error of every a_ij that can decide row i's k-th
// neighbour, from its own squared norm s_i and its approximate k-th value ak, instead of the
// sample's largest squared norm (one massive-activation token, |y| ~ 2e4 in mid layers of
// SmolLM2, would otherwise widen every row's band until most distances are recomputed in
// fp64: 6.6 ms instead of 0.35 ms for a [256, 576] sample). The error of a_ij is at most
// c max(s_i, s_j), c = 4 (sqrt(D) + 8) eps (as delta). A row j with a_ij <= ak + 2 delta_i
// has s_j <= S_i = ((sqrt(s_i) + sqrt(c s_i + ak + 2 delta_i)) / (1 - c))^2 (triangle
// inequality: a_ij >= (|v_j| - |v_i|)^2, and a_ij <= its value + c s_j), so delta_i >= c S_i
// bounds all of their errors; rows with larger s_j are farther than ak + 2 delta_i. delta_i is
// taken as 4 c (sqrt(s_i) + sqrt(ak))^2 (+ the subnormal term), checked to be >= c S_i with a
// margin; where it is not (or anything is not finite) the sample's twodelta stands.
ED_INLINE float row_twodelta(float si, float ak, float c, float twodelta) {
  const double cd = c, sig = std::sqrt(double(si)), kk = std::max(0.0, double(ak));
  if (!(sig < 1e30) || !(kk < 1e30) || !(cd < 0.25)) return twodelta;
  const double rt = sig + std::sqrt(kk);
  const double d = 4.0 * cd * rt * rt + 0x1p-126;
  const double r2 = (sig + std::sqrt(cd * double(si) + kk + 2.0 * d)) / (1.0 - cd);
  if (cd * r2 * r2 * (1.0 + 0x1p-8) > d) return twodelta;
  return std::min(twodelta, float(2.0 * d * (1.0 + 0x1p-20)));
}

// Rows [i0, i0 + W) of A (one lane each; A is symmetric, so row i's values are column i):
// kth[l] = the k-th smallest of a_{i0+l, j} over j < n (KC >= k of them kept, sorted, by a
// branch-free insertion network); then sure[l] = #{j: a < kth - 2 delta} and `band` gets
// (l, j) for every a in [kth - 2 delta, kth + 2 delta].
template <int W, int KC>
ED_INLINE void select_impl(const float* A, int64_t lda, int64_t n, int64_t i0, int k, const float* s, float c,
                           float twodelta, float* kth, int32_t* sure, std::vector<int64_t>& band) {
  using F = typename Vt<W>::F;
  using FU = typename Vt<W>::FU;
  using I = typename Vt<W>::I;
  F L[KC];
  for (int t = 0; t < KC; ++t) L[t] = F{} + kInf;
  for (int64_t j = 0; j < n; ++j) {
    F x = *reinterpret_cast<const FU*>(A + j * lda + i0);
#pragma GCC unroll 64
    for (int t = 0; t < KC; ++t) {
      const F lo = L[t] < x ? L[t] : x;
      x = L[t] < x ? x : L[t];
      L[t] = lo;
    }
  }
  F ak = L[0];
  for (int t = 1; t < KC; ++t)
    if (t == k - 1) ak = L[t];
  // each row's own 2 delta (row_twodelta), at most the sample's
  float tdl[W];
  for (int l = 0; l < W; ++l) tdl[l] = i0 + l < n ? row_twodelta(s[i0 + l], ak[l], c, twodelta) : twodelta;
  F td;
  std::memcpy(&td, tdl, sizeof td);
  // the band's ends rounded outwards (fp32 arithmetic: a margin of 2^-20 relative)
  const F av = ak < 0 ? -ak : ak;
  const F pad = td * (1.0f + 0x1p-20f) + av * 0x1p-20f;
  const F lo = ak - pad, hi = ak + pad;
  // per lane: how many below the band, how many in it, and the first and last j in it
  I cnt = I{}, nb = I{}, first = I{} + int32_t(n), last = I{} - 1;
  for (int64_t j = 0; j < n; ++j) {
    const F x = *reinterpret_cast<const FU*>(A + j * lda + i0);
    const I below = x < lo;  // (only < comparisons: GCC 12 scalarises a vector >= of floats)
    cnt -= below;
    const I in = ~(below | (hi < x));
    nb -= in;
    const I jj = I{} + int32_t(j);
    first = in & (jj < first) ? jj : first;
    last = in ? jj : last;
  }
  for (int l = 0; l < W; ++l) {
    kth[l] = ak[l];
    sure[l] = cnt[l];
    if (nb[l] == 0) continue;  // the usual case: no value within 2 delta of the k-th
    band.push_back(int64_t(first[l]) * W + l);
    if (nb[l] == 1) continue;
    for (int64_t j = first[l] + 1; j < last[l]; ++j) {
      const float a = A[j * lda + i0 + l];
      if (a >= lo[l] && a <= hi[l]) band.push_back(j * W + l);
    }
    band.push_back(int64_t(last[l]) * W + l);
  }
}

// KC = k up to 32 (k = 25 is the paper's), the next multiple of 4 up to kMaxNet.
template <int W>
ED_INLINE void select_dispatch(const float* A, int64_t lda, int64_t n, int64_t i0, int k, const float* s,
                               float c, float twodelta, float* kth, int32_t* sure,
                               std::vector<int64_t>& band) {
  const int kc = k <= 32 ? k : (k + 3) / 4 * 4;
  // clang-format off
  switch (kc) {
#define ED_CASE(q) \
  case q: return select_impl<W, q>(A, lda, n, i0, k, s, c, twodelta, kth, sure, band);
    ED_CASE(1) ED_CASE(2) ED_CASE(3) ED_CASE(4) ED_CASE(5) ED_CASE(6) ED_CASE(7) ED_CASE(8)
    ED_CASE(9) ED_CASE(10) ED_CASE(11) ED_CASE(12) ED_CASE(13) ED_CASE(14) ED_CASE(15) ED_CASE(16)
    ED_CASE(17) ED_CASE(18) ED_CASE(19) ED_CASE(20) ED_CASE(21) ED_CASE(22) ED_CASE(23) ED_CASE(24)
    ED_CASE(25) ED_CASE(26) ED_CASE(27) ED_CASE(28) ED_CASE(29) ED_CASE(30) ED_CASE(31) ED_CASE(32)
    ED_CASE(36) ED_CASE(40) ED_CASE(44) ED_CASE(48) ED_CASE(52) ED_CASE(56) ED_CASE(60) ED_CASE(64)
#undef ED_CASE
    default: return;  // k > kMaxNet: not called
  }
  // clang-format on
}

// One compiled copy per instruction set, chosen once at run time.
#define ED_GRAM_ARGS                                                                                         \
  const float *V, int64_t ld, int64_t Dp, const float *P, const float *s, int64_t J, int64_t i0, int64_t i1, \
      int64_t n, float *A, int64_t lda
#define ED_GRAM_PASS V, ld, Dp, P, s, J, i0, i1, n, A, lda
#define ED_SEL_ARGS                                                                                   \
  const float *A, int64_t lda, int64_t n, int64_t i0, int k, const float *s, float c, float twodelta, \
      float *kth, int32_t *sure, std::vector<int64_t>&band
#ifdef ED_HAVE_X86_LEVELS
__attribute__((target("arch=x86-64-v4"))) void gram_item_v4(ED_GRAM_ARGS) {
  gram_item_impl<16, 12>(ED_GRAM_PASS);
}
__attribute__((target("arch=x86-64-v3"))) void gram_item_v3(ED_GRAM_ARGS) {
  gram_item_impl<8, 6>(ED_GRAM_PASS);
}
__attribute__((target("arch=x86-64-v4"))) void select_v4(ED_SEL_ARGS) {
  select_dispatch<16>(A, lda, n, i0, k, s, c, twodelta, kth, sure, band);
}
__attribute__((target("arch=x86-64-v3"))) void select_v3(ED_SEL_ARGS) {
  select_dispatch<8>(A, lda, n, i0, k, s, c, twodelta, kth, sure, band);
}
#endif
void gram_item_base(ED_GRAM_ARGS) {
  gram_item_impl<8, 3>(ED_GRAM_PASS);
}
void select_base(ED_SEL_ARGS) {
  select_dispatch<8>(A, lda, n, i0, k, s, c, twodelta, kth, sure, band);
}

struct Isa {
  void (*gram)(ED_GRAM_ARGS) = gram_item_base;
  int mr = 3;  // rows per micro-tile
  void (*select)(ED_SEL_ARGS) = select_base;
  int width = 8;  // rows per select group
  const char* name = "baseline";
};

// The best the CPU runs, or less when ENTRODROP_ISA says so ("x86-64-v3" or "baseline": for
// tests of the other copies).
const Isa& isa() {
  static const Isa is = [] {
    Isa r;
#ifdef ED_HAVE_X86_LEVELS
    const int level = isa_level();
    if (level >= 4) {
      r.gram = gram_item_v4;
      r.mr = 12;
      r.select = select_v4;
      r.width = 16;
      r.name = "x86-64-v4";
    } else if (level == 3) {
      r.gram = gram_item_v3;
      r.mr = 6;
      r.select = select_v3;
      r.name = "x86-64-v3";
    }
#endif
    return r;
  }();
  return is;
}

// 8 consecutive values of dtype DT (channel stride 1) in fp32, converted in registers.
template <int DT>
ED_INLINE v8f load8(const uint8_t* p) {
  if constexpr (DT == DT_F32) {
    return *reinterpret_cast<const v8f_u*>(p);
  } else {
    typedef uint16_t v8h_u __attribute__((vector_size(16), aligned(2)));
    typedef uint32_t v8u __attribute__((vector_size(32)));
    const v8u u = __builtin_convertvector(*reinterpret_cast<const v8h_u*>(p), v8u);
    if constexpr (DT == DT_BF16) {
      return reinterpret_cast<v8f>(u << 16);
    } else {  // IEEE half, as f16_to_f32
      const v8u sign = (u & 0x8000u) << 16;
      const v8u em = u & 0x7fffu;
      v8f f = reinterpret_cast<v8f>(em << 13) * (v8f{} + 0x1p112f);
      v8u r = reinterpret_cast<v8u>(f);
      r |= reinterpret_cast<v8u>(em >= 0x7c00u) & 0x7f800000u;
      r |= sign;
      return reinterpret_cast<v8f>(r);
    }
  }
}
// ----------------------------------------------------------------- exact distances
// sum of (a_d - b_d)^2 over w fp32 values, fp64, in a fixed order (16 lanes, then the rest),
// whatever the layout the values came from.
ED_CLONES void sqdiff_acc(const float* a, const float* b, int64_t w, D8& acc0, D8& acc1, double& tail) {
  int64_t d = 0;
  for (; d + 16 <= w; d += 16) {
    const D8 e0 =
        to_d8(*reinterpret_cast<const v8f_u*>(a + d)) - to_d8(*reinterpret_cast<const v8f_u*>(b + d));
    const D8 e1 =
        to_d8(*reinterpret_cast<const v8f_u*>(a + d + 8)) - to_d8(*reinterpret_cast<const v8f_u*>(b + d + 8));
    acc0 += e0 * e0;
    acc1 += e1 * e1;
  }
  for (; d < w; ++d) {
    const double e = double(a[d]) - double(b[d]);
    tail += e * e;
  }
}

// sqdiff_acc reading rows of dtype DT in place (channel stride 1): the same sums in the same
// order, without the copy to fp32 first (the copy made bf16 select cost 1.4x fp32 at
// [256, 4096]: 934 vs 659 us; this version not yet timed on its own).
template <int DT>
ED_INLINE void sqdiff_acc_t(const uint8_t* a, const uint8_t* b, int64_t w, D8& acc0, D8& acc1, double& tail) {
  constexpr int64_t es = DT == DT_F32 ? 4 : 2;
  int64_t d = 0;
  for (; d + 16 <= w; d += 16) {
    const D8 e0 = to_d8(load8<DT>(a + d * es)) - to_d8(load8<DT>(b + d * es));
    const D8 e1 = to_d8(load8<DT>(a + (d + 8) * es)) - to_d8(load8<DT>(b + (d + 8) * es));
    acc0 += e0 * e0;
    acc1 += e1 * e1;
  }
  for (; d < w; ++d) {
    const double e = double(load1<DT>(a, d)) - double(load1<DT>(b, d));
    tail += e * e;
  }
}
ED_CLONES void sqdiff_acc_f16(const uint8_t* a, const uint8_t* b, int64_t w, D8& acc0, D8& acc1,
                              double& tail) {
  sqdiff_acc_t<DT_F16>(a, b, w, acc0, acc1, tail);
}
ED_CLONES void sqdiff_acc_bf16(const uint8_t* a, const uint8_t* b, int64_t w, D8& acc0, D8& acc1,
                               double& tail) {
  sqdiff_acc_t<DT_BF16>(a, b, w, acc0, acc1, tail);
}

struct Rows {
  const View* x;
  const View* f;
  int64_t b, D;
  bool dense;  // fp32, channel stride 1, no f: rows are read in place
  bool in_place() const { return f == nullptr && x->sd == 1; }  // any dtype, read in place
};

constexpr int64_t kChunk = 256;  // a multiple of 16: remainders only in the last chunk

template <int DT>
double exact_dist_t(const Rows& r, int64_t ta, int64_t tb, float* ya, float* yb) {
  D8 acc0 = {}, acc1 = {};
  double tail = 0;
  for (int64_t d0 = 0; d0 < r.D; d0 += kChunk) {
    const int64_t w = std::min(kChunk, r.D - d0);
    if (DT == DT_F32 && r.dense) {
      sqdiff_acc(reinterpret_cast<const float*>(r.x->row(r.b, ta)) + d0,
                 reinterpret_cast<const float*>(r.x->row(r.b, tb)) + d0, w, acc0, acc1, tail);
    } else if (DT != DT_F32 && r.in_place()) {
      (DT == DT_F16 ? sqdiff_acc_f16 : sqdiff_acc_bf16)(r.x->row(r.b, ta) + d0 * 2,
                                                        r.x->row(r.b, tb) + d0 * 2, w, acc0, acc1, tail);
    } else {
      load_y<DT>(*r.x, r.f, r.b, ta, d0, w, ya);
      load_y<DT>(*r.x, r.f, r.b, tb, d0, w, yb);
      sqdiff_acc(ya, yb, w, acc0, acc1, tail);
    }
  }
  acc0 += acc1;
  double s = 0;
  for (int j = 0; j < 8; ++j) s += lane(acc0, j);
  return std::sqrt(s + tail);
}

double exact_dist(int dtype, const Rows& r, int64_t ta, int64_t tb, float* ya, float* yb) {
  return dispatch_dtype(dtype, [&](auto dt) { return exact_dist_t<decltype(dt)::value>(r, ta, tb, ya, yb); });
}

// ----------------------------------------------------------------- packing
// v = fp32((y - mu) * scale) into V (ld >= D, zero padded), s = |v|^2 (fp32 from fp64),
// s64 = |y - mu|^2 in fp64 (finite even when v overflows fp32).
ED_CLONES void pack_row(const float* y, const double* mu, int64_t D, int64_t ld, double scale, float* v,
                        float& s, double& s64) {
  D8 q0 = {}, q1 = {}, e0s = {}, e1s = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const D8 e0 = to_d8(*reinterpret_cast<const v8f_u*>(y + d)) - load_d8(mu + d);
    const D8 e1 = to_d8(*reinterpret_cast<const v8f_u*>(y + d + 8)) - load_d8(mu + d + 8);
    const v8f f0 = to_f8(e0 * scale);
    const v8f f1 = to_f8(e1 * scale);
    *reinterpret_cast<v8f_u*>(v + d) = f0;
    *reinterpret_cast<v8f_u*>(v + d + 8) = f1;
    const D8 g0 = to_d8(f0), g1 = to_d8(f1);
    q0 += g0 * g0;
    q1 += g1 * g1;
    e0s += e0 * e0;
    e1s += e1 * e1;
  }
  q0 += q1;
  e0s += e1s;
  double qs = 0, es = 0;
  for (int j = 0; j < 8; ++j) {
    qs += lane(q0, j);
    es += lane(e0s, j);
  }
  for (; d < D; ++d) {
    const double e = double(y[d]) - mu[d];
    const float fv = float(e * scale);
    v[d] = fv;
    qs += double(fv) * double(fv);
    es += e * e;
  }
  for (; d < ld; ++d) v[d] = 0.0f;
  s = float(qs);
  s64 = es;
}

// The first packing, in fp32: v = fl32(y - mu32) (mu32 = fp32(mu): any centre gives the
// same distances; one rounding per channel, as the fp64 path's), s = |v|^2 (fp64 sum),
// s64 = s in fp64. Faster than pack_row (no fp64 per channel but the square); one
// thread, min of 100: [256, 576] fp32 48 -> 20 us, bf16 59 -> 32 us; [256, 4096] fp32
// 392 -> 225 us, bf16 478 -> 234 us (the gram tiles: 374 and 3190 us). Returns false when v is not finite (y
// non-finite, or y - mu past fp32's range): the caller then packs the row with pack_row, whose s64 tells
// which. Rows of dtype DT read in place (channel stride 1).
template <int DT>
ED_INLINE bool pack_row32_t(const uint8_t* y, const float* mu32, int64_t D, int64_t ld, float* v, float& s,
                            double& s64) {
  constexpr int64_t es = DT == DT_F32 ? 4 : 2;
  D8 q0 = {}, q1 = {};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const v8f e0 = load8<DT>(y + d * es) - *reinterpret_cast<const v8f_u*>(mu32 + d);
    const v8f e1 = load8<DT>(y + (d + 8) * es) - *reinterpret_cast<const v8f_u*>(mu32 + d + 8);
    *reinterpret_cast<v8f_u*>(v + d) = e0;
    *reinterpret_cast<v8f_u*>(v + d + 8) = e1;
    const D8 g0 = to_d8(e0), g1 = to_d8(e1);
    q0 += g0 * g0;
    q1 += g1 * g1;
  }
  q0 += q1;
  double qs = 0;
  for (int j = 0; j < 8; ++j) qs += lane(q0, j);
  for (; d < D; ++d) {
    const float e = load1<DT>(y, d) - mu32[d];
    v[d] = e;
    qs += double(e) * double(e);
  }
  for (; d < ld; ++d) v[d] = 0.0f;
  s = float(qs);
  s64 = qs;
  return std::isfinite(qs);
}
ED_CLONES bool pack_row32_f32(const uint8_t* y, const float* mu32, int64_t D, int64_t ld, float* v, float& s,
                              double& s64) {
  return pack_row32_t<DT_F32>(y, mu32, D, ld, v, s, s64);
}
ED_CLONES bool pack_row32_f16(const uint8_t* y, const float* mu32, int64_t D, int64_t ld, float* v, float& s,
                              double& s64) {
  return pack_row32_t<DT_F16>(y, mu32, D, ld, v, s, s64);
}
ED_CLONES bool pack_row32_bf16(const uint8_t* y, const float* mu32, int64_t D, int64_t ld, float* v, float& s,
                               double& s64) {
  return pack_row32_t<DT_BF16>(y, mu32, D, ld, v, s, s64);
}

// ----------------------------------------------------------------- per-sample work
template <typename T>
struct Buf {
  std::unique_ptr<T[]> p;
  size_t cap = 0;
  T* get(size_t n) {
    if (n > cap) {
      p.reset(new T[n]);
      cap = n;
    }
    return p.get();
  }
};

// A thread's buffers, kept between calls (a fresh allocation per call would come back as
// page faults every time).
struct Workspace {
  Buf<float> V, P, A, s;
  Buf<double> s64, mu;
  Buf<float> mu32;
  Buf<int64_t> rows;
};
Workspace& local_workspace() {
  static thread_local Workspace ws;
  return ws;
}

struct Scratch {
  std::vector<float> y;  // a row in fp32 (pack), two rows (exact distances)
  std::vector<int64_t> band;
  std::vector<double> dist;
  std::vector<float> row;
  std::vector<int64_t> mine;
};
Scratch& local_scratch() {
  static thread_local Scratch sc;
  return sc;
}

struct Sample {
  const View* x;
  const View* f;
  int dtype;
  int64_t b, T, D, n, Np, Dp;
  int k;
  int64_t* rows;  // token index of each valid row
  double* mu;
  float* mu32;           // fp32(mu)
  float *V, *P, *A, *s;  // P: V's rows in column panels (make_panel)
  double* s64;
  double scale = 1.0, unit = 1.0, delta = 0.0, c = 0.0;  // c: the per-pair error coefficient
  double* out;                                           // radii of sample b: out[t], t < T

  Rows exact_rows() const { return Rows{x, f, b, D, dtype == DT_F32 && f == nullptr && x->sd == 1}; }
};

template <int DT>
void load_row(const Sample& sp, int64_t t, float* y) {
  load_y<DT>(*sp.x, sp.f, sp.b, t, 0, sp.D, y);
}
void load_row_any(const Sample& sp, int64_t t, float* y) {
  dispatch_dtype(sp.dtype, [&](auto dt) { load_row<decltype(dt)::value>(sp, t, y); });
}

// Step 1 (serial): the valid rows' indices and the centre.
void setup(Sample& sp, const Mask& mv, Workspace& ws, Scratch& sc) {
  sp.Np = (sp.n + kPanelW - 1) / kPanelW * kPanelW;
  sp.Dp = (sp.D + 15) / 16 * 16;
  sp.rows = ws.rows.get(size_t(sp.n));
  sp.mu = ws.mu.get(size_t(sp.D));
  sp.mu32 = ws.mu32.get(size_t(sp.D));
  sp.V = ws.V.get(size_t(sp.Np * sp.Dp));
  sp.P = ws.P.get(size_t(sp.Np * sp.Dp));
  sp.A = ws.A.get(size_t(sp.Np * sp.Np));
  // the select groups' lanes past n read columns n .. Np - 1 of A's rows j < n (the Gram
  // items write only i, j < n)
  for (int64_t j = 0; j < sp.n; ++j) std::fill(sp.A + j * sp.Np + sp.n, sp.A + (j + 1) * sp.Np, kInf);
  sp.s = ws.s.get(size_t(sp.Np));
  sp.s64 = ws.s64.get(size_t(sp.Np));
  int64_t m = 0;
  for (int64_t t = 0; t < sp.T; ++t)
    if (mv(sp.b, t)) sp.rows[m++] = t;
  for (int64_t t = 0; t < sp.T; ++t)
    if (!mv(sp.b, t)) sp.out[t] = std::numeric_limits<double>::quiet_NaN();
  // padding rows: v = 0, s = 0 (their a_ij are never read for j >= n)
  for (int64_t i = sp.n; i < sp.Np; ++i) {
    std::fill(sp.V + i * sp.Dp, sp.V + (i + 1) * sp.Dp, 0.0f);
    sp.s[i] = 0.0f;
  }
  const int64_t c = std::min<int64_t>(sp.n, kCentreRows);
  sc.y.resize(size_t(2 * sp.D));
  std::fill(sp.mu, sp.mu + sp.D, 0.0);
  for (int64_t r = 0; r < c; ++r) {
    load_row_any(sp, sp.rows[r * sp.n / c], sc.y.data());
    for (int64_t d = 0; d < sp.D; ++d) sp.mu[d] += sc.y[size_t(d)];
  }
  for (int64_t d = 0; d < sp.D; ++d) {
    sp.mu[d] /= double(c);
    sp.mu32[d] = float(sp.mu[d]);
  }
}

void pack(const Sample& sp, int64_t r0, int64_t r1, Scratch& sc) {
  // rows with channel stride 1 and no f: read in place (and converted) by the fp32 packing
  const bool in_place = sp.f == nullptr && sp.x->sd == 1;
  sc.y.resize(size_t(2 * sp.D));
  for (int64_t i = r0; i < r1; ++i) {
    float* v = sp.V + i * sp.Dp;
    const uint8_t* raw = sp.x->row(sp.b, sp.rows[i]);
    const float* y = nullptr;  // the row in fp32, once loaded
    auto load = [&] {
      if (y) return y;
      if (in_place && sp.dtype == DT_F32) return y = reinterpret_cast<const float*>(raw);
      load_row_any(sp, sp.rows[i], sc.y.data());
      return y = sc.y.data();
    };
    if (sp.scale == 1.0) {  // the first packing: fp32
      bool ok;
      if (in_place && sp.dtype == DT_BF16)
        ok = pack_row32_bf16(raw, sp.mu32, sp.D, sp.Dp, v, sp.s[i], sp.s64[i]);
      else if (in_place && sp.dtype == DT_F16)
        ok = pack_row32_f16(raw, sp.mu32, sp.D, sp.Dp, v, sp.s[i], sp.s64[i]);
      else
        ok = pack_row32_f32(reinterpret_cast<const uint8_t*>(load()), sp.mu32, sp.D, sp.Dp, v, sp.s[i],
                            sp.s64[i]);
      if (ok) continue;
    }
    pack_row(load(), sp.mu, sp.D, sp.Dp, sp.scale, v, sp.s[i], sp.s64[i]);
  }
  // the panels of these rows (r0 is a multiple of kPanelW, and so is r1 unless it is n:
  // rows n .. Np - 1 are zero since setup)
  for (int64_t J = r0 / kPanelW; J * kPanelW < r1; ++J)
    make_panel(sp.V + J * kPanelW * sp.Dp, sp.Dp, sp.Dp, sp.P + J * kPanelW * sp.Dp);
}

// Between packing and the Gram tiles (serial): whether every valid row of y is finite, the
// scale (repacking when the squared norms leave fp32's comfortable range) and delta.
// s64[i] = |y_i - mu|^2 in fp64 is finite exactly when y_i is: |y - mu| < 2^129 per channel
// (mu is the mean of some y rows; a non-finite mu comes from a non-finite valid row, which
// makes every s64 NaN), so the packing pass doubles as the NaN/Inf check of
// docs/CONTRACT.md "Non-finite values", at no extra read.
enum class Scale { Ready, Repack, NonFinite };
Scale check_scale(Sample& sp) {
  double smax64 = 0;
  for (int64_t i = 0; i < sp.n; ++i) {
    if (!std::isfinite(sp.s64[i])) return Scale::NonFinite;
    smax64 = std::max(smax64, sp.s64[i]);
  }
  if (sp.scale == 1.0 && smax64 > 0 && (smax64 < kSmaxLo || smax64 > kSmaxHi)) {
    const int e = int(std::floor(std::log2(smax64) / 2));
    sp.scale = std::ldexp(1.0, -e);
    sp.unit = std::ldexp(1.0, e);
    return Scale::Repack;
  }
  float smax = 0;
  for (int64_t i = 0; i < sp.n; ++i) smax = std::max(smax, sp.s[i]);
  // as knn_cpu.cpp / cpp_backend._knn: 4 (sqrt(D) + 8) eps max|v|^2, plus D subnormal
  // roundings; the centring's own rounding (|v - (y - mu)| <= eps/2 |y - mu| per channel)
  // adds at most 4 eps max|v|^2, inside the + 8.
  const double eps = std::numeric_limits<float>::epsilon();
  sp.c = 4.0 * (std::sqrt(double(sp.D)) + 8.0) * eps;
  sp.delta = sp.c * double(smax) + 4.0 * double(sp.D) * 0x1p-149;
  return Scale::Ready;
}

// A sample with a non-finite valid row: radii and log sum NaN (the report of CONTRACT.md).
void mark_nonfinite(const Sample& sp, double* olog) {
  for (int64_t i = 0; i < sp.n; ++i) sp.out[sp.rows[i]] = std::numeric_limits<double>::quiet_NaN();
  olog[sp.b] = std::numeric_limits<double>::quiet_NaN();
}

// Gram work items: per column panel J, the rows i <= its last column, in runs of
// kItemBlocks micro-tiles.
int64_t item_rows() {
  return int64_t(kItemBlocks) * isa().mr;
}
int64_t panel_rows(const Sample& sp, int64_t J) {
  return std::min(sp.n, (J + 1) * kPanelW);
}
int64_t n_gram_items(const Sample& sp) {
  int64_t m = 0;
  for (int64_t J = 0; J * kPanelW < sp.n; ++J) m += (panel_rows(sp, J) + item_rows() - 1) / item_rows();
  return m;
}

void gram(const Sample& sp, int64_t item) {
  const int64_t R = item_rows();
  int64_t J = 0;
  for (;; ++J) {
    const int64_t m = (panel_rows(sp, J) + R - 1) / R;
    if (item < m) break;
    item -= m;
  }
  const int64_t i0 = item * R, i1 = std::min(panel_rows(sp, J), i0 + R);
  isa().gram(sp.V, sp.Dp, sp.Dp, sp.P, sp.s, J, i0, i1, sp.n, sp.A, sp.Np);
}

// The radius of row i from its candidates' approximate values a (j = cand[t]), given the
// k-th smallest ak and the number of values surely below the band.
double finish_row(const Sample& sp, int64_t i, float ak, int64_t sure, const int64_t* cand, int64_t nc,
                  Scratch& sc) {
  const Rows rr = sp.exact_rows();
  sc.dist.clear();
  sc.y.resize(size_t(2 * sp.D));
  for (int64_t c = 0; c < nc; ++c) {
    const double d = exact_dist(sp.dtype, rr, sp.rows[i], sp.rows[cand[c]], sc.y.data(), sc.y.data() + sp.D);
    sc.dist.push_back(d == d ? d : std::numeric_limits<double>::infinity());  // NaN input: stay ordered
  }
  const int64_t want = sp.k - sure;                // 1-based rank within the band
  if (want < 1 || want > int64_t(sc.dist.size()))  // cannot happen when delta bounds the error
    return std::sqrt(std::max(0.0, double(ak))) * sp.unit;
  std::nth_element(sc.dist.begin(), sc.dist.begin() + (want - 1), sc.dist.end());
  return sc.dist[size_t(want - 1)];
}

int64_t n_groups(const Sample& sp) {
  return sp.k <= kMaxNet ? (sp.n + isa().width - 1) / isa().width : sp.n;
}

void select(const Sample& sp, int64_t g, Scratch& sc) {
  const float twodelta = float(2 * sp.delta);
  if (sp.k > kMaxNet) {  // one row, nth_element
    const int64_t i = g;
    const float* a = sp.A + i * sp.Np;
    sc.row.assign(a, a + sp.n);
    for (auto& v : sc.row)
      if (v != v) v = kInf;
    std::nth_element(sc.row.begin(), sc.row.begin() + (sp.k - 1), sc.row.end());
    const float ak = sc.row[size_t(sp.k - 1)];
    const float td = row_twodelta(sp.s[i], ak, float(sp.c), twodelta);
    const float pad = td * (1.0f + 0x1p-20f) + std::fabs(ak) * 0x1p-20f;
    const float lo = ak - pad, hi = ak + pad;
    int64_t sure = 0;
    sc.band.clear();
    for (int64_t j = 0; j < sp.n; ++j) {
      sure += a[j] < lo;
      if (a[j] >= lo && a[j] <= hi) sc.band.push_back(j);
    }
    sp.out[sp.rows[i]] = finish_row(sp, i, ak, sure, sc.band.data(), int64_t(sc.band.size()), sc);
    return;
  }
  const int W = isa().width;
  const int64_t i0 = g * W;
  float kth[16];
  int32_t sure[16];
  sc.band.clear();
  isa().select(sp.A, sp.Np, sp.n, i0, sp.k, sp.s, float(sp.c), twodelta, kth, sure, sc.band);
  // band entries are j * W + lane, grouped by lane (in increasing lane order)
  std::vector<int64_t>& mine = sc.mine;
  size_t e = 0;
  for (int l = 0; l < W && i0 + l < sp.n; ++l) {
    mine.clear();
    for (; e < sc.band.size() && sc.band[e] % W == l; ++e) mine.push_back(sc.band[e] / W);
    sp.out[sp.rows[i0 + l]] = finish_row(sp, i0 + l, kth[l], sure[l], mine.data(), int64_t(mine.size()), sc);
  }
}

double log_sum(const Sample& sp) {
  double acc = 0;
  for (int64_t i = 0; i < sp.n; ++i) acc += std::log(sp.out[sp.rows[i]] + 1e-10);
  return acc;
}

// Items per pool job for packing: blocks of rows.
constexpr int64_t kPackRows = kPanelW;  // whole panels

}  // namespace
}  // namespace cpu

int64_t knn_fused_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                      const Dims& xstride, const Dims& fstride, const Dims& mstride, int k, uintptr_t out,
                      uintptr_t out_count, uintptr_t out_logsum, int nthreads) {
  using namespace cpu;
  check_common(x, dtype, shape, xstride, f, fstride, mask, mstride);
  ED_CHECK_PTR(out);
  ED_CHECK_PTR(out_count);
  ED_CHECK_PTR(out_logsum);
  ED_CHECK(k >= 1, "k must be >= 1, got ", k);
  const int64_t B = shape[0], T = shape[1], D = shape[2];
  ED_CHECK(D >= 1, "need at least one channel, got D = ", D);
  const View xv = make_view(x, dtype, xstride);
  View fv;
  if (f) fv = make_view(f, dtype, fstride);
  const View* fp = f ? &fv : nullptr;
  const Mask mv = make_mask(mask, mstride);
  double* o = reinterpret_cast<double*>(out);
  double* ocnt = reinterpret_cast<double*>(out_count);
  double* olog = reinterpret_cast<double*>(out_logsum);
  const double nan = std::numeric_limits<double>::quiet_NaN();

  std::vector<int64_t> nvalid(static_cast<size_t>(B));
  std::vector<int64_t> todo;
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t t = 0; t < T; ++t) n += mv(b, t);
    nvalid[size_t(b)] = n;
    ocnt[b] = double(n);
    olog[b] = nan;
    ED_CHECK(k < n, "k must be in [1, N - 1] = [1, ", n - 1, "], got ", k, " (sample ", b, " has ", n,
             " valid tokens)");
    if (n <= kFusedMaxN)
      todo.push_back(b);
    else
      for (int64_t t = 0; t < T; ++t) o[b * T + t] = nan;
  }
  const int64_t skipped = B - int64_t(todo.size());
  if (todo.empty()) return skipped;
  auto make = [&](int64_t b) {
    Sample sp{};
    sp.x = &xv;
    sp.f = fp;
    sp.dtype = dtype;
    sp.b = b;
    sp.T = T;
    sp.D = D;
    sp.n = nvalid[size_t(b)];
    sp.k = k;
    sp.out = o + b * T;
    return sp;
  };
  const int64_t nb = int64_t(todo.size());
  // work per sample ~ n^2 D / 2 multiply-adds: below ~2^21 of it in all, one thread
  int64_t work = 0;
  for (int64_t b : todo) work += nvalid[size_t(b)] * nvalid[size_t(b)] * D / 2;
  const int nt = clamp_threads(nthreads, work, work, int64_t(1) << 21);

  if (nb >= 2 * int64_t(nt) || nt == 1) {
    // whole samples per item: no waiting inside a sample
    parallel_for(nb, nt, [&](int64_t it, int) {
      Sample sp = make(todo[size_t(it)]);
      Workspace& ws = local_workspace();
      Scratch& sc = local_scratch();
      setup(sp, mv, ws, sc);
      pack(sp, 0, sp.n, sc);
      Scale st = check_scale(sp);
      if (st == Scale::Repack) {
        pack(sp, 0, sp.n, sc);
        st = check_scale(sp);
      }
      if (st == Scale::NonFinite) return mark_nonfinite(sp, olog);
      for (int64_t t = 0, nt2 = n_gram_items(sp); t < nt2; ++t) gram(sp, t);
      for (int64_t g = 0, ng = n_groups(sp); g < ng; ++g) select(sp, g, sc);
      olog[sp.b] = log_sum(sp);
    });
    return skipped;
  }
  // fewer samples than threads: each sample's steps in parallel, one after the other
  Workspace& ws = local_workspace();
  for (int64_t b : todo) {
    Sample sp = make(b);
    setup(sp, mv, ws, local_scratch());
    const int64_t pitems = (sp.n + kPackRows - 1) / kPackRows;
    Scale st = Scale::Repack;
    for (int pass = 0; pass < 2 && st == Scale::Repack; ++pass) {
      parallel_for(pitems, nt, [&](int64_t it, int) {
        pack(sp, it * kPackRows, std::min(sp.n, (it + 1) * kPackRows), local_scratch());
      });
      st = check_scale(sp);
    }
    if (st == Scale::NonFinite) {
      mark_nonfinite(sp, olog);
      continue;
    }
    parallel_for(n_gram_items(sp), nt, [&](int64_t it, int) { gram(sp, it); });
    parallel_for(n_groups(sp), nt, [&](int64_t g, int) { select(sp, g, local_scratch()); });
    olog[b] = log_sum(sp);
  }
  return skipped;
}

std::string knn_isa_cpu() {
  return cpu::isa().name;
}

}  // namespace entrodrop

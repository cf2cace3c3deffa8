// Cosine similarity between x_t and Y_t (Y = x + other when fused, else other) summed over
// the valid tokens of each sample. Work items are runs of tokens; each thread keeps its
// own per-sample fp64 sums, merged at the end. Dot products accumulate in 16 fp32 lanes
// over blocks of 256 channels, folded into fp64 lanes after each block; a row whose fp32
// products overflow (|values| past ~1e19) is redone in fp64.
//
// Non-finite values (docs/CONTRACT.md): a token whose x or Y holds NaN/Inf (x + f
// overflowing fp32 included) has cos = NaN, so its sample's sum is NaN. It costs nothing in
// the hot loop: NaN/Inf make the fp32 sums non-finite, which sends the row to the fp64 redo,
// where finite fp32 values can no longer overflow.
#include <cmath>
#include <cstring>
#include <limits>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

constexpr int LN = 16;   // fp32 lanes
constexpr int CB = 256;  // channels per fp32 block

// cos of one token; rows have channel stride 1.
template <int DT, bool FUSED>
ED_INLINE double cos_row(const uint8_t* xr, const uint8_t* orow, int64_t D) {
  constexpr int64_t kES = DT == DT_F32 ? 4 : 2;  // bytes per element
  // fp64 lane sums, 4 lanes per vector: a loop over double[16] stayed scalar (48 vaddsd and
  // 48 vcvtss2sd per block of 256 channels in the AVX2 clone)
  v4d dd[LN / 4] = {}, dx[LN / 4] = {}, dy[LN / 4] = {};
  for (int64_t c0 = 0; c0 < D; c0 += CB) {
    const int64_t c1 = std::min(D, c0 + CB);
    // explicit 16-lane vectors: left to itself GCC turns the unfused loop (y given) into a
    // permute-heavy SLP form 4-10x slower than the fused one; lane j sums the same products
    // in the same order as a scalar loop over j would
    v16f va{}, vnx{}, vny{};
    int64_t d = c0;
    for (; d + LN <= c1; d += LN) {
      const v16f xv = load16<DT>(xr + d * kES);
      const v16f ov = load16<DT>(orow + d * kES);
      const v16f yv = FUSED ? xv + ov : ov;
      va += xv * yv;
      vnx += xv * xv;
      vny += yv * yv;
    }
    float a[LN], nx[LN], ny[LN];
    std::memcpy(a, &va, sizeof a);
    std::memcpy(nx, &vnx, sizeof nx);
    std::memcpy(ny, &vny, sizeof ny);
    for (int j = 0; d + j < c1; ++j) {
      const float xv = load1<DT>(xr, d + j);
      const float ov = load1<DT>(orow, d + j);
      const float yv = FUSED ? xv + ov : ov;
      a[j] += xv * yv;
      nx[j] += xv * xv;
      ny[j] += yv * yv;
    }
    for (int q = 0; q < LN / 4; ++q) {
      dd[q] += __builtin_convertvector(*reinterpret_cast<const v4f_u*>(a + 4 * q), v4d);
      dx[q] += __builtin_convertvector(*reinterpret_cast<const v4f_u*>(nx + 4 * q), v4d);
      dy[q] += __builtin_convertvector(*reinterpret_cast<const v4f_u*>(ny + 4 * q), v4d);
    }
  }
  double dot = 0, sx = 0, sy = 0;
  for (int j = 0; j < LN; ++j) {
    dot += dd[j / 4][j % 4];
    sx += dx[j / 4][j % 4];
    sy += dy[j / 4][j % 4];
  }
  // an fp32 product or block sum overflowed (|x| or |Y| past ~1e19), or x or Y holds NaN/Inf:
  // the row again in fp64
  return FUSED ? cos_from_sums<DT>(dot, sx, sy, xr, 1, xr, 1, orow, 1, D)
               : cos_from_sums<DT>(dot, sx, sy, xr, 1, orow, 1, nullptr, 0, D);
}

template <int DT>
ED_INLINE void run_impl(const View& x, const View& o, const Mask& m, bool fused, int64_t T, int64_t D,
                        int64_t g0, int64_t g1, double* sums, double* counts, std::vector<float>& buf) {
  const bool direct = x.sd == 1 && o.sd == 1;
  if (!direct && buf.size() < size_t(2 * D)) buf.resize(size_t(2 * D));
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t b = g / T, t = g % T;
    if (!m(b, t)) continue;
    double c;
    if (direct) {
      c = fused ? cos_row<DT, true>(x.row(b, t), o.row(b, t), D)
                : cos_row<DT, false>(x.row(b, t), o.row(b, t), D);
    } else {
      float* xb = buf.data();
      float* ob = xb + D;
      load_seg<DT>(x.row(b, t), x.sd, D, xb);
      load_seg<DT>(o.row(b, t), o.sd, D, ob);
      const auto* xr = reinterpret_cast<const uint8_t*>(xb);
      const auto* orr = reinterpret_cast<const uint8_t*>(ob);
      c = fused ? cos_row<DT_F32, true>(xr, orr, D) : cos_row<DT_F32, false>(xr, orr, D);
    }
    sums[b] += c;
    counts[b] += 1.0;
  }
}

#define ED_COS_ARGS                                                                                      \
  const View &x, const View &o, const Mask &m, bool fused, int64_t T, int64_t D, int64_t g0, int64_t g1, \
      double *sums, double *counts, std::vector<float>&buf
ED_CLONES void run_f32(ED_COS_ARGS) {
  run_impl<DT_F32>(x, o, m, fused, T, D, g0, g1, sums, counts, buf);
}
ED_CLONES void run_f16(ED_COS_ARGS) {
  run_impl<DT_F16>(x, o, m, fused, T, D, g0, g1, sums, counts, buf);
}
ED_CLONES void run_bf16(ED_COS_ARGS) {
  run_impl<DT_BF16>(x, o, m, fused, T, D, g0, g1, sums, counts, buf);
}
#undef ED_COS_ARGS

}  // namespace
}  // namespace cpu

void cosine_cpu(uintptr_t x, uintptr_t other, uintptr_t mask, int dtype, const Dims& shape,
                const Dims& xstride, const Dims& ostride, const Dims& mstride, bool fused, uintptr_t out_sum,
                uintptr_t out_count, int nthreads) {
  using namespace cpu;
  check_common(x, dtype, shape, xstride, other, ostride, mask, mstride);
  ED_CHECK_PTR(other);
  ED_CHECK_PTR(out_sum);
  ED_CHECK_PTR(out_count);
  const int64_t B = shape[0], T = shape[1], D = shape[2];
  double* osum = reinterpret_cast<double*>(out_sum);
  double* ocnt = reinterpret_cast<double*>(out_count);
  for (int64_t b = 0; b < B; ++b) osum[b] = ocnt[b] = 0.0;
  if (B == 0 || T == 0) return;
  const View xv = make_view(x, dtype, xstride);
  const View ov = make_view(other, dtype, ostride);
  const Mask mv = make_mask(mask, mstride);
  const int64_t G = B * T;
  const int64_t per = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, D));  // tokens per item
  const int64_t items = (G + per - 1) / per;
  const int nt = clamp_threads(nthreads, items, G * D, 1 << 15);
  std::vector<double> part(size_t(nt * 2 * B), 0.0);
  std::vector<std::vector<float>> bufs(static_cast<size_t>(nt));
  const auto run = by_dtype(dtype, run_f32, run_f16, run_bf16);
  parallel_for(items, nt, [&](int64_t it, int tid) {
    const int64_t g0 = it * per, g1 = std::min(G, g0 + per);
    double* s = part.data() + int64_t(tid) * 2 * B;
    double* c = s + B;
    run(xv, ov, mv, fused, T, D, g0, g1, s, c, bufs[size_t(tid)]);
  });
  for (int tid = 0; tid < nt; ++tid)
    for (int64_t b = 0; b < B; ++b) {
      osum[b] += part[size_t(tid * 2 * B + b)];
      ocnt[b] += part[size_t(tid * 2 * B + B + b)];
    }
}

}  // namespace entrodrop

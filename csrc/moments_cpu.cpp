// Per-channel moments (count, mean, M2, min, max) of y = x (+ f) over the valid tokens of
// each sample, in one read of memory.
//
// Work items are (sample, token range); tokens are taken in chunks of TC valid rows and
// channels in blocks of MW lanes held in registers. Per chunk and block, a two-pass
// (mean, then squared deviations) fp32 computation runs on data already in L1, so there is
// no cancellation however far a channel sits from zero (LLM activations have channels 1e4x
// larger than the rest). Chunk results fold into fp64 sums relative to a per-channel shift
// (the first chunk's mean); token ranges of one sample merge by Chan's formula in fp64.
#include <cmath>
#include <limits>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

constexpr int MW = 32;   // channels per register block
constexpr int TC = 32;   // valid tokens per chunk

template <int DT>
ED_INLINE float ld(const uint8_t* row, int64_t j) {
  if constexpr (DT == DT_F32) return reinterpret_cast<const float*>(row)[j];
  else if constexpr (DT == DT_F16) return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
  else return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
}

// Running fp64 state of one work item, per channel.
struct ItemState {
  double n = 0;
  double* c;   // shift (first chunk mean)
  double* S;   // sum (y - c)
  double* Q;   // sum (y - c)^2
  float* lo;
  float* hi;
};

// One chunk (nc rows) x one block of W channels starting at d0. Rows are byte pointers to
// element d0 = 0 of each row; channel stride 1. FUSED: y = x + f.
template <int DT, bool FUSED, int W>
ED_INLINE void block_stats(const uint8_t* const* xr, const uint8_t* const* fr, int nc, int64_t d0,
                           int w, bool first, ItemState& st) {
  constexpr int L = W ? W : MW;  // W == 0: runtime width w < MW (the tail block)
  float s[L], lo[L], hi[L], mu[L], ds[L], qs[L];
  auto y = [&](int r, int j) -> float {
    float v = ld<DT>(xr[r], d0 + j);
    if constexpr (FUSED) v += ld<DT>(fr[r], d0 + j);
    return v;
  };
#define ED_FOR_J for (int j = 0; j < (W ? W : w); ++j)
  ED_FOR_J {
    float v = y(0, j);
    s[j] = v;
    lo[j] = v;
    hi[j] = v;
  }
  for (int r = 1; r < nc; ++r) {
    ED_FOR_J {
      float v = y(r, j);
      s[j] += v;
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
    }
  }
  const float inv = 1.0f / float(nc);
  ED_FOR_J {
    mu[j] = s[j] * inv;
    ds[j] = 0.f;
    qs[j] = 0.f;
  }
  for (int r = 0; r < nc; ++r) {
    ED_FOR_J {
      float dv = y(r, j) - mu[j];
      ds[j] += dv;
      qs[j] += dv * dv;
    }
  }
  const double n = nc;
  ED_FOR_J {
    const int64_t d = d0 + j;
    const double mc = double(mu[j]) + double(ds[j]) / n;
    const double m2c = std::max(0.0, double(qs[j]) - double(ds[j]) * double(ds[j]) / n);
    if (first) {
      st.c[d] = mc;
      st.S[d] = 0.0;
      st.Q[d] = m2c;
      st.lo[d] = lo[j];
      st.hi[d] = hi[j];
    } else {
      const double dl = mc - st.c[d];
      st.S[d] += n * dl;
      st.Q[d] += m2c + n * dl * dl;
      st.lo[d] = lo[j] < st.lo[d] ? lo[j] : st.lo[d];
      st.hi[d] = hi[j] > st.hi[d] ? hi[j] : st.hi[d];
    }
  }
#undef ED_FOR_J
}

template <int DT, bool FUSED>
ED_INLINE void chunk_stats(const uint8_t* const* xr, const uint8_t* const* fr, int nc, int64_t D,
                           bool first, ItemState& st) {
  int64_t d0 = 0;
  for (; d0 + MW <= D; d0 += MW) {
    for (int r = 0; r < nc; ++r) {  // the next block of every row is on its way
      __builtin_prefetch(xr[r] + (d0 + 4 * MW) * (DT == DT_F32 ? 4 : 2));
      if constexpr (FUSED) __builtin_prefetch(fr[r] + (d0 + 4 * MW) * (DT == DT_F32 ? 4 : 2));
    }
    block_stats<DT, FUSED, MW>(xr, fr, nc, d0, MW, first, st);
  }
  if (d0 < D) block_stats<DT, FUSED, 0>(xr, fr, nc, d0, int(D - d0), first, st);
}

// One work item: sample b, tokens [t0, t1). Fast path: channel stride 1 (any dtype, fused
// or not) reads the tensor in place; otherwise rows are gathered into an fp32 buffer.
template <int DT>
ED_INLINE void item_impl(const View& x, const View* f, const Mask& m, int64_t b, int64_t t0,
                         int64_t t1, int64_t D, ItemState& st, std::vector<float>& buf) {
  const bool direct = x.sd == 1 && (!f || f->sd == 1);
  const uint8_t* xr[TC];
  const uint8_t* fr[TC];
  bool first = true;
  int64_t t = t0;
  while (t < t1) {
    int nc = 0;
    for (; nc < TC && t < t1; ++t) {
      if (!m(b, t)) continue;
      if (direct) {
        xr[nc] = x.row(b, t);
        fr[nc] = f ? f->row(b, t) : nullptr;
      } else {
        if (buf.size() < size_t(TC * D)) buf.resize(size_t(TC * D));
        float* y = buf.data() + int64_t(nc) * D;
        load_y<DT>(x, f, b, t, 0, D, y);
        xr[nc] = reinterpret_cast<const uint8_t*>(y);
      }
      ++nc;
    }
    if (nc == 0) continue;
    if (!direct) chunk_stats<DT_F32, false>(xr, fr, nc, D, first, st);
    else if (f) chunk_stats<DT, true>(xr, fr, nc, D, first, st);
    else chunk_stats<DT, false>(xr, fr, nc, D, first, st);
    st.n += nc;
    first = false;
  }
}

// Non-template entry points so target_clones applies (one clone per ISA).
ED_CLONES void item_f32(const View& x, const View* f, const Mask& m, int64_t b, int64_t t0,
                        int64_t t1, int64_t D, ItemState& st, std::vector<float>& buf) {
  item_impl<DT_F32>(x, f, m, b, t0, t1, D, st, buf);
}
ED_CLONES void item_f16(const View& x, const View* f, const Mask& m, int64_t b, int64_t t0,
                        int64_t t1, int64_t D, ItemState& st, std::vector<float>& buf) {
  item_impl<DT_F16>(x, f, m, b, t0, t1, D, st, buf);
}
ED_CLONES void item_bf16(const View& x, const View* f, const Mask& m, int64_t b, int64_t t0,
                         int64_t t1, int64_t D, ItemState& st, std::vector<float>& buf) {
  item_impl<DT_BF16>(x, f, m, b, t0, t1, D, st, buf);
}

}  // namespace
}  // namespace cpu

void moments_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                 const Dims& xstride, const Dims& fstride, const Dims& mstride, uintptr_t count,
                 uintptr_t mean, uintptr_t m2, uintptr_t mn, uintptr_t mx, int nthreads) {
  using namespace cpu;
  check_common(x, dtype, shape, xstride, f, fstride, mask, mstride);
  ED_CHECK_PTR(count);
  ED_CHECK_PTR(mean);
  ED_CHECK_PTR(m2);
  ED_CHECK_PTR(mn);
  ED_CHECK_PTR(mx);
  const int64_t B = shape[0], T = shape[1], D = shape[2];
  double* o_count = reinterpret_cast<double*>(count);
  double* o_mean = reinterpret_cast<double*>(mean);
  double* o_m2 = reinterpret_cast<double*>(m2);
  float* o_mn = reinterpret_cast<float*>(mn);
  float* o_mx = reinterpret_cast<float*>(mx);
  if (B == 0) return;
  const View xv = make_view(x, dtype, xstride);
  View fv;
  if (f) fv = make_view(f, dtype, fstride);
  const View* fp = f ? &fv : nullptr;
  const Mask mv = make_mask(mask, mstride);

  // Split each sample's tokens into P parts when there are fewer samples than threads.
  const int nt = clamp_threads(nthreads, B * std::max<int64_t>(1, T / TC), B * T * D);
  int64_t P = B >= nt ? 1 : std::min<int64_t>((nt + B - 1) / B, std::max<int64_t>(1, T / (4 * TC)));
  P = std::max<int64_t>(1, P);
  const int64_t span = (T + P - 1) / P;
  const int64_t items = B * P;
  // Per-item fp64 state: c, S, Q (3 * D doubles) and lo/hi (2 * D floats).
  std::vector<double> dstate(size_t(items * 3 * D));
  std::vector<float> fstate(size_t(items * 2 * D));
  std::vector<double> nstate(size_t(items), 0.0);
  std::vector<std::vector<float>> bufs(static_cast<size_t>(nt));

  parallel_for(items, nt, [&](int64_t it, int tid) {
    const int64_t b = it / P, p = it % P;
    const int64_t t0 = p * span, t1 = std::min(T, t0 + span);
    ItemState st;
    st.c = dstate.data() + it * 3 * D;
    st.S = st.c + D;
    st.Q = st.S + D;
    st.lo = fstate.data() + it * 2 * D;
    st.hi = st.lo + D;
    if (t0 < t1) {
      if (dtype == DT_F16) item_f16(xv, fp, mv, b, t0, t1, D, st, bufs[tid]);
      else if (dtype == DT_BF16) item_bf16(xv, fp, mv, b, t0, t1, D, st, bufs[tid]);
      else item_f32(xv, fp, mv, b, t0, t1, D, st, bufs[tid]);
    }
    nstate[it] = st.n;
  });

  // Merge the parts of each sample (Chan, fp64) and write the outputs.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  parallel_for(B, clamp_threads(nthreads, B, B * D * P, 1 << 14), [&](int64_t b, int) {
    double n = 0;
    for (int64_t p = 0; p < P; ++p) n += nstate[b * P + p];
    o_count[b] = n;
    for (int64_t d = 0; d < D; ++d) {
      double na = 0, ma = 0, qa = 0;
      float lo = inf, hi = -inf;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t it = b * P + p;
        const double nb = nstate[it];
        if (nb == 0) continue;
        const double* c = dstate.data() + it * 3 * D;
        const double S = c[D + d], Q = c[2 * D + d];
        const double mb = c[d] + S / nb;
        const double qb = std::max(0.0, Q - S * S / nb);
        const float* l = fstate.data() + it * 2 * D;
        lo = std::min(lo, l[d]);
        hi = std::max(hi, l[D + d]);
        if (na == 0) {
          na = nb;
          ma = mb;
          qa = qb;
        } else {
          const double nn = na + nb, dl = mb - ma;
          ma += dl * (nb / nn);
          qa += qb + dl * dl * (na * nb / nn);
          na = nn;
        }
      }
      o_mean[b * D + d] = na > 0 ? ma : nan;
      o_m2[b * D + d] = na > 0 ? qa : nan;
      o_mn[b * D + d] = lo;
      o_mx[b * D + d] = hi;
    }
  });
}

}  // namespace entrodrop

// Per-channel moments (count, mean, M2, min, max) of y = x (+ f) over the valid tokens of
// each sample, in one read of memory.
//
// Work items are (sample, token range); tokens are taken in chunks of TC valid rows and
// channels in blocks of MW lanes held in registers. Per chunk and block, a two-pass
// (mean, then squared deviations) fp32 computation runs on data already in L1, so there is
// no cancellation however far a channel sits from zero (LLM activations have channels 1e4x
// larger than the rest). Chunk results merge, still in registers, into a segment's fp32 mean
// and M2 by Chan's formula (every term of M2 is non-negative there: no cancellation); every
// SEG rows the segment folds into fp64 sums relative to a per-channel shift (the item's
// first chunk mean), and token ranges of one sample merge by Chan's formula in fp64. (Folding
// every chunk straight into fp64 took half the time on an AVX2 machine: 36 bytes of fp64
// state per channel, read and written every 8 rows, against 32 bytes of input.)
//
// moments_pair_cpu: the moments of Y = x + f and of x itself from one read of x and f (x's
// blocks are computed right after y's, from L1), for delta_entropy.
//
// Non-finite values (docs/CONTRACT.md): a channel whose y holds NaN/Inf among the valid
// tokens (x + f overflowing fp32 included) gets mean = m2 = min = max = NaN. In the hot loop
// this costs one subtraction per chunk and lane: a chunk's fp32 sum s is finite unless a y
// is non-finite or the sum overflows (|y| past ~4e37), so s - s (0 or NaN) accumulates a
// per-channel "suspect" flag; the suspect channels (none, normally) are then rescanned
// exactly, so finite values however large never count as non-finite.
#include <cmath>
#include <limits>
#include <memory>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

constexpr int MW = 32;  // channels per register block
#ifndef ED_MOMENTS_TC
#define ED_MOMENTS_TC 8
#endif
#ifndef ED_MOMENTS_PF
#define ED_MOMENTS_PF 0  // measured: hardware prefetch does better with 8-row chunks
#endif
constexpr int TC = ED_MOMENTS_TC;  // valid tokens per chunk
#ifndef ED_MOMENTS_SEG
#define ED_MOMENTS_SEG 128
#endif
constexpr double SEG = ED_MOMENTS_SEG;  // rows per fp32 segment (then folded into fp64)

// Running state of one work item, per channel. Two levels, both relative to a per-channel
// shift cs (fp32: the item's first chunk mean), so that fp32 rounding scales with a
// channel's spread, not with its offset (a channel at 1e4 +- 1 keeps its M2 to 1e-8):
// chunks merge (Chan's formula, fp32, in the vector registers that computed them) into a
// segment's mean rm - cs and M2 rq; every SEG rows the segment folds into fp64 sums S and Q.
// lo/hi/nf are item-wide.
struct ItemState {
  double n = 0;   // rows folded into S/Q
  double rn = 0;  // rows merged into the open segment rm/rq
  double* S;      // sum over segments of n_seg (mean_seg - cs)
  double* Q;      // sum over segments of M2_seg + n_seg (mean_seg - cs)^2
  float* cs;      // the shift
  float* rm;      // the open segment's mean, minus cs
  float* rq;      // the open segment's M2
  float* lo;
  float* hi;
  float* nf;  // sum over chunks of (s - s): NaN where a chunk's fp32 sum was not finite
};

// How block_vec / block_tail merge one chunk of nc rows into the state: the segment's
// weights (Chan: mean += dl nc / (rn + nc), M2 += M2_chunk + dl^2 rn nc / (rn + nc)).
struct ChunkMerge {
  bool seg_first;   // the chunk opens a segment: rm/rq are written, not merged
  bool item_first;  // the item's first chunk: cs/lo/hi/nf are written
  float wb, wab, inv;
};

inline ChunkMerge chunk_merge(const ItemState& st, int nc, bool item_first) {
  ChunkMerge m;
  m.seg_first = st.rn == 0;
  m.item_first = item_first;
  const double nn = st.rn + nc;
  m.wb = float(nc / nn);
  m.wab = float(st.rn * nc / nn);
  m.inv = 1.0f / float(nc);
  return m;
}

// Fold the open segment (st.rn rows) into the fp64 sums of all D channels.
// (Written with explicit vectors of FL lanes, FL = 8 in the AVX-512 copy and 4 in the others,
// so that the fp64 vectors fit the target's registers: the auto-vectoriser leaves this mixed
// fp32/fp64 loop scalar; same arithmetic lane by lane.)
template <int L>
ED_INLINE void fold_segment(int64_t D, ItemState& st) {
  if (st.rn == 0) return;
  constexpr int FL = L == 16 ? 8 : 4;
  typedef Vec<FL> FV;
  typedef typename FV::f vf;
  typedef typename FV::d vd;
  auto ldf = [](const float* p)
                 __attribute__((always_inline)) { return *reinterpret_cast<const typename FV::fu*>(p); };
  auto ldd = [](const double* p)
                 __attribute__((always_inline)) { return *reinterpret_cast<const typename FV::du*>(p); };
  auto std_ = [](double* p, vd v)
                  __attribute__((always_inline)) { *reinterpret_cast<typename FV::du*>(p) = v; };
  auto cvt = [](vf v) __attribute__((always_inline)) { return __builtin_convertvector(v, vd); };
  const double n = st.rn;
  const bool first = st.n == 0;
  double* __restrict S = st.S;
  double* __restrict Q = st.Q;
  const float* __restrict rm = st.rm;
  const float* __restrict rq = st.rq;
  const vd vn = vd{} + n;
  int64_t j0 = 0;
  if (first) {
    for (; j0 + FL <= D; j0 += FL) {
      const vd dl = cvt(ldf(rm + j0));
      std_(S + j0, vn * dl);
      std_(Q + j0, cvt(ldf(rq + j0)) + vn * dl * dl);
    }
    for (int64_t j = j0; j < D; ++j) {
      const double dl = rm[j];
      S[j] = n * dl;
      Q[j] = double(rq[j]) + n * dl * dl;
    }
  } else {
    for (; j0 + FL <= D; j0 += FL) {
      const vd dl = cvt(ldf(rm + j0));
      std_(S + j0, ldd(S + j0) + vn * dl);
      std_(Q + j0, ldd(Q + j0) + (cvt(ldf(rq + j0)) + vn * dl * dl));
    }
    for (int64_t j = j0; j < D; ++j) {
      const double dl = rm[j];
      S[j] += n * dl;
      Q[j] += double(rq[j]) + n * dl * dl;
    }
  }
  st.n += n;
  st.rn = 0;
}

// Merge one chunk's statistics of channels [d, d + lanes) (mean mu + ds/nc, M2
// qs - ds^2/nc, lo, hi, sum s) into the state; V: a vector of fp32 lanes or a float (the
// same arithmetic). mu - cs is exact when mu and cs are within a factor of 2 (Sterbenz).
template <typename V>
ED_INLINE void merge_chunk(V mu, V ds, V qs, V lo, V hi, V s, const ChunkMerge& m, ItemState& st, int64_t d) {
  auto ld = [](const float* p) __attribute__((always_inline)) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  auto put = [](float* p, V v) __attribute__((always_inline)) { std::memcpy(p, &v, sizeof v); };
  const V inv = V{} + m.inv;
  const V nf = s - s;
  if (m.item_first) {
    put(st.cs + d, mu);
    put(st.lo + d, lo);
    put(st.hi + d, hi);
    put(st.nf + d, nf);
  } else {
    put(st.lo + d, vmin(lo, ld(st.lo + d)));
    put(st.hi + d, vmax(hi, ld(st.hi + d)));
    put(st.nf + d, ld(st.nf + d) + nf);
  }
  const V eb = (mu - ld(st.cs + d)) + ds * inv;
  const V qb = qs - ds * ds * inv;
  if (m.seg_first) {
    put(st.rm + d, eb);
    put(st.rq + d, qb);
  } else {
    const V ea = ld(st.rm + d), dl = eb - ea;
    put(st.rm + d, ea + dl * (V{} + m.wb));
    put(st.rq + d, ld(st.rq + d) + (qb + dl * dl * (V{} + m.wab)));
  }
}

template <int L, int DT, bool FUSED>
ED_INLINE typename Vec<L>::f yv(const uint8_t* xr, const uint8_t* fr, int64_t d) {
  constexpr int ES = DT == DT_F32 ? 4 : 2;
  typename Vec<L>::f v = loadv<DT, L>(xr + d * ES);
  if constexpr (FUSED) v += loadv<DT, L>(fr + d * ES);
  return v;
}

// One chunk (nc rows) x one block of MW channels starting at d0, in registers. Rows are
// byte pointers to channel 0 of each row (channel stride 1). FUSED: y = x + f.
template <int L, int DT, bool FUSED>
ED_INLINE void block_vec(const uint8_t* const* xr, const uint8_t* const* fr, int nc, int64_t d0,
                         const ChunkMerge& mg, ItemState& st) {
  constexpr int NV = MW / L;
  typedef typename Vec<L>::f vf;
  vf s[NV], lo[NV], hi[NV], mu[NV], ds[NV], qs[NV];
  if (nc == TC) {  // a full chunk: its TC x MW values stay in registers for both passes
    vf y[TC][NV];
#pragma GCC unroll 16
    for (int r = 0; r < TC; ++r)
#pragma GCC unroll 4
      for (int k = 0; k < NV; ++k) y[r][k] = yv<L, DT, FUSED>(xr[r], FUSED ? fr[r] : nullptr, d0 + L * k);
    for (int k = 0; k < NV; ++k) s[k] = lo[k] = hi[k] = y[0][k];
#pragma GCC unroll 16
    for (int r = 1; r < TC; ++r)
      for (int k = 0; k < NV; ++k) {
        s[k] += y[r][k];
        lo[k] = vmin(lo[k], y[r][k]);
        hi[k] = vmax(hi[k], y[r][k]);
      }
    const vf inv = vf{} + 1.0f / float(TC);
    for (int k = 0; k < NV; ++k) {
      mu[k] = s[k] * inv;
      ds[k] = qs[k] = vf{};
    }
#pragma GCC unroll 16
    for (int r = 0; r < TC; ++r)
      for (int k = 0; k < NV; ++k) {
        const vf dv = y[r][k] - mu[k];
        ds[k] += dv;
        qs[k] += dv * dv;
      }
  } else {
    for (int k = 0; k < NV; ++k) {
      const vf v = yv<L, DT, FUSED>(xr[0], FUSED ? fr[0] : nullptr, d0 + L * k);
      s[k] = v;
      lo[k] = v;
      hi[k] = v;
    }
    for (int r = 1; r < nc; ++r) {
      for (int k = 0; k < NV; ++k) {
        const vf v = yv<L, DT, FUSED>(xr[r], FUSED ? fr[r] : nullptr, d0 + L * k);
        s[k] += v;
        lo[k] = vmin(lo[k], v);
        hi[k] = vmax(hi[k], v);
      }
    }
    const vf inv = vf{} + 1.0f / float(nc);
    for (int k = 0; k < NV; ++k) {
      mu[k] = s[k] * inv;
      ds[k] = vf{};
      qs[k] = vf{};
    }
    for (int r = 0; r < nc; ++r) {  // second pass: the block is in L1
      for (int k = 0; k < NV; ++k) {
        const vf dv = yv<L, DT, FUSED>(xr[r], FUSED ? fr[r] : nullptr, d0 + L * k) - mu[k];
        ds[k] += dv;
        qs[k] += dv * dv;
      }
    }
  }
  for (int k = 0; k < NV; ++k) {
    const int64_t j = d0 + L * k;
    merge_chunk<vf>(mu[k], ds[k], qs[k], lo[k], hi[k], s[k], mg, st, j);
  }
}

// The same for a tail block of w < MW channels, scalar.
template <int L, int DT, bool FUSED>
ED_INLINE void block_tail(const uint8_t* const* xr, const uint8_t* const* fr, int nc, int64_t d0, int w,
                          const ChunkMerge& mg, ItemState& st) {
  float s[MW], lo[MW], hi[MW], mu[MW], ds[MW], qs[MW];
  auto y = [&](int r, int j) -> float {
    float v = load1<DT>(xr[r], d0 + j);
    if constexpr (FUSED) v += load1<DT>(fr[r], d0 + j);
    return v;
  };
  for (int j = 0; j < w; ++j) s[j] = lo[j] = hi[j] = y(0, j);
  for (int r = 1; r < nc; ++r)
    for (int j = 0; j < w; ++j) {
      const float v = y(r, j);
      s[j] += v;
      lo[j] = v < lo[j] ? v : lo[j];
      hi[j] = v > hi[j] ? v : hi[j];
    }
  const float inv = 1.0f / float(nc);
  for (int j = 0; j < w; ++j) {
    mu[j] = s[j] * inv;
    ds[j] = qs[j] = 0.f;
  }
  for (int r = 0; r < nc; ++r)
    for (int j = 0; j < w; ++j) {
      const float dv = y(r, j) - mu[j];
      ds[j] += dv;
      qs[j] += dv * dv;
    }
  for (int j = 0; j < w; ++j) {
    const int64_t d = d0 + j;
    merge_chunk<float>(mu[j], ds[j], qs[j], lo[j], hi[j], s[j], mg, st, d);
  }
}

// st: stats of y = x (+ f); st2 (the pair kernel, FUSED): of x as well, each block right
// after y's (x's block is then in L1).
template <int L, int DT, bool FUSED>
ED_INLINE void chunk_stats(const uint8_t* const* xr, const uint8_t* const* fr, int nc, int64_t D, bool first,
                           ItemState& st, ItemState* st2 = nullptr) {
  const ChunkMerge mg = chunk_merge(st, nc, first);  // (st2, when given, has taken the same rows)
  int64_t d0 = 0;
  for (; d0 + MW <= D; d0 += MW) {
    // Software prefetch of every cache line of the block PF blocks ahead in every row:
    // rows sit in different pages, where hardware stream prefetchers give up.
    constexpr int ES = DT == DT_F32 ? 4 : 2;
    const int64_t ahead = (d0 + ED_MOMENTS_PF * MW) * ES;
    for (int r = 0; ED_MOMENTS_PF > 0 && r < nc; ++r) {
      for (int l = 0; l < MW * ES; l += 64) {
        __builtin_prefetch(xr[r] + ahead + l);
        if constexpr (FUSED) __builtin_prefetch(fr[r] + ahead + l);
      }
    }
    block_vec<L, DT, FUSED>(xr, fr, nc, d0, mg, st);
    if (FUSED && st2) block_vec<L, DT, false>(xr, nullptr, nc, d0, mg, *st2);
  }
  if (d0 < D) {
    block_tail<L, DT, FUSED>(xr, fr, nc, d0, int(D - d0), mg, st);
    if (FUSED && st2) block_tail<L, DT, false>(xr, nullptr, nc, d0, int(D - d0), mg, *st2);
  }
  st.rn += nc;
  if (st.rn >= SEG) fold_segment<L>(D, st);
  if (st2) {
    st2->rn += nc;
    if (st2->rn >= SEG) fold_segment<L>(D, *st2);
  }
}

// One work item: sample b, tokens [t0, t1). Fast path: channel stride 1 (any dtype, fused
// or not) reads the tensor in place; otherwise rows are gathered into an fp32 buffer (x
// rows, and y = x + f rows, for the pair). st2: the pair kernel's stats of x.
template <int L, int DT>
ED_INLINE void item_impl(const View& x, const View* f, const Mask& m, int64_t b, int64_t t0, int64_t t1,
                         int64_t D, ItemState& st, ItemState* st2, std::vector<float>& buf) {
  const bool direct = x.sd == 1 && (!f || f->sd == 1);
  const uint8_t* xr[TC];
  const uint8_t* fr[TC];
  const uint8_t* gr[TC];  // gathered x rows of the pair
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
        if (buf.size() < size_t(2 * TC * D)) buf.resize(size_t(2 * TC * D));
        float* y = buf.data() + int64_t(nc) * D;
        if (st2) {
          float* xs = y + TC * D;
          load_seg<DT>(x.row(b, t), x.sd, D, xs);
          for (int64_t j = 0; j < D; ++j) y[j] = xs[j];
          add_seg<DT>(f->row(b, t), f->sd, D, y);
          gr[nc] = reinterpret_cast<const uint8_t*>(xs);
        } else {
          load_y<DT>(x, f, b, t, 0, D, y);
        }
        xr[nc] = reinterpret_cast<const uint8_t*>(y);
      }
      ++nc;
    }
    if (nc == 0) continue;
    if (!direct) {
      chunk_stats<L, DT_F32, false>(xr, fr, nc, D, first, st);
      if (st2) chunk_stats<L, DT_F32, false>(gr, fr, nc, D, first, *st2);
    } else if (f) {
      chunk_stats<L, DT, true>(xr, fr, nc, D, first, st, st2);
    } else {
      chunk_stats<L, DT, false>(xr, fr, nc, D, first, st);
    }
    first = false;
  }
  fold_segment<L>(D, st);
  if (st2) fold_segment<L>(D, *st2);
}

// Non-template entry points, one copy per ISA level (common_cpu.h), the one this CPU runs
// picked once (item_copies()).
#define ED_ITEM_ARGS                                                                                        \
  const View &x, const View *f, const Mask &m, int64_t b, int64_t t0, int64_t t1, int64_t D, ItemState &st, \
      ItemState *st2, std::vector<float>&buf
#define ED_ITEM_COPY(SUFFIX, TARGET, L)                         \
  TARGET void item_f32##SUFFIX(ED_ITEM_ARGS) {                  \
    item_impl<L, DT_F32>(x, f, m, b, t0, t1, D, st, st2, buf);  \
  }                                                             \
  TARGET void item_f16##SUFFIX(ED_ITEM_ARGS) {                  \
    item_impl<L, DT_F16>(x, f, m, b, t0, t1, D, st, st2, buf);  \
  }                                                             \
  TARGET void item_bf16##SUFFIX(ED_ITEM_ARGS) {                 \
    item_impl<L, DT_BF16>(x, f, m, b, t0, t1, D, st, st2, buf); \
  }
ED_ITEM_COPY(_v1, , 4)
#ifdef ED_HAVE_X86_LEVELS
ED_ITEM_COPY(_v3, ED_TARGET_V3, 8)
ED_ITEM_COPY(_v4, ED_TARGET_V4, 16)
#endif
#undef ED_ITEM_COPY
typedef void (*ItemFn3)(ED_ITEM_ARGS);
#undef ED_ITEM_ARGS
struct Items {
  ItemFn3 f32, f16, bf16;
};
const Items& item_copies() {
  static const Items it = [] {
#ifdef ED_HAVE_X86_LEVELS
    if (isa_level() >= 4) return Items{item_f32_v4, item_f16_v4, item_bf16_v4};
    if (isa_level() == 3) return Items{item_f32_v3, item_f16_v3, item_bf16_v3};
#endif
    return Items{item_f32_v1, item_f16_v1, item_bf16_v1};
  }();
  return it;
}

// y = x (+ f) at (b, t, d) in fp32, any dtype and strides (the rescan of suspect channels).
float y_at(const View& x, const View* f, int64_t b, int64_t t, int64_t d) {
  auto elem = [&](const View& v) -> float {
    return dispatch_dtype(v.dtype,
                          [&](auto dt) { return load1<decltype(dt)::value>(v.row(b, t), d * v.sd); });
  };
  float y = elem(x);
  if (f) y += elem(*f);
  return y;
}

struct MomentOut {
  double* mean;
  double* m2;
  float* mn;
  float* mx;
};

// The outputs of y = x (+ f) into o[0] and, for the pair (o[1].mean != null), of x into o[1].
void moments_run(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape, const Dims& xstride,
                 const Dims& fstride, const Dims& mstride, double* o_count, const MomentOut* o,
                 int nthreads) {
  check_common(x, dtype, shape, xstride, f, fstride, mask, mstride);
  const int NS = o[1].mean ? 2 : 1;
  const int64_t B = shape[0], T = shape[1], D = shape[2];
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
  // With one part per sample (B >= threads: the profiler's batches) each thread reuses one
  // slot of state and writes its sample's outputs itself; otherwise every item keeps its
  // state until the parts of a sample merge. (A slot per item cost 196 KiB per sample at
  // D = 4096, allocated and paged in on every call: 3x the kernel's time on 64-token samples.)
  const bool own_slot = P == 1;
  const int64_t slots = own_slot ? nt : items;
  // Per-slot and stream state: S, Q (2 * D doubles) and cs/rm/rq/lo/hi/nf (6 * D floats);
  // slot i, stream q at index (q * slots + i). Every field is written before it is read.
  std::unique_ptr<double[]> dstate(new double[size_t(NS * slots * 2 * D)]);
  std::unique_ptr<float[]> fstate(new float[size_t(NS * slots * 6 * D)]);
  std::vector<double> nstate(size_t(items), 0.0);
  std::vector<std::vector<float>> bufs(static_cast<size_t>(nt));
  auto state = [&](int q, int64_t slot) {
    ItemState st;
    st.S = dstate.get() + (q * slots + slot) * 2 * D;
    st.Q = st.S + D;
    st.cs = fstate.get() + (q * slots + slot) * 6 * D;
    st.rm = st.cs + D;
    st.rq = st.rm + D;
    st.lo = st.rq + D;
    st.hi = st.lo + D;
    st.nf = st.hi + D;
    return st;
  };

  // Merge the parts of sample b (Chan, fp64; part p's state in slot_of(p)) and write the
  // outputs.
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const float fnan = std::numeric_limits<float>::quiet_NaN();
  auto finish = [&](int64_t b, auto slot_of) {
    double n = 0;
    for (int64_t p = 0; p < P; ++p) n += nstate[b * P + p];
    o_count[b] = n;
    for (int q = 0; q < NS; ++q) {
      const MomentOut& out = o[q];
      const View* fq = q == 0 ? fp : nullptr;  // stream 1 of the pair: x alone
      // channels whose fp32 chunk sums were not finite (a non-finite y, or finite values
      // whose fp32 sums overflowed: |y| past ~1e18 can overflow a segment's M2), and
      // non-constant channels whose range is below 2^-60 (squared deviations under fp32's
      // normal range, ~1e-38, lose their precision): rescan their valid y exactly; NaN where
      // one is not finite, else mean and M2 in fp64
      std::vector<int64_t> suspect;
      for (int64_t p = 0; p < P; ++p) {
        if (nstate[b * P + p] == 0) continue;
        const ItemState st = state(q, slot_of(p));
        for (int64_t d = 0; d < D; ++d) {
          const float w = st.hi[d] - st.lo[d];
          if (st.nf[d] != 0.0f || !std::isfinite(st.S[d]) || !std::isfinite(st.Q[d]) ||
              (w > 0.0f && w < 0x1p-60f))
            suspect.push_back(d);
        }
      }
      if (P > 1) {
        std::sort(suspect.begin(), suspect.end());
        suspect.erase(std::unique(suspect.begin(), suspect.end()), suspect.end());
      }
      std::vector<uint8_t> bad;
      std::vector<double> exact_mean, exact_m2;  // per suspect channel (finite ones)
      if (!suspect.empty()) {
        bad.assign(size_t(D), 0);
        const size_t ns = suspect.size();
        exact_mean.assign(ns, 0.0);
        exact_m2.assign(ns, 0.0);
        for (int64_t t = 0; t < T; ++t) {
          if (!mv(b, t)) continue;
          for (size_t k = 0; k < ns; ++k) {
            const float y = y_at(xv, fq, b, t, suspect[k]);
            if (!std::isfinite(y)) bad[size_t(suspect[k])] = 1;
            exact_mean[k] += y;
          }
        }
        for (size_t k = 0; k < ns; ++k) exact_mean[k] /= n;
        for (int64_t t = 0; t < T; ++t) {
          if (!mv(b, t)) continue;
          for (size_t k = 0; k < ns; ++k) {
            const double e = double(y_at(xv, fq, b, t, suspect[k])) - exact_mean[k];
            exact_m2[k] += e * e;
          }
        }
      }
      if (P == 1 && suspect.empty() && nstate[b] > 0) {  // one part, all finite: a loop that vectorises
        const double inv = 1.0 / nstate[b];
        const ItemState st = state(q, slot_of(0));
        double* __restrict mean = out.mean + b * D;
        double* __restrict m2 = out.m2 + b * D;
        for (int64_t d = 0; d < D; ++d) {
          const double S = st.S[d];
          mean[d] = double(st.cs[d]) + S * inv;
          m2[d] = std::max(0.0, st.Q[d] - S * S * inv);
        }
        std::memcpy(out.mn + b * D, st.lo, size_t(D) * sizeof(float));
        std::memcpy(out.mx + b * D, st.hi, size_t(D) * sizeof(float));
        continue;
      }
      for (int64_t d = 0; d < D; ++d) {
        if (!bad.empty() && bad[size_t(d)]) {
          out.mean[b * D + d] = out.m2[b * D + d] = nan;
          out.mn[b * D + d] = out.mx[b * D + d] = fnan;
          continue;
        }
        double na = 0, ma = 0, qa = 0;
        float lo = inf, hi = -inf;
        for (int64_t p = 0; p < P; ++p) {
          const double nb = nstate[b * P + p];
          if (nb == 0) continue;
          const ItemState st = state(q, slot_of(p));
          const double S = st.S[d], Q = st.Q[d];
          const double mb = double(st.cs[d]) + S / nb;
          const double qb = std::max(0.0, Q - S * S / nb);
          lo = std::min(lo, st.lo[d]);
          hi = std::max(hi, st.hi[d]);
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
        out.mean[b * D + d] = na > 0 ? ma : nan;
        out.m2[b * D + d] = na > 0 ? qa : nan;
        out.mn[b * D + d] = lo;
        out.mx[b * D + d] = hi;
      }
      for (size_t k = 0; k < suspect.size(); ++k) {  // finite values past fp32's sums
        const int64_t d = suspect[k];
        if (bad[size_t(d)] || o_count[b] == 0) continue;
        out.mean[b * D + d] = exact_mean[k];
        out.m2[b * D + d] = exact_m2[k];
      }
    }
  };

  const Items& its = item_copies();
  const auto item = by_dtype(dtype, its.f32, its.f16, its.bf16);
  parallel_for(items, nt, [&](int64_t it, int tid) {
    const int64_t b = it / P, p = it % P;
    const int64_t t0 = p * span, t1 = std::min(T, t0 + span);
    const int64_t slot = own_slot ? tid : it;
    ItemState st = state(0, slot), st2 = state(NS - 1, slot);
    ItemState* s2 = NS == 2 ? &st2 : nullptr;
    if (t0 < t1) {
      item(xv, fp, mv, b, t0, t1, D, st, s2, bufs[tid]);
    }
    nstate[it] = st.n;
    if (own_slot) finish(b, [&](int64_t) { return slot; });
  });
  if (!own_slot) {
    parallel_for(B, clamp_threads(nthreads, B, NS * B * D * P, 1 << 14),
                 [&](int64_t b, int) { finish(b, [&](int64_t p) { return b * P + p; }); });
  }
}

}  // namespace
}  // namespace cpu

void moments_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape, const Dims& xstride,
                 const Dims& fstride, const Dims& mstride, uintptr_t count, uintptr_t mean, uintptr_t m2,
                 uintptr_t mn, uintptr_t mx, int nthreads) {
  ED_CHECK_PTR(count);
  ED_CHECK_PTR(mean);
  ED_CHECK_PTR(m2);
  ED_CHECK_PTR(mn);
  ED_CHECK_PTR(mx);
  const cpu::MomentOut o[2] = {{reinterpret_cast<double*>(mean), reinterpret_cast<double*>(m2),
                                reinterpret_cast<float*>(mn), reinterpret_cast<float*>(mx)},
                               {nullptr, nullptr, nullptr, nullptr}};
  cpu::moments_run(x, f, mask, dtype, shape, xstride, fstride, mstride, reinterpret_cast<double*>(count), o,
                   nthreads);
}

void moments_pair_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                      const Dims& xstride, const Dims& fstride, const Dims& mstride, uintptr_t count,
                      uintptr_t mean_y, uintptr_t m2_y, uintptr_t mn_y, uintptr_t mx_y, uintptr_t mean_x,
                      uintptr_t m2_x, uintptr_t mn_x, uintptr_t mx_x, int nthreads) {
  ED_CHECK_PTR(f);
  for (uintptr_t p : {count, mean_y, m2_y, mn_y, mx_y, mean_x, m2_x, mn_x, mx_x}) ED_CHECK_PTR(p);
  const cpu::MomentOut o[2] = {{reinterpret_cast<double*>(mean_y), reinterpret_cast<double*>(m2_y),
                                reinterpret_cast<float*>(mn_y), reinterpret_cast<float*>(mx_y)},
                               {reinterpret_cast<double*>(mean_x), reinterpret_cast<double*>(m2_x),
                                reinterpret_cast<float*>(mn_x), reinterpret_cast<float*>(mx_x)}};
  cpu::moments_run(x, f, mask, dtype, shape, xstride, fstride, mstride, reinterpret_cast<double*>(count), o,
                   nthreads);
}

}  // namespace entrodrop

// Bucket (histogram) entropy per sample and channel, exactly as docs/CONTRACT.md.
//
// A channel whose fp32 width max - min or scale bins / width is not finite (ranges past
// 3.4e38, or below bins * 2^-128: subnormal ranges) is binned with the same formula in
// fp64 ("wide" channels, as the reference): the vector loop leaves them in bin 0 and a
// scalar loop over the (usually empty) list of such channels overrides their indices.
//
// Work items are (sample, tile of W channels). A tile's valid tokens are gathered once
// from memory into a contiguous fp32 buffer (converting fp16/bf16 and adding f in
// registers) while min/max are tracked; binning then runs on the cached tile (samples
// longer than 2048 tokens read the tile twice instead, see bucket_cpu). Bin indices
// are computed vectorised across channels (fp32 sub, fp32 mul, truncation, clamp; no FMA:
// the build uses -ffp-contract=off); the counter increments are scalar but never collide
// back to back (consecutive elements belong to different channels). Entropy uses a table
// of -p ln p for every possible count, built once per distinct token count.
#include <cmath>
#include <limits>
#include <map>

#include "common_cpu.h"

namespace entrodrop {
namespace cpu {
namespace {

struct Scratch {
  std::vector<float> tile, lo, hi, sc, nf;  // nf: sum of (y - y), NaN iff a y is NaN/Inf
  std::vector<int32_t> flat, wide;  // wide: the tile's channels binned in fp64
  std::vector<double> wsc;          // their fp64 scales
  std::vector<uint32_t> counts;
};

// The contract's fp64 bin index, for a channel whose fp32 width or scale is not finite.
ED_INLINE int32_t wide_index(float y, float lo, double scale, int bins) {
  const double u = (double(y) - double(lo)) * scale;
  const int32_t last = bins - 1;
  const int32_t k = u >= 0.0 ? (u < double(bins) ? int32_t(u) : last) : 0;  // NaN -> 0
  return k < last ? k : last;
}

// STREAM = false: the N x w tile is gathered once and binned from cache. STREAM = true (a
// sample too long for that): min/max in a first sweep over the tile's rows, binning in a
// second that reads them again, one row segment of w channels at a time.
template <int DT, bool STREAM>
ED_INLINE void tile_impl(const View& x, const View* f, const Mask& m, int64_t b, int64_t T,
                         int64_t d0, int64_t w, int bins, const double* tbl, double* out,
                         Scratch& s, int64_t N) {
  const int64_t kept = STREAM ? 1 : N;
  if (s.tile.size() < size_t(kept * w)) s.tile.resize(size_t(kept * w));
  s.lo.resize(size_t(w));
  s.hi.resize(size_t(w));
  s.sc.resize(size_t(w));
  s.nf.resize(size_t(w));
  s.flat.resize(size_t(w));
  s.counts.assign(size_t(w * bins), 0u);
  float* __restrict lo = s.lo.data();
  float* __restrict hi = s.hi.data();
  float* __restrict sc = s.sc.data();
  float* __restrict nf = s.nf.data();
  int32_t* __restrict flat = s.flat.data();
  uint32_t* __restrict cnt = s.counts.data();
  float* __restrict tile = s.tile.data();

  // 1. gather the valid rows of the tile, with min / max (a copy even for dense fp32: rows
  //    of x are a power-of-two stride apart, which would thrash the caches' sets in step 3)
  //    and nf += y - y: 0 while every y is finite, NaN from the first NaN/Inf on (this is how
  //    the kernel reports non-finite Y, x + f overflow included: H_d = NaN, CONTRACT.md)
  int64_t r = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (t + kPrefetchRows < T) prefetch_y(x, f, b, t + kPrefetchRows, d0, w);
    if (!m(b, t)) continue;
    float* y = tile + (STREAM ? 0 : r * w);
    load_y<DT>(x, f, b, t, d0, w, y);
    if (r == 0) {
      for (int64_t j = 0; j < w; ++j) {
        lo[j] = y[j];
        hi[j] = y[j];
        nf[j] = y[j] - y[j];
      }
    } else {
      for (int64_t j = 0; j < w; ++j) {
        lo[j] = y[j] < lo[j] ? y[j] : lo[j];
        hi[j] = y[j] > hi[j] ? y[j] : hi[j];
        nf[j] += y[j] - y[j];
      }
    }
    ++r;
  }
  if (r == 0) {
    for (int64_t j = 0; j < w; ++j) out[j] = 0.0;
    return;
  }
  // 2. scale = bins / (max - min) in fp32; a constant channel puts everything in bin 0;
  //    a channel whose fp32 width or scale is not finite is binned in fp64; a channel
  //    holding NaN/Inf is binned (harmlessly) into bin 0 and reported as H_d = NaN
  const float fb = float(bins);
  s.wide.clear();
  s.wsc.clear();
  for (int64_t j = 0; j < w; ++j) {
    if (nf[j] != 0.0f) {
      lo[j] = 0.0f;
      sc[j] = 0.0f;
      continue;
    }
    const float width = hi[j] - lo[j];
    sc[j] = width == 0.0f ? 0.0f : fb / width;
    if (!std::isfinite(width) || !std::isfinite(sc[j])) {
      s.wide.push_back(int32_t(j));
      s.wsc.push_back(double(bins) / (double(hi[j]) - double(lo[j])));
      sc[j] = 0.0f;
    }
  }
  const int64_t nwide = int64_t(s.wide.size());
  // 3. bin and count
  const int32_t last = bins - 1;
  for (int64_t i = 0, t = 0; i < r; ++i, ++t) {
    const float* __restrict y = tile + (STREAM ? 0 : i * w);
    if (STREAM) {  // the i-th valid row, read again
      while (!m(b, t)) ++t;
      if (t + kPrefetchRows < T) prefetch_y(x, f, b, t + kPrefetchRows, d0, w);
      load_y<DT>(x, f, b, t, d0, w, tile);
    }
    for (int64_t j = 0; j < w; ++j) {
      const float u = (y[j] - lo[j]) * sc[j];
      // never out of bounds, whatever y: NaN -> bin 0, +Inf -> the last bin (only a channel
      // reported as non-finite can hold them: its u is 0 or NaN)
      int32_t k = u >= 0.0f ? (u < fb ? int32_t(u) : last) : 0;
      k = k < last ? k : last;
      flat[j] = int32_t(j) * bins + k;
    }
    for (int64_t e = 0; e < nwide; ++e) {
      const int32_t j = s.wide[size_t(e)];
      flat[j] = j * bins + wide_index(y[j], lo[j], s.wsc[size_t(e)], bins);
    }
    for (int64_t j = 0; j < w; ++j) ++cnt[flat[j]];
  }
  // 4. H_d = sum_j tbl[count_j], four partial sums (one chain of dependent adds would
  //    cost 4 cycles a bin)
  for (int64_t j = 0; j < w; ++j) {
    double h[4] = {};
    const uint32_t* c = cnt + j * bins;
    int k = 0;
    for (; k + 4 <= bins; k += 4)
      for (int q = 0; q < 4; ++q) h[q] += tbl[c[k + q]];
    for (; k < bins; ++k) h[0] += tbl[c[k]];
    out[j] = nf[j] == 0.0f ? (h[0] + h[1]) + (h[2] + h[3]) : std::numeric_limits<double>::quiet_NaN();
  }
}

#define ED_BUCKET_ARGS                                                                        \
  const View &x, const View *f, const Mask &m, int64_t b, int64_t T, int64_t d0, int64_t w, \
      int bins, const double *tbl, double *out, Scratch &s, int64_t N, bool stream
#define ED_BUCKET_CALL(DT)                                                             \
  stream ? tile_impl<DT, true>(x, f, m, b, T, d0, w, bins, tbl, out, s, N)             \
         : tile_impl<DT, false>(x, f, m, b, T, d0, w, bins, tbl, out, s, N)
ED_CLONES void tile_f32(ED_BUCKET_ARGS) { ED_BUCKET_CALL(DT_F32); }
ED_CLONES void tile_f16(ED_BUCKET_ARGS) { ED_BUCKET_CALL(DT_F16); }
ED_CLONES void tile_bf16(ED_BUCKET_ARGS) { ED_BUCKET_CALL(DT_BF16); }
#undef ED_BUCKET_CALL
#undef ED_BUCKET_ARGS

// tbl[c] = -p ln p with p = c / n, fp64, as the reference computes each bin's term.
std::vector<double> entropy_table(int64_t n, bool paper_exact) {
  std::vector<double> t(size_t(n + 1));
  const double dn = double(n);
  for (int64_t c = 0; c <= n; ++c) {
    double p = double(c) / dn;
    if (paper_exact) p = std::max(p, 1e-10);
    t[size_t(c)] = p > 0 ? -(p * std::log(p)) : 0.0;
  }
  return t;
}

}  // namespace
}  // namespace cpu

void bucket_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                const Dims& xstride, const Dims& fstride, const Dims& mstride, int bins,
                bool paper_exact, uintptr_t out, int nthreads) {
  using namespace cpu;
  check_common(x, dtype, shape, xstride, f, fstride, mask, mstride);
  ED_CHECK(bins >= 1 && bins <= (1 << 16), "bins must be in [1, 65536], got ", bins);
  ED_CHECK_PTR(out);
  const int64_t B = shape[0], T = shape[1], D = shape[2];
  double* o = reinterpret_cast<double*>(out);
  if (B == 0 || D == 0) return;
  const View xv = make_view(x, dtype, xstride);
  View fv;
  if (f) fv = make_view(f, dtype, fstride);
  const View* fp = f ? &fv : nullptr;
  const Mask mv = make_mask(mask, mstride);

  // valid tokens per sample, and one entropy table per distinct count
  std::vector<int64_t> nvalid(size_t(B), T);
  if (mask) {
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t t = 0; t < T; ++t) n += mv(b, t) ? 1 : 0;
      nvalid[size_t(b)] = n;
    }
  }
  std::map<int64_t, std::vector<double>> tables;
  for (int64_t n : nvalid)
    if (n > 0 && !tables.count(n)) tables.emplace(n, entropy_table(n, paper_exact));

  // channel tile: keep the gathered tile (N x W fp32) within 256 KiB, W a multiple of 16;
  // longer samples stream (two sweeps) over 256 channels: 1 KiB row segments, fetched ahead
  // (prefetch_y); the narrow tiles that a cached tile would need read one cache line per
  // row and page (at [32768, 4096] fp32: 327 ms with W = 16, 141 ms streaming)
  const int64_t Nmax = *std::max_element(nvalid.begin(), nvalid.end());
  const bool stream = Nmax > 2048;
  int64_t W = stream ? 256 : Nmax > 1024 ? 32 : 64;
  // many bins: fewer channels per tile, so that a thread's counters stay within 4 MiB
  W = std::min<int64_t>(W, std::max<int64_t>(16, ((int64_t(1) << 20) / bins) / 16 * 16));
  W = std::min<int64_t>(W, D);
  const int64_t ntiles = (D + W - 1) / W;
  const int64_t items = B * ntiles;
  const int nt = clamp_threads(nthreads, items, B * T * D, 1 << 15);

  parallel_for(items, nt, [&](int64_t it, int) {
    const int64_t b = it / ntiles, d0 = (it % ntiles) * W;
    const int64_t w = std::min(W, D - d0);
    const int64_t N = nvalid[size_t(b)];
    double* ob = o + b * D + d0;
    if (N == 0) {
      for (int64_t j = 0; j < w; ++j) ob[j] = 0.0;
      return;
    }
    const double* tbl = tables.at(N).data();
    // per-thread buffers that outlive the call: the OpenMP team's threads persist, and a
    // fresh allocation per call came back from the kernel as page faults each time
    static thread_local Scratch s;
    if (dtype == DT_F16) tile_f16(xv, fp, mv, b, T, d0, w, bins, tbl, ob, s, N, stream);
    else if (dtype == DT_BF16) tile_bf16(xv, fp, mv, b, T, d0, w, bins, tbl, ob, s, N, stream);
    else tile_f32(xv, fp, mv, b, T, d0, w, bins, tbl, ob, s, N, stream);
  });
}

}  // namespace entrodrop

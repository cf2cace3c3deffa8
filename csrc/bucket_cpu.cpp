// Bucket (histogram) entropy per sample and channel, exactly as docs/CONTRACT.md.
//
// A channel whose fp32 width max - min or scale bins / width is not finite (ranges past
// 3.4e38, or below bins * 2^-128: subnormal ranges) is binned with the same formula in
// fp64 ("wide" channels, as the reference): the vector loop leaves them in bin 0 and a
// scalar loop over the (usually empty) list of such channels overrides their indices.
//
// Work items are (sample, tile of W channels). A tile's valid tokens are gathered once
// from memory into a contiguous fp32 buffer (converting fp16/bf16 and adding f in
// registers) while min/max are tracked -- in registers, 64 channels at a time, where the
// channels are contiguous; binning then runs on the cached tile (samples longer than 2048
// tokens read the tile twice instead, see bucket_cpu). Bin indices are computed vectorised
// across channels (fp32 sub, fp32 mul, clamp, truncation; no FMA: the build uses
// -ffp-contract=off). Counting, up to 255 bins ("byte planes"): a row's indices of 64
// channels are 64 bytes v, and for each bin k, acc_k -= (v == k) counts 32 or 64 channels
// at once in byte lanes (blocks of at most 255 rows, so no lane wraps; then added to 32-bit
// counts). More bins: scalar increments (they never collide back to back: consecutive
// elements belong to different channels). Entropy uses a table of -p ln p for every
// possible count, built once per distinct token count. Up to 32 bins with AVX-512 the
// counting is bit-sliced instead (count_sliced): about 0.3 vector operations per element;
// and where no channel of the tile is binned in fp64, binning and counting are one sweep
// over the cached tile (bin_count_sliced: indices stay in 32-bit lanes, never stored as
// bytes; long samples re-read blocks of 240 rows into the tile for it). Measured on the
// 2-core EPYC (AVX-512) under load, one thread, min CPU time, 20 bins, byte planes with AVX2
// compares -> bit-sliced from bytes -> this sweep: [8, 256, 4096] fp32 5.71 -> 5.46 -> 5.37
// ms, bf16 7.49 -> 5.57 -> 5.53 ms; [1, 8192, 4096] fp32 39.7 -> 30.7 -> 30.4 ms, bf16 34.7
// -> 27.8 -> 27.8 ms (another run: [8, 256, 4096] fp32 5.45 -> 4.33 -> 3.93 ms, bf16 4.83
// -> 3.84 -> 3.39 ms). The gather from memory (one 64-channel strip of rows 8-16 KiB
// apart at a time) is now most of the time.
//
// Non-finite values (docs/CONTRACT.md): the gather accumulates y - y per channel (0 while
// every y is finite, NaN from the first NaN/Inf on, x + f overflowing fp32 included); such a
// channel is binned harmlessly into bin 0 and reported as H_d = NaN.
//
// bucket_pair_cpu: the entropies of Y = x + f and of x itself from one read of x and f
// (two "streams" through the same tile machinery), for delta_entropy.
#include <cmath>
#include <limits>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>

#include "common_cpu.h"
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace entrodrop {
namespace cpu {
namespace {

constexpr int kMaxPlaneBins = 255;   // bin indices in a byte
constexpr int kGroup = 64;           // channels per byte-plane row
constexpr int64_t kBlockRows = 255;  // rows per counting block: a byte lane counts at most 255
constexpr int64_t kAhead = 16;       // rows fetched ahead (into L2) while gathering
constexpr int kMaxSlicedBins = 32;   // bit-sliced counting: one-hot 32-bit lanes
constexpr int64_t kFusedRows = 240;  // bin_count_sliced's block: 15 x 16 rows, counts <= 255

// One histogram stream of a tile (Y, or x for the pair kernel).
struct Stream {
  std::vector<float> tile, lo, hi, sc, nf;  // nf: sum of (y - y), NaN iff a y is NaN/Inf
  std::vector<int32_t> flat, wide;          // wide: the tile's channels binned in fp64
  std::vector<double> wsc;                  // their fp64 scales
  std::vector<uint32_t> counts;
  std::vector<uint8_t> idx;  // byte planes: a block of rows of bin indices
};
struct Scratch {
  Stream s[2];
  std::vector<float> part;  // bucket_cosine: a row segment of the cosine partner
};

// bucket_cosine: the cosine partner of Y (COS = 1: x itself, Y = x + f; COS = 2: c, Y = x)
// and where the tile's per-token partial sums go: cp[t * 3 + {0, 1, 2}] = sum over the
// tile's channels of (partner * Y, partner^2, Y^2), fp32, for every token t of the sample
// (0 at masked tokens).
struct CosTile {
  const View* c = nullptr;
  float* cp = nullptr;
};

// Sums of 16 rows' 16-lane vectors at once: out lane j = the sum of v[j]'s lanes (four steps
// of shuffles and adds, each halving the lanes per row: about 3 operations per row instead of
// the 8 of a reduction per row).
ED_INLINE v16f fold_half(v16f a, v16f b) {  // [a 8 | b 8]
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
ED_INLINE v16f fold_quarter(v16f a, v16f b) {  // [a0 4 | a1 4 | b0 4 | b1 4]
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
ED_INLINE v16f fold_eighth(v16f a, v16f b) {  // 2 lanes per row
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
ED_INLINE v16f fold_last(v16f a, v16f b) {  // 1 lane per row
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
ED_INLINE v16f sum16(const v16f* v) {
  v16f h[8], q[4], e[2];
  for (int j = 0; j < 8; ++j) h[j] = fold_half(v[2 * j], v[2 * j + 1]);
  for (int j = 0; j < 4; ++j) q[j] = fold_quarter(h[2 * j], h[2 * j + 1]);
  for (int j = 0; j < 2; ++j) e[j] = fold_eighth(q[2 * j], q[2 * j + 1]);
  return fold_last(e[0], e[1]);
}

// The cosine's sums of up to 16 rows of a strip, folded together into ct.cp.
struct CosRows {
  v16f v[3][16];
  int64_t t[16];
  int n = 0;
  ED_INLINE void flush(float* cp) {
    for (int j = n; j < 16; ++j) v[0][j] = v[1][j] = v[2][j] = v16f{};
    float r[3][16];
    for (int q = 0; q < 3; ++q) {
      const v16f sq = sum16(v[q]);
      std::memcpy(r[q], &sq, sizeof r[q]);
    }
    for (int j = 0; j < n; ++j)
      for (int q = 0; q < 3; ++q) cp[3 * t[j] + q] += r[q][j];
    n = 0;
  }
};

// ----------------------------------------------------------------- byte-plane counting
typedef uint8_t v64b __attribute__((vector_size(64)));
typedef uint8_t v64b_u __attribute__((vector_size(64), aligned(1)));
typedef uint8_t v32b __attribute__((vector_size(32)));
typedef uint8_t v16b __attribute__((vector_size(16)));

// cnt[(k0 + q) * cld + l] += #{r < rows : idx[r * ld + l] == k0 + q} for q < KB, l < 64.
template <int KB>
ED_INLINE void count_planes(const uint8_t* idx, int64_t rows, int64_t ld, int k0, uint32_t* cnt,
                            int64_t cld) {
  v64b acc[KB];
  for (int q = 0; q < KB; ++q) acc[q] = v64b{};
  for (int64_t r = 0; r < rows; ++r) {
    const v64b v = *reinterpret_cast<const v64b_u*>(idx + r * ld);
    for (int q = 0; q < KB; ++q) acc[q] -= reinterpret_cast<v64b>(v == uint8_t(k0 + q));
  }
  for (int q = 0; q < KB; ++q) {
    uint32_t* __restrict c = cnt + int64_t(k0 + q) * cld;
    for (int l = 0; l < kGroup; ++l) c[l] += acc[q][l];
  }
}

#if defined(__x86_64__)
alignas(32) const uint8_t kBinConst[8][32] = {
#define ED_ROW(q) \
  {q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q, q}
    ED_ROW(0), ED_ROW(1), ED_ROW(2), ED_ROW(3), ED_ROW(4),
    ED_ROW(5), ED_ROW(6), ED_ROW(7)
#undef ED_ROW
};
// The same with AVX2 (VEX) compares, 32 channels at a time, 8 bins per sweep: their
// accumulators fit the 16 registers, and a compare yields a vector (AVX-512's compare into
// a mask register, then a masked add, measured 1.3x slower per element on Zen 4).
template <int KB>
__attribute__((target("avx2"))) void count_planes_avx2(const uint8_t* idx, int64_t rows, int64_t ld, int k0,
                                                       uint32_t* cnt, int64_t cld) {
  for (int h = 0; h < 2; ++h) {
    __m256i acc[KB];
    for (int q = 0; q < KB; ++q) acc[q] = _mm256_setzero_si256();
    const __m256i base = _mm256_set1_epi8(char(k0));
    for (int64_t r = 0; r < rows; ++r) {
      const __m256i v =
          _mm256_sub_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + r * ld + 32 * h)), base);
#pragma GCC unroll 8
      for (int q = 0; q < KB; ++q)
        acc[q] = _mm256_sub_epi8(
            acc[q], _mm256_cmpeq_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(kBinConst[q]))));
    }
    alignas(32) uint8_t tmp[32];
    for (int q = 0; q < KB; ++q) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[q]);
      uint32_t* __restrict c = cnt + int64_t(k0 + q) * cld + 32 * h;
      for (int l = 0; l < 32; ++l) c[l] += tmp[l];
    }
  }
}

// Up to 32 bins, with AVX-512: bit-sliced counting. A row's 16 indices of a column become
// one-hot 32-bit lanes (1 << k); Harley-Seal carry-save adders (two ternary-logic ops
// each) sum 16 rows into "planes" of bits 1, 2, 4, 8 per (channel, bin) and a carry of
// 16s rippled into planes 16 .. 128 (a block has at most 255 rows); the counts are read
// out of the planes at the end of the block. About 0.3 vector operations per element,
// against bins / 16 for the compares.
#define ED_AVX512 __attribute__((target("avx512f,avx512bw"), always_inline)) inline
// lanes 1 << idx[r * ld + c0 + l], l < 16
ED_AVX512 __m512i onehot16(const uint8_t* idx, int64_t r, int64_t ld, int c0) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + r * ld + c0));
  return _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_cvtepu8_epi32(b));
}
// carry-save adder: (high, low) = the two-bit sum of a, b, c, bit by bit
ED_AVX512 void csa(__m512i& high, __m512i& low, __m512i a, __m512i b, __m512i c) {
  high = _mm512_ternarylogic_epi32(a, b, c, 0xE8);  // majority
  low = _mm512_ternarylogic_epi32(a, b, c, 0x96);   // a ^ b ^ c
}
// add c (one bit per lane and bin) at weight 2^from into the planes
ED_AVX512 void ripple(__m512i* pl, __m512i c, int from) {
  for (int p = from; p < 8; ++p) {
    const __m512i t = _mm512_and_si512(pl[p], c);
    pl[p] = _mm512_xor_si512(pl[p], c);
    c = t;
  }
}
#undef ED_AVX512
__attribute__((target("avx512f,avx512bw"))) void count_sliced(const uint8_t* idx, int64_t rows, int64_t ld,
                                                              int bins, uint32_t* cnt, int64_t cld) {
  const __m512i one = _mm512_set1_epi32(1);
  for (int c0 = 0; c0 < kGroup; c0 += 16) {
    __m512i pl[8];  // weights 1, 2, 4, ..., 128
    for (int p = 0; p < 8; ++p) pl[p] = _mm512_setzero_si512();
    int64_t r = 0;
    for (; r + 16 <= rows; r += 16) {
      __m512i twosA, twosB, foursA, foursB, eightsA, eightsB, sixteens;
      csa(twosA, pl[0], pl[0], onehot16(idx, r, ld, c0), onehot16(idx, r + 1, ld, c0));
      csa(twosB, pl[0], pl[0], onehot16(idx, r + 2, ld, c0), onehot16(idx, r + 3, ld, c0));
      csa(foursA, pl[1], pl[1], twosA, twosB);
      csa(twosA, pl[0], pl[0], onehot16(idx, r + 4, ld, c0), onehot16(idx, r + 5, ld, c0));
      csa(twosB, pl[0], pl[0], onehot16(idx, r + 6, ld, c0), onehot16(idx, r + 7, ld, c0));
      csa(foursB, pl[1], pl[1], twosA, twosB);
      csa(eightsA, pl[2], pl[2], foursA, foursB);
      csa(twosA, pl[0], pl[0], onehot16(idx, r + 8, ld, c0), onehot16(idx, r + 9, ld, c0));
      csa(twosB, pl[0], pl[0], onehot16(idx, r + 10, ld, c0), onehot16(idx, r + 11, ld, c0));
      csa(foursA, pl[1], pl[1], twosA, twosB);
      csa(twosA, pl[0], pl[0], onehot16(idx, r + 12, ld, c0), onehot16(idx, r + 13, ld, c0));
      csa(twosB, pl[0], pl[0], onehot16(idx, r + 14, ld, c0), onehot16(idx, r + 15, ld, c0));
      csa(foursB, pl[1], pl[1], twosA, twosB);
      csa(eightsB, pl[2], pl[2], foursA, foursB);
      csa(sixteens, pl[3], pl[3], eightsA, eightsB);
      ripple(pl, sixteens, 4);
    }
    for (; r < rows; ++r) ripple(pl, onehot16(idx, r, ld, c0), 0);
    for (int k = 0; k < bins; ++k) {  // count of bin k = sum_p 2^p bit k of plane p
      const __m128i sk = _mm_cvtsi32_si128(k);
      __m512i v = _mm512_setzero_si512();
      for (int p = 0; p < 8; ++p)
        v = _mm512_add_epi32(v, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(pl[p], sk), one), p));
      uint32_t* c = cnt + int64_t(k) * cld + c0;
      _mm512_storeu_si512(c, _mm512_add_epi32(_mm512_loadu_si512(c), v));
    }
  }
}

// Binning and bit-sliced counting in one sweep over a cached fp32 tile (bins <= 32, AVX-512,
// no channel binned in fp64): the indices of 16 channels stay in 32-bit lanes, straight
// from the contract's fp32 formula to one-hot lanes, never narrowed to bytes, stored and
// read back. cnt[k * cld + l] += #{i < rows : bin of tile[i * ld + c0 + l] == k}, l < 16
// (lanes past w count in bin 0: y = lo = sc = 0 there; their counts are never read).
// max(u, 0) then min(., last) then truncation is row_bins' expression (maxps gives its
// second operand, 0, for NaN).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i onehot_bins(const float* y,
                                                                                      __mmask16 lanes,
                                                                                      __m512 lo, __m512 sc,
                                                                                      __m512 lastf) {
  const __m512 u = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, y), lo), sc);
  const __m512 c = _mm512_min_ps(_mm512_max_ps(u, _mm512_setzero_ps()), lastf);
  return _mm512_sllv_epi32(_mm512_set1_epi32(1), _mm512_cvttps_epi32(c));
}
__attribute__((target("avx512f,avx512bw"))) void bin_count_sliced(const float* tile, int64_t rows, int64_t ld,
                                                                  int64_t c0, int64_t w, const float* lo,
                                                                  const float* sc, int bins, uint32_t* cnt,
                                                                  int64_t cld) {
  const __mmask16 lanes = w - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (w - c0)) - 1u);
  const __m512 vlo = _mm512_maskz_loadu_ps(lanes, lo + c0);
  const __m512 vsc = _mm512_maskz_loadu_ps(lanes, sc + c0);
  const __m512 lastf = _mm512_set1_ps(float(bins - 1));
  const __m512i one = _mm512_set1_epi32(1);
#define onehot(i) onehot_bins(tile + (i) * ld + c0, lanes, vlo, vsc, lastf)
  for (int64_t i0 = 0; i0 < rows; i0 += kFusedRows) {
    const int64_t i1 = std::min(rows, i0 + kFusedRows);
    __m512i pl[8];  // weights 1, 2, 4, ..., 128
    for (int p = 0; p < 8; ++p) pl[p] = _mm512_setzero_si512();
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
      __m512i twosA, twosB, foursA, foursB, eightsA, eightsB, sixteens;
      csa(twosA, pl[0], pl[0], onehot(i), onehot(i + 1));
      csa(twosB, pl[0], pl[0], onehot(i + 2), onehot(i + 3));
      csa(foursA, pl[1], pl[1], twosA, twosB);
      csa(twosA, pl[0], pl[0], onehot(i + 4), onehot(i + 5));
      csa(twosB, pl[0], pl[0], onehot(i + 6), onehot(i + 7));
      csa(foursB, pl[1], pl[1], twosA, twosB);
      csa(eightsA, pl[2], pl[2], foursA, foursB);
      csa(twosA, pl[0], pl[0], onehot(i + 8), onehot(i + 9));
      csa(twosB, pl[0], pl[0], onehot(i + 10), onehot(i + 11));
      csa(foursA, pl[1], pl[1], twosA, twosB);
      csa(twosA, pl[0], pl[0], onehot(i + 12), onehot(i + 13));
      csa(twosB, pl[0], pl[0], onehot(i + 14), onehot(i + 15));
      csa(foursB, pl[1], pl[1], twosA, twosB);
      csa(eightsB, pl[2], pl[2], foursA, foursB);
      csa(sixteens, pl[3], pl[3], eightsA, eightsB);
      ripple(pl, sixteens, 4);
    }
    for (; i < i1; ++i) ripple(pl, onehot(i), 0);
    for (int k = 0; k < bins; ++k) {  // count of bin k = sum_p 2^p bit k of plane p
      const __m128i sk = _mm_cvtsi32_si128(k);
      __m512i v = _mm512_setzero_si512();
      for (int p = 0; p < 8; ++p)
        v = _mm512_add_epi32(v, _mm512_slli_epi32(_mm512_and_si512(_mm512_srl_epi32(pl[p], sk), one), p));
      uint32_t* c = cnt + int64_t(k) * cld + c0;
      _mm512_storeu_si512(c, _mm512_add_epi32(_mm512_loadu_si512(c), v));
    }
  }
#undef onehot
}
#endif

// The same sweep with AVX2 (the x86-64-v3 copy, L = 8 lanes), in vector extensions: the
// carry-save adders take 5 operations each (no ternary logic), so a 9th plane (weights up to
// 256, blocks of up to kSlicedRows2 rows) spares the profiler's 256-token samples a second
// block and its read-out. Read-out: bit k of plane p moved to bit p by one shift and one
// mask, or-ed together (the planes' bits never overlap). Lanes must all be valid (c0 + 8 <= w).
constexpr int64_t kSlicedRows2 = 496;  // 31 x 16 rows: counts <= 511
template <typename V>
ED_INLINE void csa_v(V& high, V& low, V a, V b, V c) {
  const V u = a ^ b;
  high = (a & b) | (u & c);
  low = u ^ c;
}
template <typename V>
ED_INLINE void ripple_v(V* pl, V c, int from) {
  for (int p = from; p < 9; ++p) {
    const V t = pl[p] & c;
    pl[p] ^= c;
    c = t;
  }
}
template <int L>
ED_INLINE void bin_count_sliced_v(const float* tile, int64_t rows, int64_t ld, int64_t c0, const float* lo,
                                  const float* sc, int bins, uint32_t* cnt, int64_t cld) {
  typedef typename Vec<L>::f vf;
  typedef typename Vec<L>::fu vfu;
  typedef typename Vec<L>::u vu;
  typedef typename Vec<L>::i vi;
  typedef uint32_t vuu __attribute__((vector_size(4 * L), aligned(4)));
  const vf vlo = *reinterpret_cast<const vfu*>(lo + c0), vsc = *reinterpret_cast<const vfu*>(sc + c0);
  const vf zero = vf{}, lastf = vf{} + float(bins - 1);
  const vu one = vu{} + 1u;
  auto onehot = [&](int64_t i) __attribute__((always_inline)) {
    const vf u = (*reinterpret_cast<const vfu*>(tile + i * ld + c0) - vlo) * vsc;
    vf c;  // max(u, 0) (NaN -> 0), then min(., last), as row_bins
#if defined(__x86_64__)
    if constexpr (L == 8) {  // (GCC compiles the selects below to a compare and a blend each)
      __asm__("vmaxps %2, %1, %0" : "=x"(c) : "x"(u), "x"(zero));
      __asm__("vminps %2, %1, %0" : "=x"(c) : "x"(c), "x"(lastf));
    } else
#endif
    {
      c = u > zero ? u : zero;
      c = c < lastf ? c : lastf;
    }
    return one << reinterpret_cast<vu>(__builtin_convertvector(c, vi));
  };
  for (int64_t i0 = 0; i0 < rows; i0 += kSlicedRows2) {
    const int64_t i1 = std::min(rows, i0 + kSlicedRows2);
    vu pl[9];  // weights 1, 2, 4, ..., 256
    for (int p = 0; p < 9; ++p) pl[p] = vu{};
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
      vu twosA, twosB, foursA, foursB, eightsA, eightsB, sixteens;
      csa_v(twosA, pl[0], pl[0], onehot(i), onehot(i + 1));
      csa_v(twosB, pl[0], pl[0], onehot(i + 2), onehot(i + 3));
      csa_v(foursA, pl[1], pl[1], twosA, twosB);
      csa_v(twosA, pl[0], pl[0], onehot(i + 4), onehot(i + 5));
      csa_v(twosB, pl[0], pl[0], onehot(i + 6), onehot(i + 7));
      csa_v(foursB, pl[1], pl[1], twosA, twosB);
      csa_v(eightsA, pl[2], pl[2], foursA, foursB);
      csa_v(twosA, pl[0], pl[0], onehot(i + 8), onehot(i + 9));
      csa_v(twosB, pl[0], pl[0], onehot(i + 10), onehot(i + 11));
      csa_v(foursA, pl[1], pl[1], twosA, twosB);
      csa_v(twosA, pl[0], pl[0], onehot(i + 12), onehot(i + 13));
      csa_v(twosB, pl[0], pl[0], onehot(i + 14), onehot(i + 15));
      csa_v(foursB, pl[1], pl[1], twosA, twosB);
      csa_v(eightsB, pl[2], pl[2], foursA, foursB);
      csa_v(sixteens, pl[3], pl[3], eightsA, eightsB);
      ripple_v(pl, sixteens, 4);
    }
    for (; i < i1; ++i) ripple_v(pl, onehot(i), 0);
    const int np = 64 - __builtin_clzll(uint64_t(i1 - i0));  // planes that can hold a bit
    for (int k = 0; k < bins; ++k) {                         // count of bin k = sum_p 2^p bit k of plane p
      vu v = vu{};
      for (int p = 0; p < np; ++p) {
        const vu bit = vu{} + (1u << p);
        v |= (k >= p ? pl[p] >> (k - p) : pl[p] << (p - k)) & bit;
      }
      uint32_t* c = cnt + int64_t(k) * cld + c0;
      *reinterpret_cast<vuu*>(c) += v;
    }
  }
}

// All bins of one 64-channel group, 8 at a time and the last 1-4 in a sweep of 4 (bins
// rounded up to 4: cnt has the rows, and bins >= `bins` count nothing, no index reaches
// them).
ED_INLINE void count_group(const uint8_t* idx, int64_t rows, int64_t ld, int bins, uint32_t* cnt, int64_t cld,
                           bool avx2, bool avx512) {
#if defined(__x86_64__)
  if (avx512 && bins >= 8 && bins <= kMaxSlicedBins) {  // (fewer bins: the compares cost less)
    count_sliced(idx, rows, ld, bins, cnt, cld);
    return;
  }
#endif
  (void)avx512;
  for (int k0 = 0; k0 < bins;) {
    const int kb = bins - k0 > 4 ? 8 : 4;
#if defined(__x86_64__)
    if (avx2) {
      if (kb == 8)
        count_planes_avx2<8>(idx, rows, ld, k0, cnt, cld);
      else
        count_planes_avx2<4>(idx, rows, ld, k0, cnt, cld);
      k0 += kb;
      continue;
    }
#endif
    (void)avx2;
    if (kb == 8)
      count_planes<8>(idx, rows, ld, k0, cnt, cld);
    else
      count_planes<4>(idx, rows, ld, k0, cnt, cld);
    k0 += kb;
  }
}

// The low bytes of L int32 lanes (values < 256) stored at out: narrowed in a register, then
// a plain store (the compiler would fuse a narrowing into a narrowing store, which Zen 4
// executes slowly: ~4x the whole row_bins loop). With 8 and 4 lanes the narrowing is a byte
// shuffle (a convertvector to 8 bytes is element by element on AVX2).
template <int L>
ED_INLINE void store_low_bytes(typename Vec<L>::i k, uint8_t* out) {
  if constexpr (L == 16) {
    v16b kb = __builtin_convertvector(k, v16b);
#if defined(__x86_64__)
    __asm__("" : "+x"(kb));
#endif
    std::memcpy(out, &kb, 16);
  } else if constexpr (L == 8) {
    const v32b by = reinterpret_cast<v32b>(k);
    typedef uint8_t v8b __attribute__((vector_size(8)));
    v8b kb = __builtin_shufflevector(by, by, 0, 4, 8, 12, 16, 20, 24, 28);
#if defined(__x86_64__)
    __asm__("" : "+x"(kb));
#endif
    std::memcpy(out, &kb, 8);
  } else {
    const v16b by = reinterpret_cast<v16b>(k);
    typedef uint8_t v4b __attribute__((vector_size(4)));
    const v4b kb = __builtin_shufflevector(by, by, 0, 4, 8, 12);
    std::memcpy(out, &kb, 4);
  }
}

// out[j] = bin index of y[j] (j < w) by the contract's fp32 formula, as bytes, L channels at
// a time: min(max(u, 0), last) then truncation equals the scalar expression of the tail
// (max(u, 0) is 0 for NaN; for u in [last, bins) int(u) = last anyway).
template <int L>
ED_INLINE void row_bins(const float* __restrict y, const float* __restrict lo, const float* __restrict sc,
                        int64_t w, int bins, uint8_t* __restrict out) {
  typedef typename Vec<L>::f vf;
  typedef typename Vec<L>::fu vfu;
  const float fb = float(bins);
  const int32_t last = bins - 1;
  const vf zero = vf{}, lastf = vf{} + float(last);
  int64_t j = 0;
  for (; j + L <= w; j += L) {
    const vf u = (*reinterpret_cast<const vfu*>(y + j) - *reinterpret_cast<const vfu*>(lo + j)) *
                 *reinterpret_cast<const vfu*>(sc + j);
    vf c = u > zero ? u : zero;
    c = c < lastf ? c : lastf;
    store_low_bytes<L>(__builtin_convertvector(c, typename Vec<L>::i), out + j);
  }
  for (; j < w; ++j) {
    const float u = (y[j] - lo[j]) * sc[j];
    const int32_t k = u >= 0.0f ? (u < fb ? int32_t(u) : last) : 0;
    out[j] = uint8_t(k < last ? k : last);
  }
}

// The contract's fp64 bin index, for a channel whose fp32 width or scale is not finite.
ED_INLINE int32_t wide_index(float y, float lo, double scale, int bins) {
  const double u = (double(y) - double(lo)) * scale;
  const int32_t last = bins - 1;
  const int32_t k = u >= 0.0 ? (u < double(bins) ? int32_t(u) : last) : 0;  // NaN -> 0
  return k < last ? k : last;
}

// Fetch row t's segment [d0, d0 + w) of x (and f) into L2 ahead of its use: rows of hidden
// states are 4-32 KiB apart, where the hardware prefetchers stop. (Into L2, not L1: with
// 16 rows in flight, L1's miss buffers would fill and stall the loads.)
ED_INLINE void fetch_ahead(const View& x, const View* f, int64_t b, int64_t t, int64_t d0, int64_t w) {
  if (x.sd == 1) {
    const uint8_t* p = x.row(b, t) + d0 * x.esize();
    for (int64_t o = 0; o < w * x.esize(); o += 64) __builtin_prefetch(p + o, 0, 1);
  }
  if (f && f->sd == 1) {
    const uint8_t* p = f->row(b, t) + d0 * f->esize();
    for (int64_t o = 0; o < w * f->esize(); o += 64) __builtin_prefetch(p + o, 0, 1);
  }
}

// Row t's segment of stream 0 (Y = x (+ f)) into y0 and, for the pair, of stream 1 (x)
// into y1, both fp32.
template <int DT, int NS>
ED_INLINE void load_rows(const View& x, const View* f, int64_t b, int64_t t, int64_t d0, int64_t w, float* y0,
                         float* y1) {
  if constexpr (NS == 2) {
    load_seg<DT>(x.row(b, t) + d0 * x.sd * x.esize(), x.sd, w, y1);
    for (int64_t j = 0; j < w; ++j) y0[j] = y1[j];
    add_seg<DT>(f->row(b, t) + d0 * f->sd * f->esize(), f->sd, w, y0);
  } else {
    (void)y1;
    load_y<DT>(x, f, b, t, d0, w, y0);
  }
}

// Steps 2-4 for one stream: scales, bin indices, counts, H_d (NaN for a channel holding
// NaN/Inf). STREAM: the rows are read again (both streams of the pair in one sweep: `other`
// is stream 1, binned along; its entropies go to out2).
template <int L, int DT, bool STREAM, bool PLANES, int NS>
ED_INLINE void bin_tile(const View& x, const View* f, const Mask& m, int64_t b, int64_t T, int64_t d0,
                        int64_t w, int bins, const double* tbl, double* const* outs, Scratch& s, int64_t r,
                        bool avx2, bool avx512) {
  const int64_t wp = (w + kGroup - 1) / kGroup * kGroup;  // planes: w rounded up to groups
  const float fb = float(bins);
  const int32_t last = bins - 1;
  // 2. scale = bins / (max - min) in fp32; a constant channel puts everything in bin 0; a
  //    channel whose fp32 width or scale is not finite is binned in fp64; a channel holding
  //    NaN/Inf is binned (harmlessly) into bin 0 and reported as H_d = NaN
  for (int q = 0; q < NS; ++q) {
    Stream& z = s.s[q];
    z.sc.resize(size_t(w));
    z.flat.resize(size_t(w));
    if (PLANES) {
      z.counts.assign(size_t((bins + 7) / 8 * 8 * wp),
                      0u);  // [bin][channel], bins rounded up (to 8: >= to 4)
      if (z.idx.size() < size_t(kBlockRows * wp)) z.idx.resize(size_t(kBlockRows * wp));
      for (int64_t i = 0; i < kBlockRows; ++i)  // the lanes past w count in bin 0, unread
        for (int64_t j = w; j < wp; ++j) z.idx[size_t(i * wp + j)] = 0;
    } else {
      z.counts.assign(size_t(w * bins), 0u);  // [channel][bin]
    }
    z.wide.clear();
    z.wsc.clear();
    for (int64_t j = 0; j < w; ++j) {
      if (z.nf[size_t(j)] != 0.0f) {
        z.lo[size_t(j)] = 0.0f;
        z.sc[size_t(j)] = 0.0f;
        continue;
      }
      const float width = z.hi[size_t(j)] - z.lo[size_t(j)];
      float sc = width == 0.0f ? 0.0f : fb / width;
      if (!std::isfinite(width) || !std::isfinite(sc)) {
        z.wide.push_back(int32_t(j));
        z.wsc.push_back(double(bins) / (double(z.hi[size_t(j)]) - double(z.lo[size_t(j)])));
        sc = 0.0f;
      }
      z.sc[size_t(j)] = sc;
    }
  }
  // 3. bin and count
  auto bin_row = [&](Stream& z, const float* __restrict y, uint8_t* __restrict row) {
    row_bins<L>(y, z.lo.data(), z.sc.data(), w, bins, row);
    for (size_t e = 0; e < z.wide.size(); ++e) {
      const int32_t j = z.wide[e];
      row[j] = uint8_t(wide_index(y[j], z.lo[size_t(j)], z.wsc[e], bins));
    }
  };
  auto count_row = [&](Stream& z, const float* __restrict y) {
    const float* __restrict lo = z.lo.data();
    const float* __restrict sc = z.sc.data();
    int32_t* __restrict flat = z.flat.data();
    for (int64_t j = 0; j < w; ++j) {
      const float u = (y[j] - lo[j]) * sc[j];
      // never out of bounds, whatever y: NaN -> bin 0, +Inf -> the last bin (only a channel
      // reported as non-finite can hold them: its u is 0 or NaN)
      int32_t k = u >= 0.0f ? (u < fb ? int32_t(u) : last) : 0;
      k = k < last ? k : last;
      flat[j] = int32_t(j) * bins + k;
    }
    for (size_t e = 0; e < z.wide.size(); ++e) {
      const int32_t j = z.wide[e];
      flat[j] = j * bins + wide_index(y[j], lo[j], z.wsc[e], bins);
    }
    uint32_t* __restrict cnt = z.counts.data();
    for (int64_t j = 0; j < w; ++j) ++cnt[flat[j]];
  };
  int64_t t = 0;
#if defined(__x86_64__)
  // (AVX2: the copy of 8 lanes, when the tile's width is whole vectors)
  constexpr bool kSliced2 = L == 8;
  if (PLANES && (avx512 || (kSliced2 && avx2 && w % 8 == 0)) && bins <= kMaxSlicedBins) {
    bool fused = true;
    for (int q = 0; q < NS; ++q) fused = fused && s.s[q].wide.empty();
    // bins and counts in one sweep over the cached tile (STREAM: over blocks of kFusedRows
    // rows read again into the tile)
    for (int64_t i0 = 0; fused && i0 < r; i0 += STREAM ? kFusedRows : r) {
      const int64_t rows = STREAM ? std::min(kFusedRows, r - i0) : r;
      if (STREAM)
        for (int64_t i = 0; i < rows; ++i, ++t) {
          while (!m(b, t)) ++t;
          if (t + kAhead < T) fetch_ahead(x, f, b, t + kAhead, d0, w);
          load_rows<DT, NS>(x, f, b, t, d0, w, s.s[0].tile.data() + i * w, s.s[NS - 1].tile.data() + i * w);
        }
      for (int q = 0; q < NS; ++q) {
        if (avx512) {
          for (int64_t c0 = 0; c0 < w; c0 += 16)
            bin_count_sliced(s.s[q].tile.data(), rows, w, c0, w, s.s[q].lo.data(), s.s[q].sc.data(), bins,
                             s.s[q].counts.data(), wp);
        } else if constexpr (kSliced2) {
          for (int64_t c0 = 0; c0 < w; c0 += 8)
            bin_count_sliced_v<8>(s.s[q].tile.data(), rows, w, c0, s.s[q].lo.data(), s.s[q].sc.data(), bins,
                                  s.s[q].counts.data(), wp);
        }
      }
    }
    if (fused) r = 0;  // nothing left to bin below
  }
#endif
  const int64_t block = PLANES ? kBlockRows : r;  // scalar counts: one block
  for (int64_t i0 = 0; i0 < r; i0 += block) {
    const int64_t rows = std::min(block, r - i0);
    for (int64_t i = 0; i < rows; ++i, ++t) {
      const float* y[2] = {s.s[0].tile.data() + (STREAM ? 0 : (i0 + i) * w),
                           s.s[NS - 1].tile.data() + (STREAM ? 0 : (i0 + i) * w)};
      if (STREAM) {  // the (i0 + i)-th valid row, read again
        while (!m(b, t)) ++t;
        if (t + kAhead < T) fetch_ahead(x, f, b, t + kAhead, d0, w);
        load_rows<DT, NS>(x, f, b, t, d0, w, s.s[0].tile.data(), s.s[NS - 1].tile.data());
      }
      for (int q = 0; q < NS; ++q) {
        if (PLANES)
          bin_row(s.s[q], y[q], s.s[q].idx.data() + i * wp);
        else
          count_row(s.s[q], y[q]);
      }
    }
    if (PLANES)
      for (int q = 0; q < NS; ++q)
        for (int64_t g = 0; g < wp; g += kGroup)
          count_group(s.s[q].idx.data() + g, rows, wp, bins, s.s[q].counts.data() + g, wp, avx2, avx512);
  }
  // 4. H_d = sum_j tbl[count_j], four partial sums (one chain of dependent adds would
  //    cost 4 cycles a bin)
  const int64_t cj = PLANES ? 1 : bins, ck = PLANES ? wp : 1;  // count (j, k): cnt[j cj + k ck]
  for (int q = 0; q < NS; ++q) {
    const Stream& z = s.s[q];
    for (int64_t j = 0; j < w; ++j) {
      double h[4] = {};
      const uint32_t* c = z.counts.data() + j * cj;
      int k = 0;
      for (; k + 4 <= bins; k += 4)
        for (int e = 0; e < 4; ++e) h[e] += tbl[c[(k + e) * ck]];
      for (; k < bins; ++k) h[0] += tbl[c[k * ck]];
      outs[q][j] =
          z.nf[size_t(j)] == 0.0f ? (h[0] + h[1]) + (h[2] + h[3]) : std::numeric_limits<double>::quiet_NaN();
    }
  }
}

// One tile. STREAM = false: the N x w tile is gathered once and binned from cache. STREAM =
// true (a sample too long for that): min/max in a first sweep over the tile's rows, binning
// in a second that reads them again, one row segment of w channels at a time. PLANES:
// counting by byte planes (bins <= 255), else by scalar increments. NS = 2: the pair kernel
// (stream 0: Y = x + f, stream 1: x).
template <int L, int DT, bool STREAM, bool PLANES, int NS, int COS = 0>
ED_INLINE void tile_impl(const View& x, const View* f, const Mask& m, int64_t b, int64_t T, int64_t d0,
                         int64_t w, int bins, const double* tbl, double* const* outs, Scratch& s, int64_t N,
                         bool avx2, bool avx512, const CosTile& ct = CosTile{}) {
  static_assert(COS == 0 || (NS == 1 && !STREAM), "cosine rides on the cached single-stream tile");
  if constexpr (COS != 0)
    for (int64_t t = 0; t < T; ++t) ct.cp[3 * t] = ct.cp[3 * t + 1] = ct.cp[3 * t + 2] = 0.f;
  // STREAM: one row, or a block of rows for the fused binning (bin_tile)
  const int64_t kept = STREAM ? (PLANES && bins <= kMaxSlicedBins ? kFusedRows : 1) : N;
  for (int q = 0; q < NS; ++q) {
    Stream& z = s.s[q];
    if (z.tile.size() < size_t(kept * w)) z.tile.resize(size_t(kept * w));
    z.lo.resize(size_t(w));
    z.hi.resize(size_t(w));
    z.nf.resize(size_t(w));
  }
  // 1. gather the valid rows of the tile, with min / max and nf (a copy even for dense
  //    fp32: rows of x are a power-of-two stride apart, which would thrash the caches' sets
  //    in step 3). Contiguous channels, cached: 64-channel strips, rows inner, min / max /
  //    nf in registers; otherwise (and for the channels left) row segments.
  int64_t r = 0;
  int64_t jv = 0;  // channels [0, jv) gathered by strips
  if (!STREAM && x.sd == 1 && (!f || f->sd == 1) && (COS != 2 || ct.c->sd == 1)) {
    constexpr int64_t ES = DT == DT_F32 ? 4 : 2;
    // a strip: SW channels, NV vectors of L lanes per stream and row; min / max / nf of each
    // in registers (AVX-512: 64 channels; AVX2's 16 registers: 32, 16 for the pair)
    constexpr int SW = L == 16 ? 64 : L * (NS == 1 ? 4 : 2);
    constexpr int NV = SW / L;
    typedef typename Vec<L>::f vf;
    for (; jv + SW <= w; jv += SW) {
      // min / max start at +-inf (a NaN would not replace them: nf reports it) and nf at 0
      vf vlo[NS][NV], vhi[NS][NV], vnf[NS][NV];
      for (int q = 0; q < NS; ++q)
        for (int k = 0; k < NV; ++k) {
          vlo[q][k] = vf{} + std::numeric_limits<float>::infinity();
          vhi[q][k] = vf{} - std::numeric_limits<float>::infinity();
          vnf[q][k] = vf{};
        }
      int64_t i = 0;
      [[maybe_unused]] CosRows cr16;
      for (int64_t t = 0; t < T; ++t) {
        if (t + kAhead < T) {
          fetch_ahead(x, f, b, t + kAhead, d0 + jv, SW);
          if constexpr (COS == 2) fetch_ahead(*ct.c, nullptr, b, t + kAhead, d0 + jv, SW);
        }
        if (!m(b, t)) continue;
        const uint8_t* xr = x.row(b, t) + (d0 + jv) * ES;
        const uint8_t* fr = f ? f->row(b, t) + (d0 + jv) * ES : nullptr;
        [[maybe_unused]] const uint8_t* cr = COS == 2 ? ct.c->row(b, t) + (d0 + jv) * ES : nullptr;
        [[maybe_unused]] vf cd{}, cx{}, cy{};  // the cosine's partial sums of this row
        for (int k = 0; k < NV; ++k) {
          vf v[NS];
          const vf xv = loadv<DT, L>(xr + L * k * ES);
          v[NS - 1] = xv;
          if (fr) v[0] = xv + loadv<DT, L>(fr + L * k * ES);
          if constexpr (COS != 0) {
            vf pv = xv;
            if constexpr (COS == 2) pv = loadv<DT, L>(cr + L * k * ES);
            cd += pv * v[0];
            cx += pv * pv;
            cy += v[0] * v[0];
          }
          for (int q = 0; q < NS; ++q) {
            std::memcpy(s.s[q].tile.data() + i * w + jv + L * k, &v[q], sizeof(vf));
            vlo[q][k] = vmin(vlo[q][k], v[q]);
            vhi[q][k] = vmax(vhi[q][k], v[q]);
            vnf[q][k] += v[q] - v[q];
          }
        }
        if constexpr (COS != 0) {
          if constexpr (L == 16) {
            cr16.v[0][cr16.n] = cd;
            cr16.v[1][cr16.n] = cx;
            cr16.v[2][cr16.n] = cy;
            cr16.t[cr16.n] = t;
            if (++cr16.n == 16) cr16.flush(ct.cp);
          } else {  // narrower vectors: each row's sums folded at once
            float r3[3] = {0.f, 0.f, 0.f};
            for (int e = 0; e < L; ++e) {
              r3[0] += cd[e];
              r3[1] += cx[e];
              r3[2] += cy[e];
            }
            for (int q = 0; q < 3; ++q) ct.cp[3 * t + q] += r3[q];
          }
        }
        ++i;
      }
      if constexpr (COS != 0 && L == 16)
        if (cr16.n > 0) cr16.flush(ct.cp);
      r = i;
      if (r > 0)
        for (int q = 0; q < NS; ++q)
          for (int k = 0; k < NV; ++k) {
            std::memcpy(s.s[q].lo.data() + jv + L * k, &vlo[q][k], sizeof(vf));
            std::memcpy(s.s[q].hi.data() + jv + L * k, &vhi[q][k], sizeof(vf));
            std::memcpy(s.s[q].nf.data() + jv + L * k, &vnf[q][k], sizeof(vf));
          }
    }
  }
  if (jv < w) {  // row segments [jv, w), min / max in memory
    const int64_t wr = w - jv;
    r = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (t + kAhead < T) fetch_ahead(x, f, b, t + kAhead, d0 + jv, wr);
      if (!m(b, t)) continue;
      const int64_t off = STREAM ? 0 : r * w + jv;
      load_rows<DT, NS>(x, f, b, t, d0 + jv, wr, s.s[0].tile.data() + off, s.s[NS - 1].tile.data() + off);
      if constexpr (COS != 0) {  // the partner's segment, then the row's partial sums
        const View& pv = COS == 1 ? x : *ct.c;
        if (s.part.size() < size_t(wr)) s.part.resize(size_t(wr));
        load_seg<DT>(pv.row(b, t) + (d0 + jv) * pv.sd * pv.esize(), pv.sd, wr, s.part.data());
        const float* y = s.s[0].tile.data() + off;
        // in fp64 (a sequential fp32 sum of up to 63 channels was ~10x less precise than
        // the strips: a fresh user's test saw it in 1 - cos near 0 at D = 63)
        double a = 0, px = 0, py = 0;
        for (int64_t j = 0; j < wr; ++j) {
          const double pj = s.part[size_t(j)], yj = y[j];
          a += pj * yj;
          px += pj * pj;
          py += yj * yj;
        }
        float* p = ct.cp + 3 * t;
        p[0] = float(double(p[0]) + a);
        p[1] = float(double(p[1]) + px);
        p[2] = float(double(p[2]) + py);
      }
      for (int q = 0; q < NS; ++q) {
        const float* __restrict y = s.s[q].tile.data() + off;
        float* __restrict lo = s.s[q].lo.data() + jv;
        float* __restrict hi = s.s[q].hi.data() + jv;
        float* __restrict nf = s.s[q].nf.data() + jv;
        if (r == 0) {
          for (int64_t j = 0; j < wr; ++j) {
            lo[j] = y[j];
            hi[j] = y[j];
            nf[j] = y[j] - y[j];
          }
        } else {
          for (int64_t j = 0; j < wr; ++j) {
            lo[j] = y[j] < lo[j] ? y[j] : lo[j];
            hi[j] = y[j] > hi[j] ? y[j] : hi[j];
            nf[j] += y[j] - y[j];
          }
        }
      }
      ++r;
    }
  }
  if (r == 0) {
    for (int q = 0; q < NS; ++q)
      for (int64_t j = 0; j < w; ++j) outs[q][j] = 0.0;
    return;
  }
  bin_tile<L, DT, STREAM, PLANES, NS>(x, f, m, b, T, d0, w, bins, tbl, outs, s, r, avx2, avx512);
}

// The cached single-stream tile with the cosine's partial sums (bucket_cosine).
#define ED_BUCKET_COS_ARGS                                                                            \
  const View &x, const View *f, const Mask &m, int64_t b, int64_t T, int64_t d0, int64_t w, int bins, \
      const double *tbl, double *const *outs, Scratch &s, int64_t N, bool avx2, bool avx512,          \
      const CosTile &ct
#define ED_BUCKET_COS_CALL(L, DT)                                                                          \
  if (bins <= kMaxPlaneBins) {                                                                             \
    if (f)                                                                                                 \
      tile_impl<L, DT, false, true, 1, 1>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512, ct);  \
    else                                                                                                   \
      tile_impl<L, DT, false, true, 1, 2>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512, ct);  \
  } else {                                                                                                 \
    if (f)                                                                                                 \
      tile_impl<L, DT, false, false, 1, 1>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512, ct); \
    else                                                                                                   \
      tile_impl<L, DT, false, false, 1, 2>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512, ct); \
  }
#define ED_BUCKET_ARGS                                                                                  \
  const View &x, const View *f, const Mask &m, int64_t b, int64_t T, int64_t d0, int64_t w, int bins,   \
      const double *tbl, double *const *outs, Scratch &s, int64_t N, bool stream, bool pair, bool avx2, \
      bool avx512
#define ED_BUCKET_NS(L, DT, NS)                                                                      \
  if (bins <= kMaxPlaneBins) {                                                                       \
    if (stream)                                                                                      \
      tile_impl<L, DT, true, true, NS>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512);   \
    else                                                                                             \
      tile_impl<L, DT, false, true, NS>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512);  \
  } else {                                                                                           \
    if (stream)                                                                                      \
      tile_impl<L, DT, true, false, NS>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512);  \
    else                                                                                             \
      tile_impl<L, DT, false, false, NS>(x, f, m, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512); \
  }
#define ED_BUCKET_CALL(L, DT) \
  if (pair) {                 \
    ED_BUCKET_NS(L, DT, 2)    \
  } else {                    \
    ED_BUCKET_NS(L, DT, 1)    \
  }
// One tile (tile_*) or one tile with the cosine's sums (tile_cos_*) per dtype, in the copy of
// each ISA level (TARGET, L lanes); Tiles holds the copies the CPU runs (tiles()).
// clang-format off
#define ED_BUCKET_COPY(SUFFIX, TARGET, L)                                                        \
  TARGET void tile_f32##SUFFIX(ED_BUCKET_ARGS) { ED_BUCKET_CALL(L, DT_F32) }                     \
  TARGET void tile_f16##SUFFIX(ED_BUCKET_ARGS) { ED_BUCKET_CALL(L, DT_F16) }                     \
  TARGET void tile_bf16##SUFFIX(ED_BUCKET_ARGS) { ED_BUCKET_CALL(L, DT_BF16) }                   \
  TARGET void tile_cos_f32##SUFFIX(ED_BUCKET_COS_ARGS) { ED_BUCKET_COS_CALL(L, DT_F32) }         \
  TARGET void tile_cos_f16##SUFFIX(ED_BUCKET_COS_ARGS) { ED_BUCKET_COS_CALL(L, DT_F16) }         \
  TARGET void tile_cos_bf16##SUFFIX(ED_BUCKET_COS_ARGS) { ED_BUCKET_COS_CALL(L, DT_BF16) }
// clang-format on
ED_BUCKET_COPY(_v1, , 4)
#ifdef ED_HAVE_X86_LEVELS
ED_BUCKET_COPY(_v3, ED_TARGET_V3, 8)
ED_BUCKET_COPY(_v4, ED_TARGET_V4, 16)
#endif
#undef ED_BUCKET_COPY
#undef ED_BUCKET_CALL
#undef ED_BUCKET_NS
#undef ED_BUCKET_COS_CALL

struct Tiles {
  void (*tile[3])(ED_BUCKET_ARGS);
  void (*cos[3])(ED_BUCKET_COS_ARGS);  // [DT_F32, DT_F16, DT_BF16]: by_dtype's order
};
#undef ED_BUCKET_ARGS
#undef ED_BUCKET_COS_ARGS
const Tiles& tiles() {
  static const Tiles t = [] {
#ifdef ED_HAVE_X86_LEVELS
    if (isa_level() >= 4)
      return Tiles{{tile_f32_v4, tile_f16_v4, tile_bf16_v4},
                   {tile_cos_f32_v4, tile_cos_f16_v4, tile_cos_bf16_v4}};
    if (isa_level() == 3)
      return Tiles{{tile_f32_v3, tile_f16_v3, tile_bf16_v3},
                   {tile_cos_f32_v3, tile_cos_f16_v3, tile_cos_bf16_v3}};
#endif
    return Tiles{{tile_f32_v1, tile_f16_v1, tile_bf16_v1},
                 {tile_cos_f32_v1, tile_cos_f16_v1, tile_cos_bf16_v1}};
  }();
  return t;
}

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

// out (and out2 for the pair) [B, D]: H_d of Y = x (+ f), and of x.
// cos (bucket_cosine, else null): also the cosine between the partner (cos->c, or x when
// f is given) and Y, summed over valid tokens per sample.
struct CosRequest {
  uintptr_t c = 0;  // partner tensor (0: x itself, with f)
  Dims cstride;
  double* sum = nullptr;    // [B]
  double* count = nullptr;  // [B]
};

void bucket_run(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape, const Dims& xstride,
                const Dims& fstride, const Dims& mstride, int bins, bool paper_exact, uintptr_t out,
                uintptr_t out2, int nthreads, const CosRequest* cos = nullptr) {
  check_common(x, dtype, shape, xstride, f, fstride, mask, mstride);
  ED_CHECK_BINS(bins);
  ED_CHECK_PTR(out);
  const bool pair = out2 != 0;
  const int64_t B = shape[0], T = shape[1], D = shape[2];
  double* o = reinterpret_cast<double*>(out);
  double* o2 = reinterpret_cast<double*>(out2);
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

  // channel tile: 64 channels (byte planes count 64 at once) while the gathered tile fits
  // 512 KiB (up to 2048 tokens; 32 channels for the scalar count beyond 1024 tokens); longer
  // samples stream (two sweeps) over 256 channels: 1 KiB row segments, fetched ahead; the
  // narrow tiles that a cached tile would need read one cache line per row and page (at
  // [32768, 4096] fp32: 327 ms with W = 16, 141 ms streaming)
  const int64_t Nmax = *std::max_element(nvalid.begin(), nvalid.end());
  const bool stream = Nmax > 2048;
  int64_t W = stream ? 256 : (Nmax > 1024 && bins > kMaxPlaneBins) ? 32 : 64;
  // many bins: fewer channels per tile, so that a thread's counters stay within 4 MiB
  W = std::min<int64_t>(W, std::max<int64_t>(16, ((int64_t(1) << 20) / bins) / 16 * 16));
  W = std::min<int64_t>(W, D);
  const int64_t ntiles = (D + W - 1) / W;
  const int64_t items = B * ntiles;
  const int nt = clamp_threads(nthreads, items, B * T * D * (pair ? 2 : 1), 1 << 15);
  // counting: bit-sliced with AVX-512, byte compares with AVX2, else portable byte compares
  // (ENTRODROP_COUNT_ISA=avx2 or =generic restricts the choice: for tests of those paths)
#if defined(__x86_64__)
  const char* isa = std::getenv("ENTRODROP_COUNT_ISA");
  const bool generic = isa && std::string(isa) == "generic";
  const bool avx2 = !generic && isa_level() >= 3 && __builtin_cpu_supports("avx2");
  const bool avx512 = avx2 && !(isa && std::string(isa) == "avx2") && isa_level() >= 4 &&
                      __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  const bool avx2 = false, avx512 = false;
#endif

  // the cosine rides on the cached tile; streamed samples take a pass of their own
  const bool with_cos = cos != nullptr && !stream;
  View cv;
  CosTile ct0;
  if (with_cos && cos->c) {
    cv = make_view(cos->c, dtype, cos->cstride);
    ct0.c = &cv;
  }
  // [B, ntiles, T, 3]; every tile zeroes its own rows first (no serial memset here)
  std::unique_ptr<float[]> cpart(with_cos ? new float[size_t(B * ntiles * T * 3)] : nullptr);
  const Tiles& tl = tiles();
  const auto tile = by_dtype(dtype, tl.tile[0], tl.tile[1], tl.tile[2]);
  const auto tile_cos = by_dtype(dtype, tl.cos[0], tl.cos[1], tl.cos[2]);
  parallel_for(items, nt, [&](int64_t it, int) {
    const int64_t b = it / ntiles, d0 = (it % ntiles) * W;
    const int64_t w = std::min(W, D - d0);
    const int64_t N = nvalid[size_t(b)];
    double* outs[2] = {o + b * D + d0, pair ? o2 + b * D + d0 : nullptr};
    if (N == 0) {
      for (int q = 0; q < (pair ? 2 : 1); ++q)
        for (int64_t j = 0; j < w; ++j) outs[q][j] = 0.0;
      return;  // no valid token: the cosine's finish reads nothing of this sample
    }
    const double* tbl = tables.at(N).data();
    // per-thread buffers that outlive the call: the OpenMP team's threads persist, and a
    // fresh allocation per call came back from the kernel as page faults each time
    static thread_local Scratch s;
    if (with_cos) {
      CosTile ct = ct0;
      ct.cp = cpart.get() + size_t(it * T * 3);
      tile_cos(xv, fp, mv, b, T, d0, w, bins, tbl, outs, s, N, avx2, avx512, ct);
    } else {
      tile(xv, fp, mv, b, T, d0, w, bins, tbl, outs, s, N, stream, pair, avx2, avx512);
    }
  });
  if (cos == nullptr) return;
  if (!with_cos) {  // samples longer than the cached tile: the cosine kernel's own pass
    cosine_cpu(cos->c ? cos->c : x, cos->c ? x : f, mask, dtype, shape, cos->c ? cos->cstride : xstride,
               cos->c ? xstride : fstride, mstride, cos->c == 0, reinterpret_cast<uintptr_t>(cos->sum),
               reinterpret_cast<uintptr_t>(cos->count), nthreads);
    return;
  }
  // per token: the tiles' partial sums in fp64, cos, summed per sample
  const View& pv = cos->c ? cv : xv;
  const int ns = clamp_threads(nthreads, B, B * T * ntiles * 3, 1 << 15);
  parallel_for(B, ns, [&](int64_t b, int) {
    double sum = 0, cnt = 0;
    for (int64_t t = 0; t < T; ++t) {
      if (!mv(b, t)) continue;
      double d = 0, px = 0, py = 0;
      for (int64_t k = 0; k < ntiles; ++k) {
        const float* p = cpart.get() + size_t(((b * ntiles + k) * T + t) * 3);
        d += p[0];
        px += p[1];
        py += p[2];
      }
      // (fp32 partial sums past ~1e19, or NaN/Inf: the row again in fp64)
      const uint8_t* fr = fp ? fp->row(b, t) : nullptr;
      const int64_t fs = fp ? fp->sd : 0;
      sum += dtype == DT_F32
                 ? cos_from_sums<DT_F32>(d, px, py, pv.row(b, t), pv.sd, xv.row(b, t), xv.sd, fr, fs, D)
             : dtype == DT_F16
                 ? cos_from_sums<DT_F16>(d, px, py, pv.row(b, t), pv.sd, xv.row(b, t), xv.sd, fr, fs, D)
                 : cos_from_sums<DT_BF16>(d, px, py, pv.row(b, t), pv.sd, xv.row(b, t), xv.sd, fr, fs, D);
      cnt += 1;
    }
    cos->sum[b] = sum;
    cos->count[b] = cnt;
  });
}

}  // namespace
}  // namespace cpu

void bucket_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape, const Dims& xstride,
                const Dims& fstride, const Dims& mstride, int bins, bool paper_exact, uintptr_t out,
                int nthreads) {
  cpu::bucket_run(x, f, mask, dtype, shape, xstride, fstride, mstride, bins, paper_exact, out, 0, nthreads);
}

void bucket_cosine_cpu(uintptr_t x, uintptr_t f, uintptr_t c, uintptr_t mask, int dtype, const Dims& shape,
                       const Dims& xstride, const Dims& fstride, const Dims& cstride, const Dims& mstride,
                       int bins, bool paper_exact, uintptr_t out, uintptr_t cos_sum, uintptr_t cos_count,
                       int nthreads) {
  ED_CHECK((f == 0) != (c == 0),
           "give exactly one of f (Y = x + f, cosine with x) and c (Y = x, cosine with c)");
  ED_CHECK_PTR(cos_sum);
  ED_CHECK_PTR(cos_count);
  if (c) cpu::check_common(c, dtype, shape, cstride, 0, cstride, mask, mstride);
  cpu::CosRequest req;
  req.c = c;
  req.cstride = c ? cstride : xstride;
  req.sum = reinterpret_cast<double*>(cos_sum);
  req.count = reinterpret_cast<double*>(cos_count);
  const int64_t B = shape[0];
  for (int64_t b = 0; b < B; ++b) req.sum[b] = req.count[b] = 0.0;
  cpu::bucket_run(x, f, mask, dtype, shape, xstride, fstride, mstride, bins, paper_exact, out, 0, nthreads,
                  &req);
}

void bucket_pair_cpu(uintptr_t x, uintptr_t f, uintptr_t mask, int dtype, const Dims& shape,
                     const Dims& xstride, const Dims& fstride, const Dims& mstride, int bins,
                     bool paper_exact, uintptr_t out_y, uintptr_t out_x, int nthreads) {
  ED_CHECK_PTR(f);
  ED_CHECK_PTR(out_x);
  cpu::bucket_run(x, f, mask, dtype, shape, xstride, fstride, mstride, bins, paper_exact, out_y, out_x,
                  nthreads);
}

}  // namespace entrodrop

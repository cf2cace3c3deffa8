// Helpers private to the CPU kernels (*_cpu.cpp): strided views, in-register fp16/bf16
// conversion, ISA dispatch and a thread fan-out (parallel_for, on the pool of threads_cpu.cpp).
#pragma once
#include <algorithm>
#include <limits>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "entrodrop.h"

// Runtime ISA dispatch: GCC/Clang emit one clone per target and pick at load time (ifunc).
// The build itself targets the portable x86-64 baseline (never -march=native).
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(ENTRODROP_NO_CLONES)
#define ED_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ED_CLONES
#endif
#define ED_INLINE inline __attribute__((always_inline))

namespace entrodrop {
namespace cpu {

// ----------------------------------------------------------------- strided 3-D view
struct View {
  const uint8_t* p = nullptr;  // base pointer (bytes)
  int dtype = DT_F32;
  int64_t sb = 0, st = 0, sd = 0;  // strides in elements
  int64_t esize() const { return dtype == DT_F32 ? 4 : 2; }
  const uint8_t* row(int64_t b, int64_t t) const { return p + (b * sb + t * st) * esize(); }
  bool dense_f32() const { return dtype == DT_F32 && sd == 1; }
};

inline View make_view(uintptr_t ptr, int dtype, const Dims& stride) {
  View v;
  v.p = reinterpret_cast<const uint8_t*>(ptr);
  v.dtype = dtype;
  v.sb = stride[0];
  v.st = stride[1];
  v.sd = stride[2];
  return v;
}

struct Mask {
  const uint8_t* p = nullptr;
  int64_t mb = 0, mt = 0;
  bool operator()(int64_t b, int64_t t) const { return p == nullptr || p[b * mb + t * mt] != 0; }
};

inline Mask make_mask(uintptr_t ptr, const Dims& stride) {
  Mask m;
  m.p = reinterpret_cast<const uint8_t*>(ptr);
  if (m.p) {
    m.mb = stride[0];
    m.mt = stride[1];
  }
  return m;
}

// ----------------------------------------------------------------- fp16 / bf16 -> fp32
ED_INLINE float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Branch-free IEEE half -> float (normals, subnormals, inf, NaN); vectorises.
ED_INLINE float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  uint32_t u = em << 13;
  float f;
  std::memcpy(&f, &u, 4);
  f *= 0x1p112f;  // rebias the exponent (exact; also turns half subnormals into normals)
  uint32_t r;
  std::memcpy(&r, &f, 4);
  r |= (em >= 0x7c00u) ? 0x7f800000u : 0u;  // inf / NaN keep an all-ones exponent
  r |= sign;
  std::memcpy(&f, &r, 4);
  return f;
}

// ----------------------------------------------------------------- 16-lane vectors
// GCC/Clang vector extensions: one zmm on AVX-512, two ymm on AVX2, four xmm on SSE2; the
// same source serves every target_clones clone. Loads are unaligned (aligned(4)/(2)).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef float v16f_u __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16h_u __attribute__((vector_size(32), aligned(2)));
typedef uint16_t v16h __attribute__((vector_size(32)));

ED_INLINE v16f vsplat(float a) {
  return v16f{} + a;
}
// (any vector type: GCC lowers a compare wider than the target's registers element by element,
// so the ISA copies below use their own width)
template <typename V>
ED_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}
template <typename V>
ED_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

typedef double v4d __attribute__((vector_size(32)));
typedef double v4d_u __attribute__((vector_size(32), aligned(8)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v4f_u __attribute__((vector_size(16), aligned(4)));
typedef float v8f __attribute__((vector_size(32)));

// Eight fp64 lanes as two 4-lane halves, lane by lane the arithmetic of one 8-lane vector. A
// 64-byte vector (vector_size(64)) carried through a loop is lowered through the stack and
// general registers in GCC 12's AVX2 clone (vmovq / vpinsrq per lane every iteration):
// knn's pack_row32_f32 took 10% of knn_entropy at [256, 576] on a Zen 3 machine for a copy of
// the sample. The AVX-512 clone uses two ymm halves as well.
struct D8 {
  v4d lo, hi;
};
ED_INLINE D8 to_d8(v8f x) {
  return {__builtin_convertvector(__builtin_shufflevector(x, x, 0, 1, 2, 3), v4d),
          __builtin_convertvector(__builtin_shufflevector(x, x, 4, 5, 6, 7), v4d)};
}
ED_INLINE v8f to_f8(D8 a) {
  const v4f l = __builtin_convertvector(a.lo, v4f), h = __builtin_convertvector(a.hi, v4f);
  return __builtin_shufflevector(l, h, 0, 1, 2, 3, 4, 5, 6, 7);
}
ED_INLINE D8 load_d8(const double* p) {
  return {*reinterpret_cast<const v4d_u*>(p), *reinterpret_cast<const v4d_u*>(p + 4)};
}
ED_INLINE D8 operator-(D8 a, D8 b) {
  return {a.lo - b.lo, a.hi - b.hi};
}
ED_INLINE D8 operator*(D8 a, D8 b) {
  return {a.lo * b.lo, a.hi * b.hi};
}
ED_INLINE D8 operator*(D8 a, double b) {
  return {a.lo * b, a.hi * b};
}
ED_INLINE D8& operator+=(D8& a, D8 b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
ED_INLINE double lane(const D8& a, int j) {
  return j < 4 ? a.lo[j] : a.hi[j - 4];
}

// ----------------------------------------------------------------- ISA copies
// Kernels whose vector code depends on the register width are written for L fp32 lanes and
// compiled three times, each in a wrapper with its target attribute: L = 16 for x86-64-v4
// (AVX-512), 8 for x86-64-v3 (AVX2) and 4 for the x86-64 baseline (SSE2); one copy is picked
// per process (isa_level). A vector wider than the target's registers is not an option: GCC
// 12 splits its arithmetic into register-wide pieces but lowers its compares, selects and
// narrowing conversions element by element (a 16-lane min is 16 vminss on AVX2; measured on
// a Zen 3 machine: bucket_entropy 7x slower than the AVX2 copy of the same loop).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(ENTRODROP_NO_CLONES)
#define ED_HAVE_X86_LEVELS 1
#define ED_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define ED_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#endif

// The best x86-64 level this CPU runs (4, 3, or 1 for the baseline and other architectures),
// or less when ENTRODROP_ISA says so ("x86-64-v3" or "baseline": for tests of the other
// copies).
inline int isa_level() {
  static const int level = [] {
#ifdef ED_HAVE_X86_LEVELS
    const char* cap = std::getenv("ENTRODROP_ISA");
    const int most = cap && std::strcmp(cap, "baseline") == 0    ? 1
                     : cap && std::strcmp(cap, "x86-64-v3") == 0 ? 3
                                                                 : 4;
    __builtin_cpu_init();
    const bool v3 =
        __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
    const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                    __builtin_cpu_supports("avx512cd");
    return v4 && most >= 4 ? 4 : v3 && most >= 3 ? 3 : 1;
#else
    return 1;
#endif
  }();
  return level;
}

// Vectors of L lanes: f (fp32), fu (its unaligned load type), d / du (fp64), i (int32), u
// (uint32), h / hu (16-bit, for fp16 / bf16 loads), b (bytes).
template <int L>
struct Vec;
#define ED_VEC(L)                                                        \
  template <>                                                            \
  struct Vec<L> {                                                        \
    typedef float f __attribute__((vector_size(4 * L)));                 \
    typedef float fu __attribute__((vector_size(4 * L), aligned(4)));    \
    typedef double d __attribute__((vector_size(8 * L)));                \
    typedef double du __attribute__((vector_size(8 * L), aligned(8)));   \
    typedef int32_t i __attribute__((vector_size(4 * L)));               \
    typedef uint32_t u __attribute__((vector_size(4 * L)));              \
    typedef uint16_t h __attribute__((vector_size(2 * L)));              \
    typedef uint16_t hu __attribute__((vector_size(2 * L), aligned(2))); \
    typedef uint8_t b __attribute__((vector_size(L)));                   \
  };
ED_VEC(16)
ED_VEC(8)
ED_VEC(4)
#undef ED_VEC

// L consecutive elements starting at p (channel stride 1), converted to fp32 in registers.
template <int DT, int L>
ED_INLINE typename Vec<L>::f loadv(const uint8_t* p) {
  typedef Vec<L> V;
  if constexpr (DT == DT_F32) {
    return *reinterpret_cast<const typename V::fu*>(p);
#if defined(__x86_64__) && defined(ED_HAVE_X86_LEVELS)
  } else if constexpr (L == 8) {
    // the x86-64-v3 copy: one widening load (GCC 12 splits the generic conversion into two
    // 4-lane halves and an insert) and, for fp16, F16C's exact conversion
    typename V::f r;
    if constexpr (DT == DT_BF16) {
      typename V::u u;
      __asm__("vpmovzxwd %1, %0" : "=x"(u) : "m"(*reinterpret_cast<const typename V::hu*>(p)));
      r = reinterpret_cast<typename V::f>(u << 16);
    } else {
      __asm__("vcvtph2ps %1, %0" : "=x"(r) : "m"(*reinterpret_cast<const typename V::hu*>(p)));
    }
    return r;
#endif
  } else {
    const typename V::h h = *reinterpret_cast<const typename V::hu*>(p);
    const typename V::u u = __builtin_convertvector(h, typename V::u);
    if constexpr (DT == DT_BF16) {
      return reinterpret_cast<typename V::f>(u << 16);
    } else {  // IEEE half, as f16_to_f32
      const typename V::u sign = (u & 0x8000u) << 16;
      const typename V::u em = u & 0x7fffu;
      typename V::f f = reinterpret_cast<typename V::f>(em << 13) * (typename V::f{} + 0x1p112f);
      typename V::u r = reinterpret_cast<typename V::u>(f);
      r |= reinterpret_cast<typename V::u>(em >= 0x7c00u) & 0x7f800000u;
      r |= sign;
      return reinterpret_cast<typename V::f>(r);
    }
  }
}

template <int DT>
ED_INLINE v16f load16(const uint8_t* p) {
  return loadv<DT, 16>(p);
}

template <int DT>
ED_INLINE float load1(const uint8_t* row, int64_t j) {
  if constexpr (DT == DT_F32)
    return reinterpret_cast<const float*>(row)[j];
  else if constexpr (DT == DT_F16)
    return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
  else
    return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
}

// The cosine of one token from its sums d = p.Y, px = |p|^2, py = |Y|^2: d / max(|p| |Y|, 1e-12).
// Where a sum is not finite (an fp32 product or sum past ~1e19, or a NaN/Inf value) the row
// again in fp64 -- partner p[j * ps], Y = y[j * ys] (+ f[j * fs], added in fp32) -- and NaN
// if it holds NaN/Inf (docs/CONTRACT.md). cosine_cpu and bucket_cosine_cpu share it.
template <int DT>
ED_INLINE double cos_from_sums(double d, double px, double py, const uint8_t* pr, int64_t ps,
                               const uint8_t* yr, int64_t ys, const uint8_t* fr, int64_t fs, int64_t D) {
  if (!std::isfinite(d) || !std::isfinite(px) || !std::isfinite(py)) {
    d = px = py = 0;
    for (int64_t j = 0; j < D; ++j) {
      const double a = load1<DT>(pr, j * ps);
      float yv = load1<DT>(yr, j * ys);
      if (fr) yv += load1<DT>(fr, j * fs);
      d += a * double(yv);
      px += a * a;
      py += double(yv) * double(yv);
    }
    if (!std::isfinite(d) || !std::isfinite(px) || !std::isfinite(py))
      return std::numeric_limits<double>::quiet_NaN();
  }
  return d / std::max(std::sqrt(px) * std::sqrt(py), 1e-12);
}

// out[i] = float(src[i * stride]) for i < w.
template <int DT>
ED_INLINE void load_seg(const uint8_t* src, int64_t stride, int64_t w, float* __restrict out) {
  if constexpr (DT == DT_F32) {
    const float* s = reinterpret_cast<const float*>(src);
    if (stride == 1) {
      for (int64_t i = 0; i < w; ++i) out[i] = s[i];
    } else {
      for (int64_t i = 0; i < w; ++i) out[i] = s[i * stride];
    }
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    if (stride == 1) {
      for (int64_t i = 0; i < w; ++i) out[i] = DT == DT_F16 ? f16_to_f32(s[i]) : bf16_to_f32(s[i]);
    } else {
      for (int64_t i = 0; i < w; ++i)
        out[i] = DT == DT_F16 ? f16_to_f32(s[i * stride]) : bf16_to_f32(s[i * stride]);
    }
  }
}

// out[i] += float(src[i * stride]) (the fused x + f, added in fp32).
template <int DT>
ED_INLINE void add_seg(const uint8_t* src, int64_t stride, int64_t w, float* __restrict out) {
  if constexpr (DT == DT_F32) {
    const float* s = reinterpret_cast<const float*>(src);
    if (stride == 1) {
      for (int64_t i = 0; i < w; ++i) out[i] += s[i];
    } else {
      for (int64_t i = 0; i < w; ++i) out[i] += s[i * stride];
    }
  } else {
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    if (stride == 1) {
      for (int64_t i = 0; i < w; ++i) out[i] += DT == DT_F16 ? f16_to_f32(s[i]) : bf16_to_f32(s[i]);
    } else {
      for (int64_t i = 0; i < w; ++i)
        out[i] += DT == DT_F16 ? f16_to_f32(s[i * stride]) : bf16_to_f32(s[i * stride]);
    }
  }
}

// y[0:w] = x[b, t, d0:d0+w] (+ f[b, t, d0:d0+w]) in fp32.
template <int DT>
ED_INLINE void load_y(const View& x, const View* f, int64_t b, int64_t t, int64_t d0, int64_t w,
                      float* __restrict y) {
  load_seg<DT>(x.row(b, t) + d0 * x.sd * x.esize(), x.sd, w, y);
  if (f) add_seg<DT>(f->row(b, t) + d0 * f->sd * f->esize(), f->sd, w, y);
}

// Ask for row t's segment [d0, d0 + w) of x (and f) ahead of its use. Kernels that walk a
// channel tile row by row touch a new page every row (rows of an LLM's hidden states are
// 4-32 KiB apart), where the hardware prefetchers stop, so each row would cost a full
// memory latency. Only for channel-contiguous rows (sd == 1).
ED_INLINE void prefetch_y(const View& x, const View* f, int64_t b, int64_t t, int64_t d0, int64_t w) {
  if (x.sd == 1) {
    const uint8_t* p = x.row(b, t) + d0 * x.esize();
    for (int64_t o = 0; o < w * x.esize(); o += 64) __builtin_prefetch(p + o);
  }
  if (f && f->sd == 1) {
    const uint8_t* p = f->row(b, t) + d0 * f->esize();
    for (int64_t o = 0; o < w * f->esize(); o += 64) __builtin_prefetch(p + o);
  }
}
constexpr int64_t kPrefetchRows = 8;

// ----------------------------------------------------------------- threads
inline int clamp_threads(int nthreads, int64_t work_items, int64_t elements,
                         int64_t min_elements_per_thread = 1 << 16) {
  int64_t n = std::max<int64_t>(1, nthreads);
  n = std::min<int64_t>(n, std::max<int64_t>(1, work_items));
  n = std::min<int64_t>(n, std::max<int64_t>(1, elements / min_elements_per_thread));
  return int(n);
}

// fn(ctx, item, tid) for item in [0, n_items) on at most nthreads threads, the caller
// included (tid 0; every tid < nthreads); returns when every item is done. Lives in
// threads_cpu.cpp (a pool that never waits for a thread that has not started; or torch's
// OpenMP team, or std::threads: ENTRODROP_THREADS=omp / std).
using ItemFn = void (*)(void* ctx, int64_t item, int tid);
void run_parallel(int64_t n_items, int nthreads, ItemFn fn, void* ctx);

// fn(item, tid) for item in [0, n_items), dynamically scheduled over at most nthreads
// threads (the calling thread is one of them; tid < nthreads). Exceptions are re-thrown on
// the caller (the items not started yet are skipped).
template <typename Fn>
void parallel_for(int64_t n_items, int nthreads, Fn&& fn) {
  if (n_items <= 0) return;
  if (nthreads <= 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i, 0);
    return;
  }
  struct Ctx {
    Fn* fn;
    std::atomic<bool> stop{false};
    std::exception_ptr err;
    std::mutex mu;
  } ctx;
  ctx.fn = &fn;
  run_parallel(
      n_items, nthreads,
      [](void* p, int64_t i, int tid) {
        auto* c = static_cast<Ctx*>(p);
        if (c->stop.load(std::memory_order_relaxed)) return;
        try {
          (*c->fn)(i, tid);
        } catch (...) {
          std::lock_guard<std::mutex> g(c->mu);
          if (!c->err) c->err = std::current_exception();
          c->stop.store(true, std::memory_order_relaxed);
        }
      },
      &ctx);
  if (ctx.err) std::rethrow_exception(ctx.err);
}

inline void check_common(uintptr_t x, int dtype, const Dims& shape, const Dims& xstride, uintptr_t f,
                         const Dims& fstride, uintptr_t mask, const Dims& mstride) {
  ED_CHECK_PTR(x);
  ED_CHECK_DTYPE(dtype);
  ED_CHECK_NDIM(shape, 3);
  ED_CHECK_NONNEG(shape);
  ED_CHECK_NDIM(xstride, 3);
  ED_CHECK_NONNEG(xstride);
  if (f) {
    ED_CHECK_NDIM(fstride, 3);
    ED_CHECK_NONNEG(fstride);
  }
  if (mask) {
    ED_CHECK_NDIM(mstride, 2);
    ED_CHECK_NONNEG(mstride);
  }
}

}  // namespace cpu
}  // namespace entrodrop

// CUDA kernels of the moments estimator (gaussian_diag, MomentState): per-channel count, mean,
// M2, min and max of Y = x (+ f), in token splits merged by a second small kernel.
//
// moments: per thread, chunks of kU rows are reduced two-pass in registers (chunk mean, then
// squared deviations about it), about a per-thread shift c (the mean of its first chunk) so
// that large offsets cost no precision, and merged into the thread's running (n, mean, M2)
// in fp32 with Chan's formula (one division per chunk per thread, none per element). Threads
// are merged in fp64: lanes by shuffles, warps through shared memory, splits by a second
// small kernel. No fp64 in the streaming loop.
#include "stream_stats.cuh"

namespace entrodrop {
namespace cuda {
namespace {

__global__ void moments_merge_kernel(int64_t B, int64_t D, int S, const float* __restrict__ pn,
                                     const double* __restrict__ pmean, const double* __restrict__ pm2,
                                     const float* __restrict__ pmin, const float* __restrict__ pmax,
                                     double* __restrict__ count, double* __restrict__ mean,
                                     double* __restrict__ m2, float* __restrict__ mn,
                                     float* __restrict__ mx) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (d >= D) return;
  double N = 0.0, M = 0.0, Q = 0.0;
  float a = INFINITY, z = -INFINITY;
  for (int s = 0; s < S; ++s) {
    const double nb = pn[b * S + s];
    const int64_t i = (b * S + s) * D + d;
    a = fmin_nan(a, pmin[i]);
    z = fmax_nan(z, pmax[i]);
    if (nb == 0.0) continue;
    chan_merge(N, M, Q, nb, pmean[i], pm2[i]);
    N += nb;
  }
  Q = Q > 0.0 ? Q : 0.0;        // (as before: rounding below 0, or NaN from fp32 overflow on finite values)
  if (nonfinite_range(a, z)) {  // the contract's report: NaN for every statistic of the channel
    const double qn = __longlong_as_double(0x7ff8000000000000LL);
    M = qn;
    Q = qn;
    a = z = __int_as_float(0x7fffffff);
  }
  mean[b * D + d] = M;
  m2[b * D + d] = Q;
  mn[b * D + d] = a;
  mx[b * D + d] = z;
  if (d == 0) count[b] = N;
}

}  // namespace

const char* moments_partial(const Input& in, int S, int64_t rows, float* pn, double* pmean, double* pm2,
                            float* pmin, float* pmax, int device, void* stream) {
  check_input(in, "moments_partial");
  check_split(in, S, rows, "moments_partial");
  if (const char* e = prepare(device)) return e;
  const dim3 grid = stream_grid(in, S);
  auto st = static_cast<cudaStream_t>(stream);
  // clang-format breaks the launch syntax inside this macro argument:
  // clang-format off
  ENTRODROP_DISPATCH(in, stats_kernel<T, VEC, true>(in.f != nullptr)<<<grid, kThreads, 0, st>>>(in, S, rows, pn, pmean, pm2, pmin, pmax););
  // clang-format on
  return last_error();
}

const char* moments_merge(int64_t B, int64_t D, int S, const float* pn, const double* pmean,
                          const double* pm2, const float* pmin, const float* pmax, double* count,
                          double* mean, double* m2, float* mn, float* mx, int device, void* stream) {
  if (const char* e = prepare(device)) return e;
  const dim3 grid(static_cast<unsigned>((D + 127) / 128), static_cast<unsigned>(B));
  moments_merge_kernel<<<grid, 128, 0, static_cast<cudaStream_t>(stream)>>>(B, D, S, pn, pmean, pm2, pmin,
                                                                            pmax, count, mean, m2, mn, mx);
  return last_error();
}

const char* moments_pair_partial(const Input& in, const StatsHalf& y, const StatsHalf& x, int device,
                                 void* stream) {
  check_pair(in, y, x, "moments_pair_partial");
  if (const char* e = prepare(device)) return e;
  const dim3 grid = pair_grid(in, y.S, x.S);
  auto st = static_cast<cudaStream_t>(stream);
  ENTRODROP_DISPATCH(in, stream_stats_pair_kernel<T, VEC, true><<<grid, kThreads, 0, st>>>(in, y, x););
  return last_error();
}

namespace detail {
const char* occupancy_stats(const Input& in, bool stats, int* n) {
  cudaError_t e = cudaSuccess;
  ENTRODROP_DISPATCH(in, {
    if (stats) {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, stats_kernel<T, VEC, true>(in.f != nullptr),
                                                        kThreads, 0);
    } else {
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, stats_kernel<T, VEC, false>(in.f != nullptr),
                                                        kThreads, 0);
    }
  });
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
}  // namespace detail

}  // namespace cuda
}  // namespace entrodrop

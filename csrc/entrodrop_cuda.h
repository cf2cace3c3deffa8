// entrodrop_fast CUDA kernels: host launchers (no pybind11, no libtorch in here), one source
// per estimator: moments_cuda.cu, bucket_hist_cuda.cu (the two-pass histogram),
// bucket_fused_cuda.cu and bucket_tile_cuda.cu (the single-read histograms), launch_cuda.cu
// (occupancy); their shared device code is in cuda_common.cuh, stream_stats.cuh, bucket_common.cuh.
// Tensors cross as raw device pointers + shape + strides (in elements) + dtype code
// (entrodrop_common.h, shared with the CPU kernels).
#pragma once
#include <cstdint>

#include "entrodrop_common.h"

namespace entrodrop {
namespace cuda {

// Limits (exported to Python as _C.CUDA_*): samples per call and token splits per launch (grid
// dimensions), rows of the single-read bucket kernels, rows per block of the shared-memory
// 16-bit histogram counters.
constexpr int kMaxSamples = 65535;
constexpr int kMaxSplits = 65535;
constexpr int kFusedRows = 256;
constexpr int kMaxRowsPerHistBlock = 65535;

// Y = x (+ f) over tokens with mask[b, t] != 0 (mask may be null, f may be null).
struct Input {
  const void* x = nullptr;
  const void* f = nullptr;
  const uint8_t* mask = nullptr;
  int64_t B = 0, T = 0, D = 0;
  int64_t sxb = 0, sxt = 0, sxd = 0;
  int64_t sfb = 0, sft = 0, sfd = 0;
  int64_t smb = 0, smt = 0;
  int dtype = DT_F32;
  // 1: generic path (any strides, 32 channels per block); 4 (fp32) / 8 (fp16, bf16): one
  // 16-byte load per row and thread, 64 channels per block; needs D % vec == 0, unit channel
  // strides, 16-byte aligned base pointers and batch/token strides divisible by vec.
  int vec = 1;
};

// Errors: a bad argument throws std::invalid_argument (ValueError in Python, as from the CPU
// kernels); each launcher returns nullptr on success, else the CUDA runtime's error string
// (RuntimeError in Python).
// Non-finite values (docs/CONTRACT.md): the kernels detect NaN/Inf in Y among the valid tokens
// in the pass that reads them (their min/max propagate NaN) and report it per (sample,
// channel): moments_merge writes mean = m2 = min = max = NaN; bucket_hist / bucket_fused write
// the channel's counts as -1 in bin 0 and 0 elsewhere (per split), and bucket_entropy /
// bucket_fused write H_d = NaN for a channel with a negative count.
// Grid of the streaming kernels: channel tiles (32 channels for vec 1, else 64) x S token
// splits of `rows` tokens x B samples, 256 threads per block.
// Partials: pn [B, S] fp32; pmean/pm2 [B, S, D] fp64; pmin/pmax [B, S, D] fp32.
const char* moments_partial(const Input& in, int S, int64_t rows, float* pn, double* pmean, double* pm2,
                            float* pmin, float* pmax, int device, void* stream);
// count [B] fp64, mean/m2 [B, D] fp64, min/max [B, D] fp32.
const char* moments_merge(int64_t B, int64_t D, int S, const float* pn, const double* pmean,
                          const double* pm2, const float* pmin, const float* pmax, double* count,
                          double* mean, double* m2, float* mn, float* mx, int device, void* stream);
// pmin/pmax [B, S, D] fp32.
const char* minmax_partial(const Input& in, int S, int64_t rows, float* pmin, float* pmax, int device,
                           void* stream);
// Bin counts of each token split into phist [B, S, D, bins] int32; every entry is written
// (the caller need not zero it). min/max from the S_partial partials of minmax_partial.
// rows <= hist_max_rows() keeps the shared-memory counters (else global atomics).
const char* bucket_hist(const Input& in, int S_partial, const float* pmin, const float* pmax, int S,
                        int64_t rows, int bins, int32_t* phist, int device, void* stream);
// H_d = -sum_j p_j ln p_j (fp64) from phist [B, S, D, bins] (summed over S) into out [B, D].
const char* bucket_entropy(int64_t B, int64_t D, int bins, int S, const int32_t* phist, int paper_exact,
                           double* out, int device, void* stream);
// Single pass for short samples: T <= fused_max_rows(), vec 4 or 8. Writes counts
// [B, D, bins] int32 and/or the entropy out [B, D] fp64 (either pointer may be null).
const char* bucket_fused(const Input& in, int bins, int paper_exact, int32_t* counts, double* out, int device,
                         void* stream);
// Pair launches (delta_entropy): the statistics of Y = x + f (half "y") and of x (half "x")
// in one launch; `in` has f. Each half takes the arguments of its single launch and writes
// exactly what that launch writes (same code and splits: bit for bit); the two blocks of a
// channel tile are adjacent in launch order, so x is read from HBM about once.
struct StatsHalf {
  int S = 1;
  int64_t rows = 1;
  float* pn = nullptr;  // moments only
  double* pmean = nullptr;
  double* pm2 = nullptr;
  float* pmin = nullptr;
  float* pmax = nullptr;
};
struct HistHalf {
  int Sp = 1;  // min/max partials of minmax_pair_partial
  const float* pmin = nullptr;
  const float* pmax = nullptr;
  int S = 1;
  int64_t rows = 1;
  int32_t* phist = nullptr;
};
struct FusedHalf {
  int32_t* counts = nullptr;
  double* out = nullptr;
};
const char* moments_pair_partial(const Input& in, const StatsHalf& y, const StatsHalf& x, int device,
                                 void* stream);
const char* minmax_pair_partial(const Input& in, const StatsHalf& y, const StatsHalf& x, int device,
                                void* stream);
const char* bucket_hist_pair(const Input& in, int bins, const HistHalf& y, const HistHalf& x, int device,
                             void* stream);
const char* bucket_fused_pair(const Input& in, int bins, int paper_exact, const FusedHalf& y,
                              const FusedHalf& x, int device, void* stream);
// The same single read (T <= fused_max_rows(), vec 4 or 8) by the occupancy design: a
// 32-channel tile of Y staged in shared memory, one owner thread per (channel, eighth of the
// rows) with private 8-bit counters, no atomics, <= 64 registers. Same outputs as bucket_fused.
const char* bucket_tile(const Input& in, int bins, int paper_exact, int32_t* counts, double* out, int device,
                        void* stream);
int fused_max_rows();
int hist_max_rows();
// Resident blocks per SM of a kernel: kind 0 moments, 1 min/max, 2 histogram, 3 fused.
const char* occupancy(int kind, int dtype, int vec, int bins, int has_f, int device, int* blocks_per_sm);

}  // namespace cuda
}  // namespace entrodrop

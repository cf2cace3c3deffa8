// entrodrop_fast CUDA kernels: host launchers (no pybind11, no libtorch in here).
// Tensors cross as raw device pointers + shape + strides (in elements) + dtype code.
#pragma once
#include <cstdint>

namespace entrodrop {
namespace cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Y = x (+ f) over tokens with mask[b, t] != 0 (mask may be null, f may be null).
struct Input {
  const void* x = nullptr;
  const void* f = nullptr;
  const uint8_t* mask = nullptr;
  int64_t B = 0, T = 0, D = 0;
  int64_t sxb = 0, sxt = 0, sxd = 0;
  int64_t sfb = 0, sft = 0, sfd = 0;
  int64_t smb = 0, smt = 0;
  int dtype = kF32;
  int vec = 1;  // 2: two channels per lane (16-bit dtypes, unit channel stride, 4-byte aligned)
};

// Each returns nullptr on success, else a static error string (a CUDA error or a bad argument).
// Partials: pn [B, S] fp32; pmean/pm2 [B, S, D] fp64; pmin/pmax [B, S, D] fp32.
const char* moments_partial(const Input& in, int S, int64_t rows, float* pn, double* pmean,
                            double* pm2, float* pmin, float* pmax, int device, void* stream);
// count [B] fp64, mean/m2 [B, D] fp64, min/max [B, D] fp32.
const char* moments_merge(int64_t B, int64_t D, int S, const float* pn, const double* pmean,
                          const double* pm2, const float* pmin, const float* pmax, double* count,
                          double* mean, double* m2, float* mn, float* mx, int device, void* stream);
// pmin/pmax [B, S, D] fp32.
const char* minmax_partial(const Input& in, int S, int64_t rows, float* pmin, float* pmax,
                           int device, void* stream);
// Adds per-(sample, channel) bin counts into hist [B, D, bins] int32 (zeroed by the caller).
const char* bucket_hist(const Input& in, int S_partial, const float* pmin, const float* pmax, int S,
                        int64_t rows, int bins, int32_t* hist, int device, void* stream);
// H_d = -sum_j p_j ln p_j (fp64) from hist [B, D, bins] into out [B, D].
const char* bucket_entropy(int64_t B, int64_t D, int bins, const int32_t* hist, int paper_exact,
                           double* out, int device, void* stream);

}  // namespace cuda
}  // namespace entrodrop

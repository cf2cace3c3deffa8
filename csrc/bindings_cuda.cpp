// register_cuda: the CUDA kernels as Python functions taking device pointers (ints), shapes,
// strides in elements, a dtype code (0 fp32, 1 fp16, 2 bf16), the device index and the
// caller's stream (torch.cuda.current_stream().cuda_stream). No libtorch. Bad arguments raise
// ValueError (the launchers throw std::invalid_argument, as the CPU kernels); an error of the
// CUDA runtime raises RuntimeError.
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "entrodrop_cuda.h"

namespace py = pybind11;

namespace entrodrop {
namespace {

using I3 = std::array<int64_t, 3>;
using I2 = std::array<int64_t, 2>;

template <typename P>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

// The launchers' CUDA runtime errors (their argument errors are thrown as ValueError).
void check(const char* what, const char* err) {
  if (err != nullptr) throw std::runtime_error(std::string("entrodrop CUDA ") + what + ": " + err);
}

cuda::Input make_input(uintptr_t x, uintptr_t f, uintptr_t mask, const I3& shape, const I3& sx, const I3& sf,
                       const I2& sm, int dtype, int vec) {
  cuda::Input in;
  in.x = ptr<const void>(x);
  in.f = f ? ptr<const void>(f) : nullptr;
  in.mask = mask ? ptr<const uint8_t>(mask) : nullptr;
  in.B = shape[0];
  in.T = shape[1];
  in.D = shape[2];
  in.sxb = sx[0];
  in.sxt = sx[1];
  in.sxd = sx[2];
  in.sfb = sf[0];
  in.sft = sf[1];
  in.sfd = sf[2];
  in.smb = sm[0];
  in.smt = sm[1];
  in.dtype = dtype;
  in.vec = vec;
  return in;
}

}  // namespace

void register_cuda(py::module_& m) {
  m.def(
      "cuda_moments_partial",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec, int S,
         int64_t rows, uintptr_t pn, uintptr_t pmean, uintptr_t pm2, uintptr_t pmin, uintptr_t pmax,
         int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("moments_partial",
              cuda::moments_partial(in, S, rows, ptr<float>(pn), ptr<double>(pmean), ptr<double>(pm2),
                                    ptr<float>(pmin), ptr<float>(pmax), device, ptr<void>(stream)));
      },
      "Per-split partial moments of Y = x (+ f): pn [B,S] f32, pmean/pm2 [B,S,D] f64, "
      "pmin/pmax [B,S,D] f32");
  m.def(
      "cuda_moments_merge",
      [](int64_t B, int64_t D, int S, uintptr_t pn, uintptr_t pmean, uintptr_t pm2, uintptr_t pmin,
         uintptr_t pmax, uintptr_t count, uintptr_t mean, uintptr_t m2, uintptr_t mn, uintptr_t mx,
         int device, uintptr_t stream) {
        check("moments_merge",
              cuda::moments_merge(B, D, S, ptr<const float>(pn), ptr<const double>(pmean),
                                  ptr<const double>(pm2), ptr<const float>(pmin), ptr<const float>(pmax),
                                  ptr<double>(count), ptr<double>(mean), ptr<double>(m2), ptr<float>(mn),
                                  ptr<float>(mx), device, ptr<void>(stream)));
      },
      "Chan-merge the split partials: count [B] f64, mean/m2 [B,D] f64, min/max [B,D] f32");
  m.def(
      "cuda_minmax_partial",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec, int S,
         int64_t rows, uintptr_t pmin, uintptr_t pmax, int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("minmax_partial", cuda::minmax_partial(in, S, rows, ptr<float>(pmin), ptr<float>(pmax), device,
                                                     ptr<void>(stream)));
      },
      "Per-split min/max of Y: pmin/pmax [B,S,D] f32");
  m.def(
      "cuda_bucket_hist",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec,
         int S_partial, uintptr_t pmin, uintptr_t pmax, int S, int64_t rows, int bins, uintptr_t phist,
         int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("bucket_hist",
              cuda::bucket_hist(in, S_partial, ptr<const float>(pmin), ptr<const float>(pmax), S, rows, bins,
                                ptr<int32_t>(phist), device, ptr<void>(stream)));
      },
      "Bin counts of each token split of Y into phist [B,S,D,bins] int32 (all entries written)");
  m.def(
      "cuda_bucket_entropy",
      [](int64_t B, int64_t D, int bins, int S, uintptr_t phist, bool paper_exact, uintptr_t out, int device,
         uintptr_t stream) {
        check("bucket_entropy",
              cuda::bucket_entropy(B, D, bins, S, ptr<const int32_t>(phist), paper_exact ? 1 : 0,
                                   ptr<double>(out), device, ptr<void>(stream)));
      },
      "H_d (fp64 [B,D]) from phist [B,S,D,bins] int32, summed over S");
  m.def(
      "cuda_bucket_fused",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec,
         int bins, bool paper_exact, uintptr_t counts, uintptr_t out, int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("bucket_fused", cuda::bucket_fused(in, bins, paper_exact ? 1 : 0, ptr<int32_t>(counts),
                                                 ptr<double>(out), device, ptr<void>(stream)));
      },
      "One pass for T <= cuda_fused_max_rows(): counts [B,D,bins] int32 and/or H_d [B,D] fp64 "
      "(0 for a pointer not wanted)");
  // Pair launches: the statistics of Y = x + f and of x in one launch (f required); each
  // half's arguments are those of its single launch.
  auto stats_half = [](int S, int64_t rows, uintptr_t pn, uintptr_t pmean, uintptr_t pm2, uintptr_t pmin,
                       uintptr_t pmax) {
    cuda::StatsHalf h;
    h.S = S;
    h.rows = rows;
    h.pn = ptr<float>(pn);
    h.pmean = ptr<double>(pmean);
    h.pm2 = ptr<double>(pm2);
    h.pmin = ptr<float>(pmin);
    h.pmax = ptr<float>(pmax);
    return h;
  };
  m.def(
      "cuda_moments_pair_partial",
      [stats_half](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype,
                   int vec, int Sy, int64_t rows_y, uintptr_t pn_y, uintptr_t pmean_y, uintptr_t pm2_y,
                   uintptr_t pmin_y, uintptr_t pmax_y, int Sx, int64_t rows_x, uintptr_t pn_x,
                   uintptr_t pmean_x, uintptr_t pm2_x, uintptr_t pmin_x, uintptr_t pmax_x, int device,
                   uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("moments_pair_partial",
              cuda::moments_pair_partial(in, stats_half(Sy, rows_y, pn_y, pmean_y, pm2_y, pmin_y, pmax_y),
                                         stats_half(Sx, rows_x, pn_x, pmean_x, pm2_x, pmin_x, pmax_x), device,
                                         ptr<void>(stream)));
      },
      "cuda_moments_partial of Y = x + f (first half of the arguments) and of x (second) in "
      "one launch");
  m.def(
      "cuda_minmax_pair_partial",
      [stats_half](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype,
                   int vec, int Sy, int64_t rows_y, uintptr_t pmin_y, uintptr_t pmax_y, int Sx,
                   int64_t rows_x, uintptr_t pmin_x, uintptr_t pmax_x, int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("minmax_pair_partial",
              cuda::minmax_pair_partial(in, stats_half(Sy, rows_y, 0, 0, 0, pmin_y, pmax_y),
                                        stats_half(Sx, rows_x, 0, 0, 0, pmin_x, pmax_x), device,
                                        ptr<void>(stream)));
      },
      "cuda_minmax_partial of Y = x + f and of x in one launch");
  m.def(
      "cuda_bucket_hist_pair",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec,
         int bins, int Sp_y, uintptr_t pmin_y, uintptr_t pmax_y, int Sy, int64_t rows_y, uintptr_t phist_y,
         int Sp_x, uintptr_t pmin_x, uintptr_t pmax_x, int Sx, int64_t rows_x, uintptr_t phist_x, int device,
         uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        cuda::HistHalf y, xh;
        y.Sp = Sp_y;
        y.pmin = ptr<const float>(pmin_y);
        y.pmax = ptr<const float>(pmax_y);
        y.S = Sy;
        y.rows = rows_y;
        y.phist = ptr<int32_t>(phist_y);
        xh.Sp = Sp_x;
        xh.pmin = ptr<const float>(pmin_x);
        xh.pmax = ptr<const float>(pmax_x);
        xh.S = Sx;
        xh.rows = rows_x;
        xh.phist = ptr<int32_t>(phist_x);
        check("bucket_hist_pair", cuda::bucket_hist_pair(in, bins, y, xh, device, ptr<void>(stream)));
      },
      "cuda_bucket_hist of Y = x + f and of x in one launch");
  m.def(
      "cuda_bucket_fused_pair",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec,
         int bins, bool paper_exact, uintptr_t counts_y, uintptr_t out_y, uintptr_t counts_x, uintptr_t out_x,
         int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        cuda::FusedHalf y, xh;
        y.counts = ptr<int32_t>(counts_y);
        y.out = ptr<double>(out_y);
        xh.counts = ptr<int32_t>(counts_x);
        xh.out = ptr<double>(out_x);
        check("bucket_fused_pair",
              cuda::bucket_fused_pair(in, bins, paper_exact ? 1 : 0, y, xh, device, ptr<void>(stream)));
      },
      "cuda_bucket_fused of Y = x + f and of x in one launch");
  m.def(
      "cuda_bucket_tile",
      [](uintptr_t x, uintptr_t f, uintptr_t mask, I3 shape, I3 sx, I3 sf, I2 sm, int dtype, int vec,
         int bins, bool paper_exact, uintptr_t counts, uintptr_t out, int device, uintptr_t stream) {
        const auto in = make_input(x, f, mask, shape, sx, sf, sm, dtype, vec);
        check("bucket_tile", cuda::bucket_tile(in, bins, paper_exact ? 1 : 0, ptr<int32_t>(counts),
                                               ptr<double>(out), device, ptr<void>(stream)));
      },
      "cuda_bucket_fused by the shared-memory tile design (owner thread per channel and row part, "
      "no atomics, <= 64 registers); same arguments and outputs");
  m.def("cuda_fused_max_rows", &cuda::fused_max_rows,
        "Most tokens per sample of the single-read bucket kernels (cuda_bucket_fused / _tile)");
  m.def("cuda_hist_max_rows", &cuda::hist_max_rows,
        "Most rows per block of cuda_bucket_hist's shared-memory (16-bit) counters");
  m.attr("CUDA_MAX_SAMPLES") = cuda::kMaxSamples;
  m.attr("CUDA_MAX_SPLITS") = cuda::kMaxSplits;
  m.def(
      "cuda_occupancy",
      [](int kind, int dtype, int vec, int bins, bool has_f, int device) {
        int n = 0;
        check("occupancy", cuda::occupancy(kind, dtype, vec, bins, has_f ? 1 : 0, device, &n));
        return n;
      },
      "Resident blocks per SM: kind 0 moments, 1 min/max, 2 histogram, 3 fused");
}

}  // namespace entrodrop

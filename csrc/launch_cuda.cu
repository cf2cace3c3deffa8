// Host side shared by the estimators' launchers: the occupancy query that sizes their token
// splits (cuda_backend._splits), answered by the source that owns each kernel.
#include "cuda_common.cuh"

namespace entrodrop {
namespace cuda {

const char* occupancy(int kind, int dtype, int vec, int bins, int has_f, int device, int* blocks_per_sm) {
  ED_CHECK(kind >= 0 && kind <= 3, "kind must be 0 (moments), 1 (min/max), 2 (histogram) or 3 (fused), got ",
           kind);
  ED_CHECK_DTYPE(dtype);
  ED_CHECK(vec == 1 || vec == (dtype == DT_F32 ? 4 : 8), "vec must be 1, 4 (fp32) or 8 (fp16/bf16), got ",
           vec);
  if (kind >= 2) ED_CHECK_BINS(bins);
  if (const char* e = prepare(device)) return e;
  Input in;
  in.dtype = dtype;
  in.vec = vec;
  // (only has_f matters to the kernel choice: a non-null placeholder)
  in.f = has_f ? &in : nullptr;
  *blocks_per_sm = 0;
  if (kind <= 1) return detail::occupancy_stats(in, kind == 0, blocks_per_sm);
  const int optin = smem_optin(device);
  if (kind == 2) return detail::occupancy_hist(in, bins, optin, blocks_per_sm);
  return detail::occupancy_fused(in, bins, optin, blocks_per_sm);
}

}  // namespace cuda
}  // namespace entrodrop

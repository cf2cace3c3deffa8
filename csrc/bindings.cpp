// Python bindings: only m.def lines. Kernels live in *_cpu.cpp / *_cuda.cu; their
// arguments (pointers, shapes, strides in elements, dtype codes) are documented in
// entrodrop.h; bad arguments raise ValueError (entrodrop_common.h). Every kernel releases the GIL.
// The limits Python needs are exported as module attributes (MAX_BINS, KNN_FUSED_MAX_N, ...),
// so the Python side reads them instead of copying them.
#include "bindings.h"
#include "entrodrop.h"

namespace py = pybind11;

namespace entrodrop {
void register_cpu(py::module_& m) {
  using py::arg;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("moments_cpu", &moments_cpu, nogil, arg("x"), arg("f"), arg("mask"), arg("dtype"), arg("shape"),
        arg("xstride"), arg("fstride"), arg("mstride"), arg("count"), arg("mean"), arg("m2"), arg("min"),
        arg("max"), arg("nthreads"),
        "Per-channel count/mean/M2/min/max of y = x (+ f) per sample ([B, T, D]).");
  m.def("bucket_cpu", &bucket_cpu, nogil, arg("x"), arg("f"), arg("mask"), arg("dtype"), arg("shape"),
        arg("xstride"), arg("fstride"), arg("mstride"), arg("bins"), arg("paper_exact"), arg("out"),
        arg("nthreads"), "Per-channel histogram entropy H_d (fp64 [B, D]) of y = x (+ f).");
  m.def("moments_pair_cpu", &moments_pair_cpu, nogil, arg("x"), arg("f"), arg("mask"), arg("dtype"),
        arg("shape"), arg("xstride"), arg("fstride"), arg("mstride"), arg("count"), arg("mean_y"),
        arg("m2_y"), arg("min_y"), arg("max_y"), arg("mean_x"), arg("m2_x"), arg("min_x"), arg("max_x"),
        arg("nthreads"), "moments_cpu of y = x + f and of x, from one read of x and f.");
  m.def("bucket_pair_cpu", &bucket_pair_cpu, nogil, arg("x"), arg("f"), arg("mask"), arg("dtype"),
        arg("shape"), arg("xstride"), arg("fstride"), arg("mstride"), arg("bins"), arg("paper_exact"),
        arg("out_y"), arg("out_x"), arg("nthreads"),
        "bucket_cpu of y = x + f and of x, from one read of x and f.");
  m.def("bucket_cosine_cpu", &bucket_cosine_cpu, nogil, arg("x"), arg("f"), arg("c"), arg("mask"),
        arg("dtype"), arg("shape"), arg("xstride"), arg("fstride"), arg("cstride"), arg("mstride"),
        arg("bins"), arg("paper_exact"), arg("out"), arg("cos_sum"), arg("cos_count"), arg("nthreads"),
        "bucket_cpu of y = x (+ f) and cosine_cpu of (x, y) (f given) or (c, y), in one read.");
  m.def("cosine_cpu", &cosine_cpu, nogil, arg("x"), arg("other"), arg("mask"), arg("dtype"), arg("shape"),
        arg("xstride"), arg("ostride"), arg("mstride"), arg("fused"), arg("out_sum"), arg("out_count"),
        arg("nthreads"), "Sum over valid tokens of cos(x_t, Y_t) and the count, fp64 [B] each.");
  m.def("thread_pool_cpu", &thread_pool_cpu,
        "Which threads the CPU kernels run on: torch's OpenMP team (default where one is loaded),\n"
        "the pool (where none is, in a forked child, for a while after a stalled region, or\n"
        "ENTRODROP_THREADS=pool), std::thread (ENTRODROP_THREADS=std).");
  m.def("mark_forked_cpu", &mark_forked_cpu,
        "Tell the CPU kernels this process was forked after the package was imported (the\n"
        "package's own fork hook calls it): they run on the pool, not the parent's OpenMP team.");
  m.def("knn_fused_cpu", &knn_fused_cpu, nogil, arg("x"), arg("f"), arg("mask"), arg("dtype"), arg("shape"),
        arg("xstride"), arg("fstride"), arg("mstride"), arg("k"), arg("out"), arg("count"), arg("logsum"),
        arg("nthreads"),
        "k-th nearest-neighbour radii of every sample of up to 512 valid tokens, in one call.");
  m.def("knn_isa_cpu", &knn_isa_cpu,
        "Which instruction set knn_fused_cpu's kernels use (ENTRODROP_ISA caps it).");
  m.def("knn_sqnorm_cpu", &knn_sqnorm_cpu, nogil, arg("x"), arg("n"), arg("d"), arg("ld"), arg("ranges"),
        arg("out"), arg("nthreads"),
        "Add the fp64 squared norms of the rows of x over column ranges to out.");
  m.def("knn_tile_cpu", &knn_tile_cpu, nogil, arg("gram"), arg("ld"), arg("sqn"), arg("n"), arg("r0"),
        arg("nr"), arg("c0"), arg("nc"), arg("k"), arg("delta"), arg("val"), arg("idx"), arg("cnt"),
        arg("thr"), arg("cap"), arg("nthreads"),
        "Offer one Gram tile's squared distances to the rows' k-nearest candidate lists.");
  m.def("knn_finish_cpu", &knn_finish_cpu, nogil, arg("val"), arg("idx"), arg("cnt"), arg("n"), arg("cap"),
        arg("k"), arg("delta"), arg("x"), arg("dtype"), arg("xstride"), arg("d"), arg("out"), arg("nthreads"),
        arg("unit") = 1.0, "Exact k-th distances from the candidate lists (NaN where a list overflowed).");
  m.def("knn_select_cpu", &knn_select_cpu, nogil, arg("gram"), arg("sqn"), arg("rows"), arg("n"),
        arg("row_index"), arg("k"), arg("delta"), arg("x"), arg("dtype"), arg("xstride"), arg("d"),
        arg("out"), arg("nthreads"), arg("unit") = 1.0,
        "Exact distance to the k-th nearest other row, from whole Gram rows.");
}
}  // namespace entrodrop

PYBIND11_MODULE(_C, m) {
  m.doc() = "entrodrop_fast compiled kernels (no libtorch: tensors cross as pointer/shape/strides/dtype)";
#ifdef ENTRODROP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.attr("MAX_BINS") = entrodrop::kMaxBins;
  m.attr("KNN_FUSED_MAX_N") = entrodrop::kKnnFusedMaxN;
  entrodrop::register_cpu(m);
#ifdef ENTRODROP_WITH_CUDA
  entrodrop::register_cuda(m);
#endif
}

// Python bindings: only m.def lines. Kernels live in *_cpu.cpp / *_cuda.cu.
#include "entrodrop.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "entrodrop_fast compiled kernels (no libtorch: tensors cross as pointer/shape/strides/dtype)";
#ifdef ENTRODROP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  entrodrop::register_cpu(m);
#ifdef ENTRODROP_WITH_CUDA
  entrodrop::register_cuda(m);
#endif
}

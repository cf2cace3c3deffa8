// entrodrop_fast C++ API shared by the CPU and CUDA kernels.
#pragma once
#include <pybind11/pybind11.h>

namespace entrodrop {
void register_cpu(pybind11::module_& m);
#ifdef ENTRODROP_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif
}  // namespace entrodrop

// The only header that includes pybind11: bindings.cpp (CPU) and bindings_cuda.cpp (CUDA)
// register the kernels' entry points as functions of entrodrop_fast._C. The kernels themselves
// (entrodrop.h, entrodrop_cuda.h, entrodrop_common.h) never see Python.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace entrodrop {
void register_cpu(pybind11::module_& m);
#ifdef ENTRODROP_WITH_CUDA
void register_cuda(pybind11::module_& m);
#endif
}  // namespace entrodrop

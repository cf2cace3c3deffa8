#include "entrodrop.h"
namespace entrodrop {
void register_cuda(pybind11::module_& m) { (void)m; }
}  // namespace entrodrop

#include "entrodrop.h"
namespace entrodrop {
void register_cpu(pybind11::module_& m) { (void)m; }
}  // namespace entrodrop

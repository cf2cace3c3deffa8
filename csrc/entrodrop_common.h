// The boundary every kernel source shares, CPU (*_cpu.cpp) and CUDA (*_cuda.cu) alike: dtype
// codes, the dtype dispatch, argument checks and limits. No pybind11, no libtorch, no CUDA:
// the host compiler and nvcc both read it.
//
// Tensors cross from Python as a raw pointer (uintptr_t) + shape + strides (in elements, any
// value >= 0) + a dtype code; outputs are allocated by the caller (torch) and passed by pointer.
//
// Errors: a bad argument throws std::invalid_argument (ED_CHECK), which pybind11 turns into a
// Python ValueError, from CPU and CUDA entry points alike. Only a failure of the CUDA runtime
// itself (a launch, an allocation) is a RuntimeError.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace entrodrop {

// ----------------------------------------------------------------- dtype codes
enum DType : int { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
inline const char* dtype_name(int code) {
  switch (code) {
    case DT_F32:
      return "float32";
    case DT_F16:
      return "float16";
    case DT_BF16:
      return "bfloat16";
    default:
      return "unknown";
  }
}
inline bool valid_dtype(int code) {
  return code >= DT_F32 && code <= DT_BF16;
}

// fn(std::integral_constant<int, DT>{}) for the runtime dtype code (checked beforehand: an
// unknown code runs fp32). The one place that turns a dtype code into a compile-time constant:
//   dispatch_dtype(dtype, [&](auto dt) { kernel<decltype(dt)::value>(...); });
template <typename Fn>
decltype(auto) dispatch_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case DT_F16:
      return std::forward<Fn>(fn)(std::integral_constant<int, DT_F16>{});
    case DT_BF16:
      return std::forward<Fn>(fn)(std::integral_constant<int, DT_BF16>{});
    default:
      return std::forward<Fn>(fn)(std::integral_constant<int, DT_F32>{});
  }
}

// One of three per-dtype functions (non-template copies, e.g. for target_clones) by dtype code.
template <typename F>
F by_dtype(int dtype, F f32, F f16, F bf16) {
  return dispatch_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    return DT == DT_F16 ? f16 : (DT == DT_BF16 ? bf16 : f32);
  });
}

// ----------------------------------------------------------------- limits (exported to Python)
// Most histogram bins per channel, every backend (Python: entrodrop_fast._C.MAX_BINS).
constexpr int kMaxBins = 1 << 16;

using Dims = std::vector<int64_t>;

// ----------------------------------------------------------------- readable boundary checks
namespace detail {
inline void cat_into(std::ostringstream&) {}
template <typename T, typename... R>
void cat_into(std::ostringstream& os, const T& v, const R&... rest) {
  os << v;
  cat_into(os, rest...);
}
template <typename... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  cat_into(os, a...);
  return os.str();
}
inline std::string shape_str(const Dims& s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}
}  // namespace detail

// std::invalid_argument becomes a Python ValueError through pybind11. `where` names the entry
// point in the message (ED_CHECK uses the enclosing function's name).
#define ED_CHECK_IN(where, cond, ...)                                                             \
  do {                                                                                            \
    if (!(cond)) throw std::invalid_argument(::entrodrop::detail::cat(where, ": ", __VA_ARGS__)); \
  } while (0)
#define ED_CHECK(cond, ...) ED_CHECK_IN(__func__, cond, __VA_ARGS__)
#define ED_CHECK_DTYPE(code)                                                                                \
  ED_CHECK(::entrodrop::valid_dtype(code), #code " must be 0 (float32), 1 (float16) or 2 (bfloat16), got ", \
           (code))
#define ED_CHECK_NDIM(vec, n)                                                      \
  ED_CHECK((vec).size() == (size_t)(n), #vec " must have ", (n), " entries, got ", \
           ::entrodrop::detail::shape_str(vec))
#define ED_CHECK_PTR(p) ED_CHECK((p) != 0, #p " must be a valid pointer, got null")
#define ED_CHECK_NONNEG(vec)                                                              \
  do {                                                                                    \
    for (auto v_ : (vec))                                                                 \
      ED_CHECK(v_ >= 0, #vec " must be >= 0, got ", ::entrodrop::detail::shape_str(vec)); \
  } while (0)
#define ED_CHECK_BINS(bins)                                                                               \
  ED_CHECK((bins) >= 1 && (bins) <= ::entrodrop::kMaxBins, "bins must be in [1, ", ::entrodrop::kMaxBins, \
           "], got ", (bins))

}  // namespace entrodrop

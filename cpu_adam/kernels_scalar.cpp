// Scalar tier: baseline x86-64 (the compiler may still use SSE2), the
// reference every other tier is tested against.
#include <cstddef>
#include <cstdint>

#include "cpu_adam/kernel_table.hpp"

namespace zinf::cpu_adam {
namespace scalar_tier {
namespace {

#include "cpu_adam/dtype_convert.inc"
#include "cpu_adam/kernels_types.inc"

struct V {
  static constexpr std::size_t width = 1;
  float x;
};
template <>
inline V splat<V>(float a) {
  return {a};
}
inline V add(V a, V b) { return {a.x + b.x}; }
inline V sub(V a, V b) { return {a.x - b.x}; }
inline V mul(V a, V b) { return {a.x * b.x}; }
inline V div(V a, V b) { return {a.x / b.x}; }
inline V sqrt_(V a) { return {__builtin_sqrtf(a.x)}; }
inline V sign(V a) { return {sign(a.x)}; }
template <class T>
inline V loadv(const T* p) {
  return {load1(p, 0)};
}
template <class T>
inline void storev(T* p, V v) {
  store1(p, 0, v.x);
}

// Lanes of the GCC vector types of kernels_compressed.inc.
constexpr std::size_t kLanes = 4;

#include "cpu_adam/kernels_impl.inc"

}  // namespace
}  // namespace scalar_tier

const KernelTable& scalar_kernels() {
  static const KernelTable table = scalar_tier::make_table("scalar");
  return table;
}

}  // namespace zinf::cpu_adam

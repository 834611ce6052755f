// AVX2 tier: 8 floats per vector, F16C for fp16, integer round-to-nearest-
// even for bf16. Built with -mavx2 -mfma -mf16c -ffp-contract=off; called
// only where CPUID and XGETBV say the CPU and OS support AVX2.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu_adam/kernel_table.hpp"

namespace zinf::cpu_adam {
namespace avx2_tier {
namespace {

#include "cpu_adam/dtype_convert.inc"
#include "cpu_adam/kernels_types.inc"

struct V {
  static constexpr std::size_t width = 8;
  __m256 x;
};
template <>
inline V splat<V>(float a) {
  return {_mm256_set1_ps(a)};
}
inline V add(V a, V b) { return {_mm256_add_ps(a.x, b.x)}; }
inline V sub(V a, V b) { return {_mm256_sub_ps(a.x, b.x)}; }
inline V mul(V a, V b) { return {_mm256_mul_ps(a.x, b.x)}; }
inline V div(V a, V b) { return {_mm256_div_ps(a.x, b.x)}; }
inline V sqrt_(V a) { return {_mm256_sqrt_ps(a.x)}; }
inline V sign(V a) {
  // +1 where a > 0, -1 where a < 0, a itself (0, -0, NaN) elsewhere.
  const __m256 zero = _mm256_setzero_ps();
  __m256 r = _mm256_blendv_ps(a.x, _mm256_set1_ps(1.0f), _mm256_cmp_ps(a.x, zero, _CMP_GT_OQ));
  return {_mm256_blendv_ps(r, _mm256_set1_ps(-1.0f), _mm256_cmp_ps(a.x, zero, _CMP_LT_OQ))};
}

inline V loadv(const float* p) { return {_mm256_loadu_ps(p)}; }
inline V loadv(const Bf16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16))};
}
inline V loadv(const F16* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline void storev(float* p, V v) { _mm256_storeu_ps(p, v.x); }
inline void storev(Bf16* p, V v) {
  const __m256i u = _mm256_castps_si256(v.x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i magnitude = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i bits = _mm256_blendv_epi8(rounded, quiet, is_nan);
  const __m128i packed =
      _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline void storev(F16* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void storev(NoCopy*, V) {}

// Lanes of the GCC vector types of kernels_compressed.inc.
constexpr std::size_t kLanes = 8;

#include "cpu_adam/kernels_impl.inc"

}  // namespace
}  // namespace avx2_tier

const KernelTable& avx2_kernels() {
  static const KernelTable table = avx2_tier::make_table("avx2");
  return table;
}

}  // namespace zinf::cpu_adam

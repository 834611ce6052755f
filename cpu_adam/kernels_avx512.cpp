// AVX-512 tier: 16 floats per vector. Built with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mf16c -mfma -ffp-contract=off; called only where
// CPUID and XGETBV say the CPU and OS support AVX-512 F/BW/VL/DQ.
//
// bf16 stores use integer round-to-nearest-even rather than AVX512-BF16's
// vcvtneps2bf16, which treats subnormal inputs as zero: the integer form is
// exact for every input, agrees with the other tiers bit for bit, and its
// few integer operations are hidden under the memory traffic.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu_adam/kernel_table.hpp"

namespace zinf::cpu_adam {
namespace avx512_tier {
namespace {

#include "cpu_adam/dtype_convert.inc"
#include "cpu_adam/kernels_types.inc"

struct V {
  static constexpr std::size_t width = 16;
  __m512 x;
};
template <>
inline V splat<V>(float a) {
  return {_mm512_set1_ps(a)};
}
inline V add(V a, V b) { return {_mm512_add_ps(a.x, b.x)}; }
inline V sub(V a, V b) { return {_mm512_sub_ps(a.x, b.x)}; }
inline V mul(V a, V b) { return {_mm512_mul_ps(a.x, b.x)}; }
inline V div(V a, V b) { return {_mm512_div_ps(a.x, b.x)}; }
inline V sqrt_(V a) { return {_mm512_sqrt_ps(a.x)}; }
inline V sign(V a) {
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 positive = _mm512_cmp_ps_mask(a.x, zero, _CMP_GT_OQ);
  const __mmask16 negative = _mm512_cmp_ps_mask(a.x, zero, _CMP_LT_OQ);
  __m512 r = _mm512_mask_blend_ps(positive, a.x, _mm512_set1_ps(1.0f));
  return {_mm512_mask_blend_ps(negative, r, _mm512_set1_ps(-1.0f))};
}

inline V loadv(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V loadv(const Bf16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
}
inline V loadv(const F16* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void storev(float* p, V v) { _mm512_storeu_ps(p, v.x); }
inline void storev(Bf16* p, V v) {
  const __m512i u = _mm512_castps_si512(v.x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __m512i magnitude = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  const __m512i bits = _mm512_mask_blend_epi32(is_nan, rounded, quiet);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bits));
}
inline void storev(F16* p, V v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void storev(NoCopy*, V) {}

// Lanes of the GCC vector types of kernels_compressed.inc.
constexpr std::size_t kLanes = 16;

#include "cpu_adam/kernels_impl.inc"

}  // namespace
}  // namespace avx512_tier

const KernelTable& avx512_kernels() {
  static const KernelTable table = avx512_tier::make_table("avx512");
  return table;
}

}  // namespace zinf::cpu_adam

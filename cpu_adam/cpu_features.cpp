#include "cpu_adam/cpu_features.hpp"

#include <cpuid.h>

#include <cstdint>
#include <cstdlib>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"
#include "cpu_adam/xgetbv.hpp"

namespace zinf::cpu_adam {

std::string_view to_string(Tier tier) {
  switch (tier) {
    case Tier::scalar: return "scalar";
    case Tier::avx2: return "avx2";
    case Tier::avx512: return "avx512";
  }
  return "unknown";
}

Tier parse_tier(std::string_view text) {
  if (text == "scalar") return Tier::scalar;
  if (text == "avx2") return Tier::avx2;
  if (text == "avx512") return Tier::avx512;
  throw Error(ErrorKind::invalid,
              fmt::format("unknown CPU Adam tier '{}': expected scalar, avx2 or avx512", text));
}

std::string CpuFeatures::describe() const {
  return fmt::format("AVX2+FMA+F16C {}, AVX-512 F/BW/VL/DQ {}, AVX512-BF16 {}", avx2 ? "yes" : "no",
                     avx512 ? "yes" : "no", avx512_bf16 ? "yes" : "no");
}

CpuFeatures detect_cpu_features() {
  CpuFeatures features;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return features;
  const bool fma = (ecx & bit_FMA) != 0;
  const bool osxsave = (ecx & bit_OSXSAVE) != 0;
  const bool avx = (ecx & bit_AVX) != 0;
  const bool f16c = (ecx & bit_F16C) != 0;
  if (!osxsave || !avx) return features;
  const std::uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6;            // XMM and YMM state
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;          // plus opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return features;
  const unsigned leaf7_subleaves = eax;
  features.avx2 = os_ymm && fma && f16c && (ebx & bit_AVX2) != 0;
  features.avx512 = features.avx2 && os_zmm && (ebx & bit_AVX512F) != 0 &&
                    (ebx & bit_AVX512BW) != 0 && (ebx & bit_AVX512VL) != 0 &&
                    (ebx & bit_AVX512DQ) != 0;
  if (leaf7_subleaves >= 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) != 0) {
    features.avx512_bf16 = features.avx512 && (eax & (1u << 5)) != 0;
  }
  return features;
}

Tier best_tier(const CpuFeatures& features) {
  if (features.avx512) return Tier::avx512;
  if (features.avx2) return Tier::avx2;
  return Tier::scalar;
}

bool tier_supported(Tier tier, const CpuFeatures& features) {
  return static_cast<int>(tier) <= static_cast<int>(best_tier(features));
}

Tier resolve_tier(const CpuFeatures& features, const char* forced) {
  Tier tier = best_tier(features);
  if (forced != nullptr && *forced != '\0') {
    const Tier wanted = parse_tier(forced);
    if (tier_supported(wanted, features)) {
      tier = wanted;
    } else {
      log().warn("ZINF_CPU_ADAM_TIER={} is not supported by this CPU ({}); using {}", forced,
                 features.describe(), to_string(tier));
    }
  }
  return tier;
}

Tier default_tier() {
  static const Tier chosen = [] {
    const CpuFeatures features = detect_cpu_features();
    const Tier tier = resolve_tier(features, std::getenv("ZINF_CPU_ADAM_TIER"));
    log().info("CPU optimizer kernels: {} tier ({})", to_string(tier), features.describe());
    return tier;
  }();
  return chosen;
}

}  // namespace zinf::cpu_adam

// Which kernel tier this CPU and OS can run, from CPUID and XGETBV (the OS
// must save the wider registers, not just the CPU have them).
#pragma once

#include <string>
#include <string_view>

namespace zinf::cpu_adam {

enum class Tier { scalar = 0, avx2 = 1, avx512 = 2 };

std::string_view to_string(Tier tier);
Tier parse_tier(std::string_view text);  // "scalar", "avx2", "avx512"

struct CpuFeatures {
  bool avx2 = false;     // with FMA, F16C and OS YMM state
  bool avx512 = false;   // F, BW, VL, DQ with OS ZMM and opmask state
  bool avx512_bf16 = false;
  std::string describe() const;
};

CpuFeatures detect_cpu_features();
Tier best_tier(const CpuFeatures& features);
bool tier_supported(Tier tier, const CpuFeatures& features);

// The tier for `features` when `forced` (ZINF_CPU_ADAM_TIER's value, may be
// null or empty) asks for one: a supported request is honoured, one above
// what the host supports falls back to the best tier with a warning.
Tier resolve_tier(const CpuFeatures& features, const char* forced);

// The tier to use: the best the host supports, lowered by the environment
// variable ZINF_CPU_ADAM_TIER (a request above what the host supports is
// refused with a warning). Logged once per process.
Tier default_tier();

}  // namespace zinf::cpu_adam

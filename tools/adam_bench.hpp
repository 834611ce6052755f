// `zinf-bench adam`: params/s of the CPU optimizers per tier, dtype pair,
// thread count and size, next to the memory-bound limit measured in the
// same run by a kernel with the same loads and stores (bandwidth_step), and
// the fraction of that limit reached.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cpu_adam/cpu_adam.hpp"

namespace zinf::bench {

struct AdamCase {
  std::string optimizer = "adamw";  // adam, adamw, adagrad, lion
  cpu_adam::Tier tier = cpu_adam::Tier::scalar;
  cpu_adam::DType param = cpu_adam::DType::f32;
  cpu_adam::DType grad = cpu_adam::DType::f32;
  cpu_adam::DType state = cpu_adam::DType::f32;
  std::optional<cpu_adam::DType> copy;
  std::uint64_t elements = 0;  // per tensor
  std::uint64_t tensors = 1;
  std::string label() const;
  // Bytes moved per param by Adam's access pattern for these dtypes (reads
  // of param, grad and both states; writes of param, both states and copy).
  std::uint64_t bytes_per_param() const;
};

struct AdamResult {
  AdamCase spec;
  std::size_t threads = 0;
  double params_per_s = 0;        // median
  double limit_params_per_s = 0;  // median of the bandwidth kernel
  double fraction() const { return limit_params_per_s > 0 ? params_per_s / limit_params_per_s : 0; }
  double gb_per_s() const { return params_per_s * static_cast<double>(spec.bytes_per_param()) / 1e9; }
  nlohmann::json to_json() const;
};

// Allocates (huge pages, pre-faulted once) and initialises the buffers,
// then alternates timed optimizer and bandwidth steps `repeats` times.
AdamResult run_adam_case(const AdamCase& spec, cpu_adam::CpuOptimizer& optimizer, int repeats,
                         double min_seconds);

}  // namespace zinf::bench

// zinf-bench gpu (tools/gpu_bench.cpp): pinned copies, NVMe -> GPU
// streaming and prefetch on a CUDA device, each against a reference
// measured in the same run. Built only when the build finds CUDA.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

namespace zinf::bench {

struct GpuBenchOptions {
  std::filesystem::path directory = "/var/tmp";  // for the NVMe streaming files
  std::uint64_t bytes = std::uint64_t{1} << 30;   // per copy / per streaming pass
  std::uint64_t shard_bytes = std::uint64_t{64} << 20;
  int repeats = 3;
  int device_index = 0;
};

struct GpuBenchResult {
  std::string device;
  std::uint64_t bytes = 0;
  double h2d_gbps = 0, d2h_gbps = 0;                      // pinned pool through the CUDA copier
  double reference_h2d_gbps = 0, reference_d2h_gbps = 0;  // cudaHostAlloc + cudaMemcpy
  double stream_gbps = 0;                                 // NVMe -> pinned -> GPU
  double disk_gbps = 0;                                   // NVMe -> pinned, same reads
  double fetch_ms_without_prefetch = 0, fetch_ms_with_prefetch = 0;
  nlohmann::json to_json() const;
};

GpuBenchResult run_gpu_bench(const GpuBenchOptions& options, const std::function<void(const std::string&)>& progress);

}  // namespace zinf::bench

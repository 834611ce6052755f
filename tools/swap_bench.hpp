// `zinf-bench swap`: optimizer steps whose states live on NVMe, timed
// next to the two bounds a step cannot beat, both measured in the same run:
//   I/O bound     = bytes read / read GB/s + bytes written / write GB/s,
//                   from pure read and rewrite passes over the same states
//                   with the same slots;
//   compute bound = the optimizer alone over the same elements in memory.
// Also the peak RSS against the pinned budget, and the parameter fetch
// latency with and without prefetch.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cpu_adam/cpu_adam.hpp"

namespace zinf::bench {

struct SwapBenchOptions {
  std::vector<std::filesystem::path> directories;
  std::uint64_t params = 0;              // elements of fp32 master params
  std::uint64_t sub_group = 50000000;    // elements per sub-group
  int steps = 3;
  std::size_t threads = 0;               // optimizer threads; 0: all cores
  std::uint64_t block_size = 1 << 20;    // aio.block_size
  std::uint32_t queue_depth = 32;
  std::uint32_t intra_op = 2;
  std::uint64_t fetch_shard_bytes = 64ull << 20;  // param fetch part
  int fetch_layers = 16;
  bool keep_files = false;
  bool sync = true;  // commits flush to the disk (SwapStoreOptions::sync)
  // Moment formats stepped one after another in this run, each against its
  // own bounds (the same measured GB/s); the first fills the top-level
  // fields of the result.
  std::vector<cpu_adam::MomentFormat> formats = {cpu_adam::MomentFormat::fp32};
};

// The optimizer steps of one state format.
struct SwapFormatRun {
  cpu_adam::MomentFormat format = cpu_adam::MomentFormat::fp32;
  std::uint64_t state_bytes = 0;        // param + moments on NVMe
  double compute_seconds = 0;           // its kernel alone, in memory, per step
  double io_bound_seconds = 0;          // its bytes at this run's GB/s
  std::uint64_t step_read_bytes = 0, step_moved_bytes = 0;  // per step (read + written)
  std::vector<double> step_seconds, step_read_wait, step_write_wait, step_compute;
  double step_median = 0;
  std::vector<std::uint64_t> step_written_bytes;
  std::vector<std::pair<std::string, std::uint64_t>> written_per_device;  // the last step
  double bound() const { return std::max(io_bound_seconds, compute_seconds); }
  double ratio() const { return bound() > 0 ? step_median / bound() : 0; }
  nlohmann::json to_json() const;
};

struct SwapBenchResult {
  std::uint64_t params = 0;
  std::uint64_t sub_groups = 0;
  std::uint64_t state_bytes = 0;        // on NVMe
  std::uint64_t pinned_bytes = 0;
  double first_write_gbps = 0;          // laying out new blocks
  double write_gbps = 0;
  double read_gbps = 0;
  double compute_seconds = 0;           // optimizer alone, per step
  std::vector<double> step_seconds;     // each timed step
  std::vector<double> step_read_wait, step_write_wait, step_compute;
  double step_median = 0;
  double io_bound_seconds = 0;
  std::uint64_t peak_rss_bytes = 0;
  std::uint64_t ram_bytes = 0;
  double fetch_ms_without_prefetch = 0;  // mean wait per layer
  double fetch_ms_with_prefetch = 0;
  double fetch_hidden_fraction = 0;
  // Write accounting: bytes each timed step asked the drives to write, in
  // total and per block device (the directories grouped by device), and
  // the store's running total.
  std::vector<std::uint64_t> step_written_bytes;
  std::vector<std::pair<std::string, std::uint64_t>> written_per_device;  // the last step
  std::uint64_t store_written_total = 0;
  std::vector<SwapFormatRun> formats;  // every format stepped, in order
  // Steps a drive rated `tbw_terabytes` TBW lasts at the last step's
  // writes (the most-written device decides); 0 without a step.
  double steps_until_tbw(double tbw_terabytes) const;
  double bound() const { return std::max(io_bound_seconds, compute_seconds); }
  double ratio() const { return bound() > 0 ? step_median / bound() : 0; }
  nlohmann::json to_json() const;
};

// `progress` gets one line per phase; `interrupted` is polled between
// sub-groups (throws Error{cancelled} when it returns true). Files are
// removed at the end unless keep_files.
SwapBenchResult run_swap_bench(const SwapBenchOptions& options,
                               const std::function<void(const std::string&)>& progress,
                               const std::function<bool()>& interrupted);

}  // namespace zinf::bench

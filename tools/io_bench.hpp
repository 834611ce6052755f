// The measurement behind `zinf-bench io`: sequential write-then-read passes
// over files striped across one or more directories, through the same
// engines and pinned pool the swappers use, timing wall clock and process
// CPU for each aio setting, and picking the setting to recommend.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "aio/engine.hpp"
#include "aio/file.hpp"

namespace zinf::bench {

// A run-owned directory (mkdtemp, 0700) inside each user directory, removed
// with everything in it when the run ends, on error and on Ctrl-C too.
class ScratchSpace {
 public:
  // Checks each directory (exists, is a directory, writable, O_DIRECT, room
  // for its share of `bytes`) and throws a one-line Error otherwise.
  ScratchSpace(const std::vector<std::filesystem::path>& directories, std::uint64_t bytes);
  ~ScratchSpace();
  ScratchSpace(const ScratchSpace&) = delete;
  ScratchSpace& operator=(const ScratchSpace&) = delete;

  const std::vector<std::filesystem::path>& run_directories() const { return run_directories_; }
  // Filesystem type and O_DIRECT alignment of the first directory, for headers.
  const std::string& filesystem() const { return filesystem_; }
  std::uint32_t alignment() const { return alignment_; }

 private:
  std::vector<std::filesystem::path> run_directories_;
  std::string filesystem_;
  std::uint32_t alignment_ = 0;
};

struct IoSetting {
  aio::AioOptions aio;
  aio::EngineKind engine = aio::EngineKind::automatic;
  std::string label() const;  // "16 MiB x 64 x 1, batch, overlap"
};

struct PassResult {
  aio::Op op = aio::Op::write;
  std::string engine;         // what actually ran ("io_uring", "posix")
  IoSetting setting;
  std::uint64_t bytes = 0;
  double seconds = 0;         // median over repeats
  double cpu_seconds = 0;     // median over repeats, user + system, whole process
  std::vector<double> repeat_gb_per_s;
  double gb_per_s() const { return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0; }
  double cpu_seconds_per_gb() const { return bytes > 0 ? cpu_seconds / (static_cast<double>(bytes) / 1e9) : 0; }
  // (max - min) / median of the repeats' GB/s: 0.2 means the passes of this
  // setting differed by 20 %. 0 with one repeat.
  double spread() const;
  nlohmann::json to_json() const;
};

struct Progress {
  // Called after each chunk with (what, done bytes, total bytes, current GB/s).
  std::function<void(const std::string&, std::uint64_t, std::uint64_t, double)> update;
  // Checked between chunks; when set the run stops with Error{cancelled}.
  const std::atomic<bool>* interrupted = nullptr;
};

class IoBench {
 public:
  // `bytes` is the logical size of the striped data set.
  // huge_pages: back the buffers with 2 MiB pages where the kernel offers
  // them (the default, as the pinned pool does); off shows what 4 KiB pages
  // cost, which is how most other tools (fio, DeepSpeed) allocate.
  IoBench(const ScratchSpace& scratch, std::uint64_t bytes, std::uint64_t pool_bytes,
          Progress progress, bool huge_pages = true);
  ~IoBench();

  // Writes the whole data set once so later passes overwrite allocated
  // blocks, as swap files are in steady state. Returns that pass.
  PassResult lay_out();
  // write then read, `repeats` times each, medians reported.
  std::pair<PassResult, PassResult> measure(const IoSetting& setting, int repeats);

 private:
  struct Sample {
    double seconds;
    double cpu_seconds;
    std::string engine;
  };
  Sample run_pass(aio::Op op, const IoSetting& setting, const std::string& label);

  const ScratchSpace& scratch_;
  std::uint64_t bytes_;
  Progress progress_;
  struct Pool;
  std::unique_ptr<Pool> pool_;
};

// The setting with the least write + read time (ZeRO-Infinity moves each
// byte both ways). `results` holds (write, read) pairs.
const std::pair<PassResult, PassResult>& fastest(
    const std::vector<std::pair<PassResult, PassResult>>& results);

// The setting to recommend: among those within `tolerance` (0.05 = 5 %) of
// the fastest write + read time, the one with the fewest bytes in flight
// (then fewest threads): pinned memory and cores are what offload runs
// short of, and differences that small are noise on a shared disk.
const std::pair<PassResult, PassResult>& best_of(
    const std::vector<std::pair<PassResult, PassResult>>& results, double tolerance = 0.05);

// How much this disk's passes of one setting vary: the median over the
// settings of their larger (write, read) spread. A difference between
// settings smaller than this is noise, not a result.
double noise_of(const std::vector<std::pair<PassResult, PassResult>>& results);

std::uint64_t in_flight_bytes(const IoSetting& setting);

// DeepSpeed's "aio" block for a setting.
nlohmann::ordered_json aio_block(const IoSetting& setting);

}  // namespace zinf::bench

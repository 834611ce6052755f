#include "tools/io_bench.hpp"

#include <sys/resource.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <tuple>

#include <fmt/format.h>

#include "aio/volume.hpp"
#include "core/error.hpp"
#include "core/units.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "tools/median.hpp"

namespace zinf::bench {
namespace {

constexpr std::uint64_t kFreeSpaceMargin = 64 * MiB;
constexpr const char* kDataFile = "data.bin";

[[noreturn]] void fail_directory(ErrorKind kind, const std::filesystem::path& dir,
                                 const std::string& message, int error_number = 0) {
  ErrorContext ctx;
  ctx.path = dir.string();
  ctx.error_number = error_number;
  throw Error(kind, message, std::move(ctx));
}

double process_cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

}  // namespace

ScratchSpace::ScratchSpace(const std::vector<std::filesystem::path>& directories,
                           std::uint64_t bytes) {
  ZINF_CHECK(!directories.empty(), "no directory to measure");
  const std::uint64_t share = align_up((bytes + directories.size() - 1) / directories.size(), MiB);
  try {
    for (const auto& dir : directories) {
      std::error_code ec;
      const auto status = std::filesystem::status(dir, ec);
      if (!std::filesystem::exists(status)) {
        fail_directory(ErrorKind::io, dir, fmt::format("{} does not exist", dir.string()), ENOENT);
      }
      if (!std::filesystem::is_directory(status)) {
        fail_directory(ErrorKind::io, dir, fmt::format("{} is not a directory", dir.string()),
                       ENOTDIR);
      }
      std::string pattern = (dir / "zinf-bench.XXXXXX").string();
      if (::mkdtemp(pattern.data()) == nullptr) {
        const int error = errno;
        fail_directory(ErrorKind::io, dir,
                       fmt::format("cannot create files in {}: {} ({})", dir.string(),
                                   std::strerror(error), errno_name(error)),
                       error);
      }
      run_directories_.emplace_back(pattern);

      // O_DIRECT: the page cache must not be what we measure.
      const auto probe_path = run_directories_.back() / "probe";
      {
        aio::File probe = aio::File::open(probe_path, aio::OpenMode::create,
                                          aio::DirectMode::require);
        if (filesystem_.empty()) {
          filesystem_ = probe.filesystem();
          alignment_ = probe.offset_alignment();
        }
      }
      std::filesystem::remove(probe_path, ec);

      struct statvfs fs {};
      if (::statvfs(dir.c_str(), &fs) == 0) {
        const std::uint64_t free_bytes = static_cast<std::uint64_t>(fs.f_bavail) * fs.f_frsize;
        if (free_bytes < share + kFreeSpaceMargin) {
          fail_directory(ErrorKind::no_space, dir,
                         fmt::format("{} has {} free; this run needs {} there (pass a smaller "
                                     "--size or free some space)",
                                     dir.string(), format_bytes(free_bytes),
                                     format_bytes(share + kFreeSpaceMargin)),
                         ENOSPC);
        }
      }
    }
  } catch (...) {
    for (const auto& made : run_directories_) {
      std::error_code ec;
      std::filesystem::remove_all(made, ec);
    }
    throw;
  }
}

ScratchSpace::~ScratchSpace() {
  for (const auto& dir : run_directories_) {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
}

std::string IoSetting::label() const {
  return fmt::format("{} x {} x {}, {}, {}", format_bytes(aio.block_size), aio.queue_depth,
                     aio.intra_op_parallelism, aio.single_submit ? "single" : "batch",
                     aio.overlap_events ? "overlap" : "no-overlap");
}

nlohmann::json PassResult::to_json() const {
  return {
      {"op", aio::to_string(op)},
      {"engine", engine},
      {"block_size", setting.aio.block_size},
      {"queue_depth", setting.aio.queue_depth},
      {"intra_op_parallelism", setting.aio.intra_op_parallelism},
      {"single_submit", setting.aio.single_submit},
      {"overlap_events", setting.aio.overlap_events},
      {"bytes", bytes},
      {"seconds", seconds},
      {"gb_per_s", gb_per_s()},
      {"cpu_seconds", cpu_seconds},
      {"cpu_seconds_per_gb", cpu_seconds_per_gb()},
      {"repeat_gb_per_s", repeat_gb_per_s},
      {"spread", spread()},
  };
}

struct IoBench::Pool {
  Pool(std::uint64_t bytes, bool huge_pages)
      : pool(options(bytes, huge_pages)), lease(pool.acquire(bytes)) {}
  static PinnedPoolOptions options(std::uint64_t bytes, bool huge_pages) {
    PinnedPoolOptions o;
    o.budget_bytes = bytes;
    o.huge_pages = huge_pages;
    o.allow_unpinned = true;  // a low memlock limit should not stop a measurement
    return o;
  }
  PinnedPool pool;
  PinnedBuffer lease;
};

IoBench::IoBench(const ScratchSpace& scratch, std::uint64_t bytes, std::uint64_t pool_bytes,
                 Progress progress, bool huge_pages)
    : scratch_(scratch),
      bytes_(bytes),
      progress_(std::move(progress)),
      pool_(std::make_unique<Pool>(pool_bytes, huge_pages)) {
  // Random-looking contents: no device or filesystem can compress them away.
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  auto* words = reinterpret_cast<std::uint64_t*>(pool_->lease.data());
  for (std::uint64_t i = 0; i < pool_->lease.size() / 8; ++i) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    words[i] = state;
  }
}

IoBench::~IoBench() = default;

IoBench::Sample IoBench::run_pass(aio::Op op, const IoSetting& setting, const std::string& label) {
  aio::VolumeOptions volume_options;
  volume_options.directories = scratch_.run_directories();
  volume_options.file_name = kDataFile;
  volume_options.direct = aio::DirectMode::require;
  aio::Volume volume(volume_options, [&](std::size_t) {
    return aio::make_engine(setting.engine, setting.aio);
  });
  const aio::MemoryRegion region = pool_->pool.region();
  volume.register_buffers(std::span(&region, 1));

  // Chunks as large as the pool: every chunk reuses the same buffer, which
  // is harmless for a measurement and keeps memory bounded. A window of
  // chunks stays queued, enough to keep every ring full, so Ctrl-C only
  // waits for that window.
  const std::uint64_t chunk = std::min<std::uint64_t>(pool_->lease.size(), bytes_);
  const std::uint64_t in_flight_bytes = setting.aio.block_size * setting.aio.queue_depth *
                                        setting.aio.intra_op_parallelism *
                                        scratch_.run_directories().size();
  const std::size_t window = static_cast<std::size_t>(std::max<std::uint64_t>(
      2, (in_flight_bytes + chunk - 1) / chunk + 1));
  std::deque<aio::VolumeTicket> tickets;
  const auto start = std::chrono::steady_clock::now();
  const double cpu_start = process_cpu_seconds();
  std::uint64_t submitted = 0;
  std::uint64_t done = 0;
  bool cancelled = false;
  while (done < bytes_) {
    while (!cancelled && submitted < bytes_ && tickets.size() < window) {
      const std::uint64_t length = std::min(chunk, bytes_ - submitted);
      tickets.push_back(volume.submit(op, submitted, pool_->lease.data(), length));
      submitted += length;
    }
    if (tickets.empty()) break;
    done += volume.wait(tickets.front());
    tickets.pop_front();
    if (progress_.update) {
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      progress_.update(label, done, bytes_, elapsed > 0 ? static_cast<double>(done) / elapsed / 1e9 : 0);
    }
    if (progress_.interrupted != nullptr && progress_.interrupted->load()) cancelled = true;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double cpu_seconds = process_cpu_seconds() - cpu_start;
  std::string engine(volume.engine(0).name());
  volume.unregister_buffers();
  if (cancelled) throw Error(ErrorKind::cancelled, "interrupted");
  return Sample{seconds, cpu_seconds, engine};
}

PassResult IoBench::lay_out() {
  IoSetting setting;
  setting.aio.block_size = 16 * MiB;
  setting.aio.queue_depth = 32;
  for (const auto& dir : scratch_.run_directories()) {
    aio::File file = aio::File::open(dir / kDataFile, aio::OpenMode::create,
                                     aio::DirectMode::require);
    file.preallocate(align_up((bytes_ + scratch_.run_directories().size() - 1) /
                                  scratch_.run_directories().size(),
                              16 * MiB));
  }
  const Sample sample = run_pass(aio::Op::write, setting, "lay out files");
  PassResult result;
  result.op = aio::Op::write;
  result.engine = sample.engine;
  result.setting = setting;
  result.bytes = bytes_;
  result.seconds = sample.seconds;
  result.cpu_seconds = sample.cpu_seconds;
  result.repeat_gb_per_s = {result.gb_per_s()};
  return result;
}

std::pair<PassResult, PassResult> IoBench::measure(const IoSetting& setting, int repeats) {
  std::pair<PassResult, PassResult> results;
  std::vector<double> seconds[2];
  std::vector<double> cpu[2];
  for (int r = 0; r < repeats; ++r) {
    for (int which = 0; which < 2; ++which) {
      const aio::Op op = which == 0 ? aio::Op::write : aio::Op::read;
      PassResult& result = which == 0 ? results.first : results.second;
      const Sample sample = run_pass(op, setting, fmt::format("{:5} {}", aio::to_string(op), setting.label()));
      seconds[which].push_back(sample.seconds);
      cpu[which].push_back(sample.cpu_seconds);
      result.op = op;
      result.engine = sample.engine;
      result.setting = setting;
      result.bytes = bytes_;
      result.repeat_gb_per_s.push_back(static_cast<double>(bytes_) / sample.seconds / 1e9);
    }
  }
  results.first.seconds = median(seconds[0]);
  results.first.cpu_seconds = median(cpu[0]);
  results.second.seconds = median(seconds[1]);
  results.second.cpu_seconds = median(cpu[1]);
  return results;
}

double PassResult::spread() const {
  if (repeat_gb_per_s.size() < 2) return 0;
  const auto [low, high] = std::minmax_element(repeat_gb_per_s.begin(), repeat_gb_per_s.end());
  const double middle = median(repeat_gb_per_s);
  return middle > 0 ? (*high - *low) / middle : 0;
}

double noise_of(const std::vector<std::pair<PassResult, PassResult>>& results) {
  std::vector<double> spreads;
  for (const auto& [write, read] : results) spreads.push_back(std::max(write.spread(), read.spread()));
  return spreads.empty() ? 0 : median(spreads);
}

const std::pair<PassResult, PassResult>& fastest(
    const std::vector<std::pair<PassResult, PassResult>>& results) {
  ZINF_ASSERT(!results.empty(), "nothing measured");
  return *std::min_element(results.begin(), results.end(), [](const auto& a, const auto& b) {
    return a.first.seconds + a.second.seconds < b.first.seconds + b.second.seconds;
  });
}

std::uint64_t in_flight_bytes(const IoSetting& setting) {
  return setting.aio.block_size * setting.aio.queue_depth * setting.aio.intra_op_parallelism;
}

const std::pair<PassResult, PassResult>& best_of(
    const std::vector<std::pair<PassResult, PassResult>>& results, double tolerance) {
  const auto& top = fastest(results);
  const double limit = (top.first.seconds + top.second.seconds) * (1.0 + tolerance);
  const std::pair<PassResult, PassResult>* chosen = &top;
  for (const auto& candidate : results) {
    if (candidate.first.seconds + candidate.second.seconds > limit) continue;
    const auto key = [](const std::pair<PassResult, PassResult>& r) {
      return std::make_tuple(in_flight_bytes(r.first.setting), r.first.setting.aio.intra_op_parallelism,
                             r.first.seconds + r.second.seconds);
    };
    if (key(candidate) < key(*chosen)) chosen = &candidate;
  }
  return *chosen;
}

nlohmann::ordered_json aio_block(const IoSetting& setting) {
  nlohmann::ordered_json block;
  block["block_size"] = setting.aio.block_size;
  block["queue_depth"] = setting.aio.queue_depth;
  block["intra_op_parallelism"] = setting.aio.intra_op_parallelism;
  block["single_submit"] = setting.aio.single_submit;
  block["overlap_events"] = setting.aio.overlap_events;
  block["use_gds"] = false;
  return block;
}

}  // namespace zinf::bench

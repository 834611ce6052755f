// zinf-bench: the bandwidth profiler users run first. `zinf-bench --nvme DIR`
// (the `io` sub-command, the default) measures sequential O_DIRECT write and
// read GB/s and CPU seconds per GB through zinf's own engines, and ends with
// the DeepSpeed "aio" block to paste into a config. Later sub-commands
// (adam, swap) join it here.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <thread>
#include <optional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"
#include "tools/adam_bench.hpp"
#include "tools/io_bench.hpp"
#include "tools/swap_bench.hpp"
#include "zinf_config.h"
#if ZINF_HAVE_CUDA
#include "tools/gpu_bench.hpp"
#endif

namespace {

using zinf::Error;
using zinf::ErrorKind;
using zinf::GiB;
using zinf::MiB;
using zinf::bench::IoSetting;
using zinf::bench::PassResult;

std::atomic<bool> g_interrupted{false};

extern "C" void on_signal(int) { g_interrupted.store(true); }

// SIGPIPE too (`zinf-bench | head -1`): the run stops at the next check and
// removes its scratch files instead of dying with them on the disk.
void install_signal_handlers() {
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  for (int signal : {SIGINT, SIGTERM, SIGHUP, SIGPIPE}) sigaction(signal, &action, nullptr);
}

// {"tool", "version", "result"} to FILE, when --json was given.
void write_result_json(const std::string& path, const char* tool, const nlohmann::json& result) {
  if (path.empty()) return;
  nlohmann::ordered_json out;
  out["tool"] = tool;
  out["version"] = ZINF_VERSION;
  out["result"] = result;
  std::ofstream file(path);
  if (!file) zinf::throw_path_error("open", path, errno);
  file << out.dump(2) << "\n";
}

// --json FILE is checked before the run, not after an hour of it.
void check_json_path(const std::string& path) {
  if (path.empty()) return;
  const std::filesystem::path file(path);
  std::error_code ec;
  if (std::filesystem::is_directory(file, ec)) {
    throw Error(ErrorKind::invalid, fmt::format("--json {}: is a directory", path));
  }
  if (std::filesystem::exists(file, ec)) {
    if (::access(path.c_str(), W_OK) != 0) zinf::throw_path_error("--json: open for writing", path, errno);
    return;
  }
  const std::filesystem::path parent = file.has_parent_path() ? file.parent_path() : ".";
  if (::access(parent.c_str(), W_OK | X_OK) != 0) {
    zinf::throw_path_error("--json: create a file in", parent.string(), errno);
  }
}

struct IoArgs {
  std::vector<std::string> nvme;
  std::string engine = "auto";
  std::string size = "4G";
  std::string block_size;
  std::optional<std::uint32_t> queue_depth;
  std::optional<std::uint32_t> threads;
  bool single_submit = false;
  bool no_overlap_events = false;
  bool sqpoll = false;
  bool sweep = false;
  int repeat = 0;  // 0: 2 for a plain run, 1 for a sweep
  std::string json_path;
  std::string pool = "1G";
  bool no_progress = false;
  bool no_huge_pages = false;
};

class ProgressBar {
 public:
  explicit ProgressBar(bool enabled) : enabled_(enabled) {}
  ~ProgressBar() { clear(); }
  void update(const std::string& what, std::uint64_t done, std::uint64_t total, double gbps) {
    if (!enabled_) return;
    constexpr int kWidth = 30;
    const int filled = total == 0 ? kWidth : static_cast<int>(kWidth * done / total);
    std::fprintf(stderr, "\r\033[K  %-42s [%s%s] %3d%%  %6.2f GB/s", what.c_str(),
                 std::string(static_cast<std::size_t>(filled), '#').c_str(),
                 std::string(static_cast<std::size_t>(kWidth - filled), '.').c_str(),
                 total == 0 ? 100 : static_cast<int>(100 * done / total), gbps);
    std::fflush(stderr);
    dirty_ = true;
  }
  void clear() {
    if (enabled_ && dirty_) {
      std::fprintf(stderr, "\r\033[K");
      std::fflush(stderr);
      dirty_ = false;
    }
  }

 private:
  bool enabled_;
  bool dirty_ = false;
};

IoSetting base_setting(const IoArgs& args) {
  IoSetting s;
  s.engine = zinf::aio::parse_engine_kind(args.engine);
  s.aio.single_submit = args.single_submit;
  s.aio.overlap_events = !args.no_overlap_events;
  s.aio.use_sqpoll = args.sqpoll;
  if (!args.block_size.empty()) s.aio.block_size = zinf::parse_bytes(args.block_size);
  if (args.queue_depth) s.aio.queue_depth = *args.queue_depth;
  if (args.threads) s.aio.intra_op_parallelism = *args.threads;
  return s;
}

IoSetting with(IoSetting s, std::uint64_t block, std::uint32_t depth, std::uint32_t threads) {
  s.aio.block_size = block;
  s.aio.queue_depth = depth;
  s.aio.intra_op_parallelism = threads;
  return s;
}

void print_row(const PassResult& r) {
  const std::string spread =
      r.repeat_gb_per_s.size() > 1 ? fmt::format("{:.0f}%", 100 * r.spread()) : std::string("-");
  fmt::print("{:<6} {:<8} {:>5} {:>7}  {:<6} {:<10} {:>8.2f} {:>7} {:>10.4f}   {}\n",
             zinf::aio::to_string(r.op), zinf::format_bytes(r.setting.aio.block_size),
             r.setting.aio.queue_depth, r.setting.aio.intra_op_parallelism,
             r.setting.aio.single_submit ? "single" : "batch",
             r.setting.aio.overlap_events ? "overlap" : "no-overlap", r.gb_per_s(), spread,
             r.cpu_seconds_per_gb(), r.engine);
  std::fflush(stdout);
}

int run_io(const IoArgs& args) {
  std::vector<std::filesystem::path> dirs;
  if (args.nvme.empty()) {
    const char* env = std::getenv("ZINF_BENCH_DIR");
    dirs.emplace_back(env != nullptr ? env : "/var/tmp");
    zinf::log().info("no --nvme given: measuring {} (pass --nvme DIR for your NVMe directory)",
                     dirs.front().string());
  } else {
    for (const auto& d : args.nvme) dirs.emplace_back(d);
  }
  check_json_path(args.json_path);
  const std::uint64_t bytes = zinf::align_up(zinf::parse_bytes(args.size), 16 * MiB);
  if (bytes == 0) throw Error(ErrorKind::invalid, "--size must be positive");
  const IoSetting base = base_setting(args);
  zinf::aio::validate(base.aio);
  const bool explicit_setting = !args.block_size.empty() || args.queue_depth || args.threads;
  // Three passes per setting in a sweep: on a disk whose passes swing by
  // tens of percent one pass per setting picks noise.
  const int repeats = args.repeat > 0 ? args.repeat : (args.sweep ? 3 : 2);

  zinf::bench::ScratchSpace scratch(dirs, bytes);
  // Whole 16 MiB units: every chunk of a pass is then a valid O_DIRECT size.
  const std::uint64_t pool_bytes =
      std::min(std::max(zinf::align_down(zinf::parse_bytes(args.pool), 16 * MiB), 16 * MiB), bytes);
  ProgressBar bar(!args.no_progress && ::isatty(STDERR_FILENO) != 0);
  zinf::bench::Progress progress;
  progress.update = [&](const std::string& what, std::uint64_t done, std::uint64_t total, double gbps) {
    bar.update(what, done, total, gbps);
  };
  progress.interrupted = &g_interrupted;
  zinf::bench::IoBench bench(scratch, bytes, pool_bytes, progress, !args.no_huge_pages);

  std::string paths;
  for (const auto& d : dirs) paths += (paths.empty() ? "" : ", ") + d.string();
  fmt::print("zinf-bench io {}: {} ({}, O_DIRECT alignment {} B), {} per pass over {} path(s), "
             "median of {}; GB = 1e9 bytes\n",
             ZINF_VERSION, paths, scratch.filesystem(), scratch.alignment(),
             zinf::format_bytes(bytes), dirs.size(), repeats);

  const PassResult layout = bench.lay_out();
  bar.clear();
  fmt::print("laid out {} at {:.2f} GB/s (first write into allocated blocks)\n\n",
             zinf::format_bytes(bytes), layout.gb_per_s());
  fmt::print("{:<6} {:<8} {:>5} {:>7}  {:<6} {:<10} {:>8} {:>7} {:>10}   {}\n", "op", "block", "depth",
             "threads", "submit", "events", "GB/s", "spread", "CPU s/GB", "engine");

  std::vector<std::pair<PassResult, PassResult>> results;
  const auto run = [&](const IoSetting& setting) -> const std::pair<PassResult, PassResult>& {
    results.push_back(bench.measure(setting, repeats));
    bar.clear();
    print_row(results.back().first);
    print_row(results.back().second);
    return results.back();
  };

  if (explicit_setting && !args.sweep) {
    run(base);
  } else if (!args.sweep) {
    // A bare run: DeepSpeed's usual 1 MiB pieces and the large pieces this
    // class of disk needs to reach its best.
    for (const auto& [block, depth] : std::vector<std::pair<std::uint64_t, std::uint32_t>>{
             {1 * MiB, 32}, {4 * MiB, 32}, {16 * MiB, 32}, {16 * MiB, 64}}) {
      run(with(base, block, depth, 1));
    }
  } else {
    // Stage 1: block size x depth on one ring. Stage 2: more rings at the
    // best. Stage 3: submission and reaping modes at the best.
    for (std::uint64_t block : {256 * zinf::KiB, 1 * MiB, 4 * MiB, 16 * MiB}) {
      for (std::uint32_t depth : {8u, 32u, 64u, 128u}) run(with(base, block, depth, 1));
    }
    // Later stages start from the fastest, not the leanest, setting.
    IoSetting best = zinf::bench::fastest(results).first.setting;
    for (std::uint32_t threads : {2u, 4u}) {
      run(with(best, best.aio.block_size, best.aio.queue_depth, threads));
    }
    best = zinf::bench::fastest(results).first.setting;
    IoSetting single = best;
    single.aio.single_submit = true;
    run(single);
    IoSetting batch_waits = best;
    batch_waits.aio.overlap_events = false;
    run(batch_waits);
  }

  // Settings closer to the fastest than this disk's own pass-to-pass
  // spread are as good as it: recommend the leanest of them.
  const double noise = zinf::bench::noise_of(results);
  const double tolerance = std::max(0.05, noise);
  const auto& best = best_of(results, tolerance);
  const nlohmann::ordered_json block = zinf::bench::aio_block(best.first.setting);
  const auto& top = zinf::bench::fastest(results);
  fmt::print("\nfastest write + read: {} ({:.2f} GB/s write, {:.2f} GB/s read)\n",
             top.first.setting.label(), top.first.gb_per_s(), top.second.gb_per_s());
  if (repeats > 1) {
    fmt::print("noise: passes of one setting differ by {:.0f}% (median spread over {} settings, {} passes "
               "each); differences below {:.0f}% are not results\n",
               100 * noise, results.size(), repeats, 100 * tolerance);
  } else {
    fmt::print("noise: unknown with one pass per setting (--repeat 3 measures it)\n");
  }
  fmt::print("recommended: {} ({:.2f} GB/s write, {:.2f} GB/s read, {} in flight per path): the "
             "fewest bytes in flight within {:.0f}% of the fastest\n",
             best.first.setting.label(), best.first.gb_per_s(), best.second.gb_per_s(),
             zinf::format_bytes(zinf::bench::in_flight_bytes(best.first.setting)), 100 * tolerance);
  fmt::print("paste into your DeepSpeed config:\n\"aio\": {}\n", block.dump(2));

  if (!args.json_path.empty()) {
    nlohmann::ordered_json out;
    out["tool"] = "zinf-bench io";
    out["version"] = ZINF_VERSION;
    out["directories"] = args.nvme.empty() ? std::vector<std::string>{dirs.front().string()} : args.nvme;
    out["filesystem"] = scratch.filesystem();
    out["bytes_per_pass"] = bytes;
    out["repeats"] = repeats;
    out["layout"] = layout.to_json();
    nlohmann::json records = nlohmann::json::array();
    for (const auto& [write, read] : results) {
      records.push_back(write.to_json());
      records.push_back(read.to_json());
    }
    out["records"] = records;
    out["noise"] = noise;
    out["tolerance"] = tolerance;
    out["recommended_aio"] = block;
    std::ofstream file(args.json_path);
    if (!file) zinf::throw_path_error("open", args.json_path, errno);
    file << out.dump(2) << "\n";
  }
  return 0;
}

struct AdamArgs {
  std::vector<std::string> sizes;  // empty: the standard set
  std::vector<std::size_t> threads;  // empty: all cores
  std::vector<std::string> tiers;  // empty: every tier the CPU supports
  int repeat = 5;
  double min_seconds = 0.2;
  bool quick = false;
  bool no_progress = false;  // adam prints result rows only; accepted as the other commands take it
  std::string json_path;
};

int run_adam(const AdamArgs& args) {
  namespace ca = zinf::cpu_adam;
  using zinf::bench::AdamCase;
  check_json_path(args.json_path);
  for (const auto& text : args.sizes) {
    if (zinf::parse_count(text) == 0) throw Error(ErrorKind::invalid, fmt::format("--size {}: must be at least 1", text));
  }
  for (std::size_t t : args.threads) {
    if (t == 0) throw Error(ErrorKind::invalid, "--threads 0: must be at least 1");
  }
  if (args.repeat < 1) throw Error(ErrorKind::invalid, fmt::format("--repeat {}: must be at least 1", args.repeat));
  if (!(args.min_seconds > 0)) {
    throw Error(ErrorKind::invalid, fmt::format("--min-seconds {}: must be positive", args.min_seconds));
  }
  std::vector<std::size_t> thread_counts = args.threads;
  if (thread_counts.empty()) thread_counts.push_back(std::max(1u, std::thread::hardware_concurrency()));
  const ca::CpuFeatures features = ca::detect_cpu_features();
  std::vector<ca::Tier> tiers;
  if (args.tiers.empty()) {
    for (ca::Tier t : {ca::Tier::avx512, ca::Tier::avx2, ca::Tier::scalar}) {
      if (ca::tier_supported(t, features)) tiers.push_back(t);
    }
  } else {
    for (const auto& name : args.tiers) tiers.push_back(ca::parse_tier(name));
  }
  std::vector<std::uint64_t> sizes;
  for (const auto& text : args.sizes) sizes.push_back(zinf::parse_count(text));
  if (sizes.empty()) {
    sizes = args.quick ? std::vector<std::uint64_t>{1000000, 10000000}
                       : std::vector<std::uint64_t>{1000000, 10000000, 100000000, 400000000};
  }
  // Dtype pairs, other tiers and the multi-tensor case run at one size:
  // 100M elements (10M with --quick), or the largest --size if smaller.
  const std::uint64_t pair_size = std::min<std::uint64_t>(
      args.quick ? 10000000 : 100000000, *std::max_element(sizes.begin(), sizes.end()));
  const ca::Tier best = tiers.front();

  std::vector<AdamCase> cases;
  // fp32 Adam and AdamW at every size on the best tier.
  for (std::uint64_t n : sizes) {
    for (const char* opt : {"adam", "adamw"}) {
      AdamCase c;
      c.optimizer = opt;
      c.tier = best;
      c.elements = n;
      cases.push_back(c);
    }
  }
  // Many small tensors in one call.
  {
    AdamCase c;
    c.tier = best;
    c.elements = std::min<std::uint64_t>(100000, pair_size);
    c.tensors = std::max<std::uint64_t>(1, pair_size / c.elements);
    cases.push_back(c);
  }
  // Every tier on one size.
  for (ca::Tier t : tiers) {
    if (t == best) continue;
    AdamCase c;
    c.tier = t;
    c.elements = pair_size;
    cases.push_back(c);
  }
  // Dtype pairs on the best tier.
  const auto pair = [&](ca::DType p, ca::DType g, ca::DType s, std::optional<ca::DType> copy) {
    AdamCase c;
    c.tier = best;
    c.param = p;
    c.grad = g;
    c.state = s;
    c.copy = copy;
    c.elements = pair_size;
    cases.push_back(c);
  };
  pair(ca::DType::f32, ca::DType::bf16, ca::DType::f32, ca::DType::bf16);
  pair(ca::DType::f32, ca::DType::f16, ca::DType::f32, ca::DType::f16);
  pair(ca::DType::f32, ca::DType::bf16, ca::DType::f32, std::nullopt);
  pair(ca::DType::bf16, ca::DType::bf16, ca::DType::bf16, std::nullopt);
  pair(ca::DType::f16, ca::DType::f16, ca::DType::f16, std::nullopt);
  pair(ca::DType::bf16, ca::DType::bf16, ca::DType::f32, std::nullopt);
  pair(ca::DType::f16, ca::DType::f16, ca::DType::f32, std::nullopt);
  for (const char* opt : {"adagrad", "lion"}) {
    AdamCase c;
    c.optimizer = opt;
    c.tier = best;
    c.elements = pair_size;
    cases.push_back(c);
  }

  fmt::print("zinf-bench adam {}: CPU: {}, median of {}\n", ZINF_VERSION, features.describe(),
             args.repeat);
  fmt::print("limit = the same loads and stores with trivial arithmetic, measured alternately in this run\n\n");
  fmt::print("{:<44} {:<7} {:>7} {:>12} {:>10} {:>10} {:>9} {:>7}\n", "case", "tier", "threads",
             "elements", "G param/s", "limit G/s", "fraction", "GB/s");
  std::vector<zinf::bench::AdamResult> results;
  std::map<std::pair<ca::Tier, std::size_t>, std::unique_ptr<ca::CpuOptimizer>> optimizers;
  for (std::size_t threads : thread_counts) {
  for (const AdamCase& c : cases) {
    if (g_interrupted.load()) throw Error(ErrorKind::cancelled, "interrupted");
    auto& optimizer = optimizers[{c.tier, threads}];
    if (!optimizer) optimizer = std::make_unique<ca::CpuOptimizer>(threads, c.tier);
    zinf::bench::AdamResult r = zinf::bench::run_adam_case(c, *optimizer, args.repeat, args.min_seconds);
    if (c.optimizer == "adagrad" || c.optimizer == "lion") {
      // The limit kernel moves Adam's bytes; scale it to this optimizer's.
      AdamCase adam_like = c;
      adam_like.optimizer = "adam";
      r.limit_params_per_s *= static_cast<double>(adam_like.bytes_per_param()) /
                              static_cast<double>(c.bytes_per_param());
    }
    fmt::print("{:<44} {:<7} {:>7} {:>12} {:>10.3f} {:>10.3f} {:>9.2f} {:>7.1f}\n", c.label(),
               ca::to_string(c.tier), threads, c.elements * c.tensors, r.params_per_s / 1e9,
               r.limit_params_per_s / 1e9, r.fraction(), r.gb_per_s());
    std::fflush(stdout);
    results.push_back(r);
  }
  }
  if (!args.json_path.empty()) {
    nlohmann::ordered_json out;
    out["tool"] = "zinf-bench adam";
    out["version"] = ZINF_VERSION;
    out["threads"] = thread_counts;
    out["cpu"] = features.describe();
    out["repeats"] = args.repeat;
    nlohmann::json records = nlohmann::json::array();
    for (const auto& r : results) records.push_back(r.to_json());
    out["records"] = records;
    std::ofstream file(args.json_path);
    if (!file) zinf::throw_path_error("open", args.json_path, errno);
    file << out.dump(2) << "\n";
  }
  return 0;
}

struct SwapArgs {
  std::vector<std::string> nvme;
  std::string params = "1G";
  std::string sub_group = "50M";
  int steps = 3;
  std::size_t threads = 0;
  std::string block_size = "1M";
  std::uint32_t queue_depth = 32;
  std::uint32_t intra_op = 2;
  std::string fetch_shard = "64M";
  int fetch_layers = 16;
  bool no_sync = false;
  bool no_progress = false;
  std::string json_path;
  double tbw = 0;  // the drive's rated endurance, terabytes written
  std::vector<std::string> state_formats = {"fp32"};
};

int run_swap(const SwapArgs& args) {
  check_json_path(args.json_path);
  zinf::bench::SwapBenchOptions options;
  if (args.nvme.empty()) {
    const char* env = std::getenv("ZINF_BENCH_DIR");
    options.directories.emplace_back(env != nullptr ? env : "/var/tmp");
  } else {
    for (const auto& d : args.nvme) options.directories.emplace_back(d);
  }
  options.params = zinf::parse_count(args.params);
  options.sub_group = zinf::parse_count(args.sub_group);
  // Fewer bytes than this time nothing but latency: the GB/s would be noise.
  constexpr std::uint64_t kMinParams = 1000000;
  if (options.params < kMinParams) {
    throw Error(ErrorKind::invalid, fmt::format("--params {}: at least 1M params are needed to measure the disk "
                                                "(their states are 12 bytes each)", args.params));
  }
  if (options.sub_group == 0) throw Error(ErrorKind::invalid, "--sub-group 0: must be at least 1");
  options.steps = args.steps;
  options.threads = args.threads;
  options.block_size = zinf::parse_bytes(args.block_size);
  options.queue_depth = args.queue_depth;
  options.intra_op = args.intra_op;
  options.fetch_shard_bytes = zinf::parse_bytes(args.fetch_shard);
  options.fetch_layers = args.fetch_layers;
  options.sync = !args.no_sync;
  options.formats.clear();
  for (const auto& text : args.state_formats) {
    try {
      options.formats.push_back(zinf::cpu_adam::parse_moment_format(text));
    } catch (const Error&) {
      throw Error(ErrorKind::invalid, fmt::format("--state-format {}: expected fp32, bf16 or int8", text));
    }
  }
  const bool progress = !args.no_progress;
  const auto r = zinf::bench::run_swap_bench(
      options,
      [progress](const std::string& line) {
        if (progress) std::fprintf(stderr, "  %s\n", line.c_str());
      },
      [] { return g_interrupted.load(); });
  const auto gb = [](std::uint64_t bytes) { return static_cast<double>(bytes) / 1e9; };
  fmt::print("optimizer states on NVMe: {} params, {:.1f} GB ({:.2f} x this machine's RAM), {} sub-groups\n",
             r.params, gb(r.state_bytes), static_cast<double>(r.state_bytes) / static_cast<double>(r.ram_bytes),
             r.sub_groups);
  fmt::print("commits {}\n", args.no_sync ? "without flushes (--no-sync)" : "flushed to the disk (fdatasync + fsync)");
  fmt::print("disk, this run: first write {:.2f} GB/s, rewrite {:.2f} GB/s, read {:.2f} GB/s\n",
             r.first_write_gbps, r.write_gbps, r.read_gbps);
  for (std::size_t i = 0; i < r.step_seconds.size(); ++i) {
    fmt::print("step {}: {:.2f} s (compute {:.2f} s, blocked on reads {:.2f} s, on writes+commits {:.2f} s)\n",
               i + 1, r.step_seconds[i], r.step_compute[i], r.step_read_wait[i], r.step_write_wait[i]);
  }
  fmt::print("step time (median) {:.2f} s; I/O bound {:.2f} s; compute bound {:.2f} s; "
             "step / max(bounds) = {:.2f} (target <= 1.10)\n",
             r.step_median, r.io_bound_seconds, r.compute_seconds, r.ratio());
  if (!r.step_written_bytes.empty()) {
    std::string devices;
    for (const auto& [device, bytes] : r.written_per_device) {
      devices += fmt::format("{}{} {:.2f} GB", devices.empty() ? "" : ", ", device, gb(bytes));
    }
    fmt::print("NVMe written per step: {:.2f} GB ({}); this store's total over every run {:.2f} GB\n",
               gb(r.step_written_bytes.back()), devices, gb(r.store_written_total));
    if (args.tbw > 0) {
      const double steps = r.steps_until_tbw(args.tbw);
      fmt::print("a drive rated {:g} TBW lasts {:.3g} such steps: {:.1f} days of back-to-back steps at {:.2f} s "
                 "(the most-written device decides)\n",
                 args.tbw, steps, steps * r.step_median / 86400.0, r.step_median);
    }
  }
  if (r.formats.size() > 1) {
    // Each format against its own bounds; "x fp32" compares with the first.
    const auto& base = r.formats.front();
    fmt::print("state formats, same run (bounds from this run's GB/s):\n");
    fmt::print("  {:<6} {:>10} {:>14} {:>10} {:>10} {:>11} {:>10} {:>11}\n", "format", "states", "moved/step",
               "step", "I/O bound", "step/bound", "bytes x", "step x");
    for (const auto& run : r.formats) {
      fmt::print("  {:<6} {:>7.2f} GB {:>11.2f} GB {:>8.2f} s {:>8.2f} s {:>11.2f} {:>10.2f} {:>11.2f}\n",
                 zinf::cpu_adam::to_string(run.format), gb(run.state_bytes), gb(run.step_moved_bytes),
                 run.step_median, run.io_bound_seconds, run.ratio(),
                 static_cast<double>(run.step_moved_bytes) / static_cast<double>(base.step_moved_bytes),
                 base.step_median > 0 ? run.step_median / base.step_median : 0.0);
    }
    for (const auto& run : r.formats) {
      for (std::size_t i = 0; i < run.step_seconds.size(); ++i) {
        fmt::print("  {} step {}: {:.2f} s (compute {:.2f} s, blocked on reads {:.2f} s, on writes+commits {:.2f} s)\n",
                   zinf::cpu_adam::to_string(run.format), i + 1, run.step_seconds[i], run.step_compute[i],
                   run.step_read_wait[i], run.step_write_wait[i]);
      }
    }
  }
  fmt::print("peak RSS {} = pinned {} + {} (target: pinned + at most 512 MiB)\n",
             zinf::format_bytes(r.peak_rss_bytes), zinf::format_bytes(r.pinned_bytes),
             r.peak_rss_bytes > r.pinned_bytes ? zinf::format_bytes(r.peak_rss_bytes - r.pinned_bytes) : "0 B");
  fmt::print("param fetch wait per layer: {:.2f} ms without prefetch, {:.2f} ms with; {:.0f}% hidden (the "
             "trainer's compute is a sleep of 1.2 x the fetch time, so prefetch can hide all of it)\n",
             r.fetch_ms_without_prefetch, r.fetch_ms_with_prefetch, 100 * r.fetch_hidden_fraction);
  write_result_json(args.json_path, "zinf-bench swap", r.to_json());
  return 0;
}

struct GpuArgs {
  std::string nvme;
  std::string size = "1G";
  std::string shard = "64M";
  int repeat = 3;
  int device = 0;
  std::string json_path;
};

int run_gpu(const GpuArgs& args) {
#if ZINF_HAVE_CUDA
  check_json_path(args.json_path);
  zinf::bench::GpuBenchOptions options;
  const char* env = std::getenv("ZINF_BENCH_DIR");
  options.directory = !args.nvme.empty() ? args.nvme : (env != nullptr ? env : "/var/tmp");
  options.bytes = zinf::parse_bytes(args.size);
  options.shard_bytes = zinf::parse_bytes(args.shard);
  options.repeats = args.repeat;
  options.device_index = args.device;
  const auto r = zinf::bench::run_gpu_bench(
      options, [](const std::string& line) { std::fprintf(stderr, "  %s\n", line.c_str()); });
  fmt::print("zinf-bench gpu {}: {} ({} per pass, median of {}), GB = 1e9 bytes\n", ZINF_VERSION, r.device,
             zinf::format_bytes(r.bytes), args.repeat);
  fmt::print("H2D  pinned pool via zinf {:7.2f} GB/s   cudaHostAlloc + cudaMemcpy {:7.2f} GB/s   ratio {:.2f}\n",
             r.h2d_gbps, r.reference_h2d_gbps, r.reference_h2d_gbps > 0 ? r.h2d_gbps / r.reference_h2d_gbps : 0);
  fmt::print("D2H  pinned pool via zinf {:7.2f} GB/s   cudaHostAlloc + cudaMemcpy {:7.2f} GB/s   ratio {:.2f}\n",
             r.d2h_gbps, r.reference_d2h_gbps, r.reference_d2h_gbps > 0 ? r.d2h_gbps / r.reference_d2h_gbps : 0);
  fmt::print("NVMe -> pinned -> GPU {:7.2f} GB/s   NVMe -> pinned alone {:7.2f} GB/s   ratio {:.2f}\n", r.stream_gbps,
             r.disk_gbps, r.disk_gbps > 0 ? r.stream_gbps / r.disk_gbps : 0);
  fmt::print("fetch wait per layer: {:.2f} ms without prefetch, {:.2f} ms with; {:.0f}% hidden (compute "
             "simulated by a sleep of 1.2 x the fetch time)\n",
             r.fetch_ms_without_prefetch, r.fetch_ms_with_prefetch,
             r.fetch_ms_without_prefetch > 0 ? 100 * (1 - r.fetch_ms_with_prefetch / r.fetch_ms_without_prefetch) : 0);
  write_result_json(args.json_path, "zinf-bench gpu", r.to_json());
  return 0;
#else
  (void)args;
  throw Error(ErrorKind::unsupported, "zinf-bench gpu: this build has no CUDA (configure where CUDA is installed)");
#endif
}

}  // namespace

int main(int argc, char** argv) {
  // Rows appear as they are measured, also through a pipe (`| tee`), and a
  // closed pipe is noticed at the next row, not at exit.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  CLI::App app{"zinf-bench: profile NVMe bandwidth for ZeRO-Infinity offload and recommend "
               "DeepSpeed's \"aio\" settings"};
  app.set_version_flag("--version", std::string(ZINF_VERSION));
  IoArgs io;
  // The io options live on the app so `zinf-bench --nvme DIR` works without
  // naming the sub-command; `io` falls through to them.
  app.add_option("--nvme", io.nvme, "directories to measure, one per NVMe drive (striped); "
                                    "default $ZINF_BENCH_DIR or /var/tmp");
  app.add_option("--engine", io.engine, "auto (io_uring, posix fallback), uring or posix")
      ->check(CLI::IsMember({"auto", "uring", "posix"}));
  app.add_option("--size", io.size, "bytes per pass over all paths, e.g. 4G (default 4G)");
  app.add_option("--block-size", io.block_size, "bytes per I/O piece, e.g. 1M (aio.block_size)");
  app.add_option("--queue-depth", io.queue_depth, "pieces in flight per ring (aio.queue_depth)");
  app.add_option("--threads", io.threads, "rings/threads (aio.intra_op_parallelism)");
  app.add_flag("--single-submit", io.single_submit, "submit pieces one by one (aio.single_submit)");
  app.add_flag("--no-overlap-events", io.no_overlap_events,
               "wait for whole batches (aio.overlap_events: false)");
  app.add_flag("--sqpoll", io.sqpoll, "io_uring SQPOLL (takes a core)");
  app.add_flag("--sweep", io.sweep, "try block size x depth x threads x submit modes");
  app.add_option("--repeat", io.repeat, "passes per setting, median reported (default 2; sweep 1)");
  app.add_option("--json", io.json_path, "write one record per measured setting to FILE");
  app.add_option("--pool", io.pool, "pinned buffer size (default 1G, at most --size)");
  app.add_flag("--no-progress", io.no_progress, "no progress bar");
  app.add_flag("--no-huge-pages", io.no_huge_pages,
               "buffers in 4 KiB pages instead of 2 MiB huge pages (to compare)");
  CLI::App* io_command = app.add_subcommand("io", "sequential write/read bandwidth (default)");
  io_command->fallthrough();

  AdamArgs adam;
  CLI::App* adam_command = app.add_subcommand(
      "adam", "CPU optimizer params/s per tier, dtype pair and size, against the memory-bound limit");
  adam_command->add_option("--size", adam.sizes, "elements per tensor, e.g. 1M 100M (default 1M 10M 100M 400M)");
  adam_command->add_option("--threads", adam.threads,
                           "optimizer thread counts, e.g. 1 2 (default: all cores)");
  adam_command->add_option("--tier", adam.tiers, "scalar, avx2, avx512 (default: every supported tier)");
  adam_command->add_option("--repeat", adam.repeat, "timings per case, median reported (default 5)");
  adam_command->add_option("--min-seconds", adam.min_seconds, "length of one timing (default 0.2)");
  adam_command->add_flag("--quick", adam.quick, "small sizes only (about 10 s)");
  adam_command->add_option("--json", adam.json_path, "write one record per case to FILE");
  adam_command->add_flag("--no-progress", adam.no_progress, "accepted as for io and swap (adam shows no progress)");
  SwapArgs swap;
  CLI::App* swap_command = app.add_subcommand(
      "swap", "optimizer steps with states on NVMe against the I/O and compute bounds; param fetch latency");
  swap_command->add_option("--nvme", swap.nvme, "swap directories (default $ZINF_BENCH_DIR or /var/tmp)");
  swap_command->add_option("--params", swap.params, "fp32 params whose states go to NVMe, e.g. 1G, 4B (default 1G)");
  swap_command->add_option("--sub-group", swap.sub_group, "elements per sub-group (default 50M)");
  swap_command->add_option("--steps", swap.steps, "optimizer steps timed (default 3)")->check(CLI::PositiveNumber);
  swap_command->add_option("--threads", swap.threads, "optimizer threads (default: all cores)");
  swap_command->add_option("--block-size", swap.block_size, "aio.block_size (default 1M)");
  swap_command->add_option("--queue-depth", swap.queue_depth, "aio.queue_depth (default 32)");
  swap_command->add_option("--io-threads", swap.intra_op, "aio.intra_op_parallelism (default 2)");
  swap_command->add_option("--fetch-shard", swap.fetch_shard, "bytes per param shard in the fetch test (default 64M)");
  swap_command->add_option("--fetch-layers", swap.fetch_layers, "layers in the fetch test (default 16)");
  swap_command->add_flag("--no-sync", swap.no_sync,
                         "commits skip fdatasync/fsync (safe against a killed process, not power loss)");
  swap_command->add_option("--json", swap.json_path, "write the result to FILE");
  swap_command->add_option("--tbw", swap.tbw, "the drive's rated endurance in TB written: prints how long it lasts")
      ->check(CLI::PositiveNumber);
  swap_command->add_flag("--no-progress", swap.no_progress, "no progress lines on stderr");
  swap_command->add_option("--state-format", swap.state_formats,
                           "moment formats to step, one after another in this run: fp32, bf16, int8 "
                           "(e.g. --state-format fp32,bf16,int8; default fp32)")
      ->delimiter(',');
  GpuArgs gpu;
  CLI::App* gpu_command = app.add_subcommand(
      "gpu", "pinned copies, NVMe -> GPU streaming and prefetch on a CUDA device, against references");
  gpu_command->add_option("--nvme", gpu.nvme, "directory for the streaming files (default $ZINF_BENCH_DIR or /var/tmp)");
  gpu_command->add_option("--size", gpu.size, "bytes per copy and per streaming pass (default 1G)");
  gpu_command->add_option("--shard", gpu.shard, "bytes per streamed shard (default 64M)");
  gpu_command->add_option("--repeat", gpu.repeat, "passes, median reported (default 3)")->check(CLI::PositiveNumber);
  gpu_command->add_option("--device", gpu.device, "CUDA device index (default 0)");
  gpu_command->add_option("--json", gpu.json_path, "write the result to FILE");
  gpu_command->add_flag("--no-progress", io.no_progress, "accepted as for the other commands");
  app.require_subcommand(0, 1);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  install_signal_handlers();
  try {
    if (adam_command->parsed()) return run_adam(adam);
    if (swap_command->parsed()) return run_swap(swap);
    if (gpu_command->parsed()) return run_gpu(gpu);
    return run_io(io);
  } catch (const Error& error) {
    std::fflush(stdout);
    if (error.kind() == ErrorKind::cancelled) {
      std::fprintf(stderr, "\nzinf-bench: interrupted; scratch files removed\n");
      return 130;
    }
    std::fprintf(stderr, "zinf-bench: error: %s\n", error.what());
    return 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "zinf-bench: error: %s\n", error.what());
    return 1;
  }
}

#include "tools/swap_bench.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fstream>
#include <map>
#include <optional>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "aio/file.hpp"
#include "core/error.hpp"
#include "core/units.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/optimizer_swapper.hpp"
#include "swap/param_swapper.hpp"
#include "swap/swap_config.hpp"
#include "swap/swap_store.hpp"
#include "tools/median.hpp"

namespace zinf::bench {
namespace {

using Clock = std::chrono::steady_clock;
using swap::SwapStore;
using swap::SwapTicket;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

std::uint64_t status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field, 0) == 0) return std::stoull(line.substr(std::strlen(field))) * 1024;
  }
  return 0;
}

std::uint64_t ram_bytes() {
  return static_cast<std::uint64_t>(::sysconf(_SC_PHYS_PAGES)) *
         static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
}

// Scratch directories removed on every exit path.
struct Scratch {
  std::vector<std::filesystem::path> paths;
  bool keep = false;
  ~Scratch() {
    if (keep) return;
    for (const auto& path : paths) {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  }
};

constexpr const char* kTensors[] = {"param", "exp_avg", "exp_avg_sq"};

}  // namespace

nlohmann::json SwapBenchResult::to_json() const {
  return {{"params", params},
          {"sub_groups", sub_groups},
          {"state_bytes", state_bytes},
          {"pinned_bytes", pinned_bytes},
          {"first_write_gbps", first_write_gbps},
          {"write_gbps", write_gbps},
          {"read_gbps", read_gbps},
          {"compute_seconds", compute_seconds},
          {"io_bound_seconds", io_bound_seconds},
          {"step_seconds", step_seconds},
          {"step_read_wait_seconds", step_read_wait},
          {"step_write_wait_seconds", step_write_wait},
          {"step_compute_seconds", step_compute},
          {"step_median_seconds", step_median},
          {"step_over_bound", ratio()},
          {"peak_rss_bytes", peak_rss_bytes},
          {"ram_bytes", ram_bytes},
          {"fetch_ms_without_prefetch", fetch_ms_without_prefetch},
          {"fetch_ms_with_prefetch", fetch_ms_with_prefetch},
          {"fetch_hidden_fraction", fetch_hidden_fraction},
          {"step_written_bytes", step_written_bytes},
          {"written_per_device", written_per_device},
          {"store_written_total", store_written_total},
          {"formats", [&] {
             auto runs = nlohmann::json::array();
             for (const auto& run : formats) runs.push_back(run.to_json());
             return runs;
           }()}};
}

nlohmann::json SwapFormatRun::to_json() const {
  return {{"state_format", std::string(cpu_adam::to_string(format))},
          {"state_bytes", state_bytes},
          {"compute_seconds", compute_seconds},
          {"io_bound_seconds", io_bound_seconds},
          {"step_read_bytes", step_read_bytes},
          {"step_moved_bytes", step_moved_bytes},
          {"step_seconds", step_seconds},
          {"step_median_seconds", step_median},
          {"step_over_bound", ratio()},
          {"step_written_bytes", step_written_bytes},
          {"written_per_device", written_per_device}};
}

double SwapBenchResult::steps_until_tbw(double tbw_terabytes) const {
  std::uint64_t most = 0;
  for (const auto& [device, bytes] : written_per_device) most = std::max(most, bytes);
  return most == 0 ? 0.0 : tbw_terabytes * 1e12 / static_cast<double>(most);
}

SwapBenchResult run_swap_bench(const SwapBenchOptions& options,
                               const std::function<void(const std::string&)>& progress,
                               const std::function<bool()>& interrupted) {
  ZINF_CHECK(options.params > 0 && options.sub_group > 0, "--params and --sub-group must be > 0");
  ZINF_CHECK(options.steps > 0, "--steps must be > 0");
  const auto check_interrupt = [&] {
    if (interrupted()) throw Error(ErrorKind::cancelled, "interrupted");
  };
  SwapBenchResult result;
  result.params = options.params;
  result.ram_bytes = ram_bytes();

  Scratch scratch;
  scratch.keep = options.keep_files;
  swap::SwapStoreOptions store_options;
  for (const auto& directory : options.directories) {
    if (!std::filesystem::is_directory(directory)) {
      throw_path_error("open directory", directory.string(), ENOENT);
    }
    const auto path = directory / fmt::format("zinf-bench-swap.{}", ::getpid());
    scratch.paths.push_back(path);
    store_options.directories.push_back(path);
  }
  store_options.aio.block_size = options.block_size;
  store_options.aio.queue_depth = options.queue_depth;
  store_options.aio.intra_op_parallelism = options.intra_op;
  store_options.grow_bytes = 1ull << 30;
  store_options.sync = options.sync;

  const std::vector<swap::SubGroup> groups =
      swap::sub_groups(options.params, options.sub_group, "group");
  result.sub_groups = groups.size();
  result.state_bytes = 12 * options.params;

  // The pool outlives the store, so no I/O is in flight into unmapped
  // memory on any exit path.
  std::optional<PinnedPool> pool_holder;
  auto store = std::make_unique<SwapStore>(store_options);
  const std::uint64_t region = store->padded_size(4 * groups.front().elements);
  const std::uint64_t slot_bytes = 3 * region;
  const std::uint64_t fetch_bytes = 3 * store->padded_size(options.fetch_shard_bytes);
  PinnedPoolOptions pool_options;
  pool_options.budget_bytes = std::max(3 * slot_bytes, fetch_bytes);
  pool_options.allow_unpinned = true;
  PinnedPool& pool = pool_holder.emplace(pool_options);
  result.pinned_bytes = pool.stats().capacity_bytes;
  const aio::MemoryRegion pool_region = pool.region();
  store->register_buffers(std::span(&pool_region, 1));

  // --- I/O passes with three slots, as the swapper uses them. ---
  {
    std::vector<PinnedBuffer> slots;
    std::vector<std::vector<SwapTicket>> tickets(3);
    for (int i = 0; i < 3; ++i) {
      slots.push_back(pool.acquire(slot_bytes));
      auto* params = reinterpret_cast<float*>(slots.back().data());
      for (std::uint64_t e = 0; e < groups.front().elements; ++e) {
        params[e] = 0.01f * static_cast<float>(e % 97) - 0.5f;
      }
      std::memset(slots.back().data() + region, 0, 2 * region);
    }
    const auto drain = [&](std::size_t slot, bool commit) {
      for (auto ticket : tickets[slot]) store->wait(ticket);
      if (commit && !tickets[slot].empty()) store->commit();
      tickets[slot].clear();
    };
    const auto pass = [&](aio::Op op) {
      const auto start = Clock::now();
      for (std::size_t g = 0; g < groups.size(); ++g) {
        check_interrupt();
        const std::size_t s = g % 3;
        drain(s, op == aio::Op::write);
        for (int t = 0; t < 3; ++t) {
          const std::string key = fmt::format("{}/{}", groups[g].name, kTensors[t]);
          std::span<std::byte> buffer(slots[s].data() + t * region, region);
          tickets[s].push_back(op == aio::Op::write
                                   ? store->write(key, buffer, 4 * groups[g].elements)
                                   : store->read(key, buffer));
        }
      }
      for (std::size_t s = 0; s < 3; ++s) drain(s, op == aio::Op::write);
      return static_cast<double>(result.state_bytes) / seconds_since(start) / 1e9;
    };
    progress(fmt::format("laying out {} of optimizer states ({} sub-groups)",
                         format_bytes(result.state_bytes), groups.size()));
    result.first_write_gbps = pass(aio::Op::write);
    progress("rewrite pass (write GB/s)");
    result.write_gbps = pass(aio::Op::write);
    progress("read pass (read GB/s)");
    result.read_gbps = pass(aio::Op::read);
    // Each state format below lays out its own states: these go first.
    for (const auto& group : groups) {
      for (const char* tensor : kTensors) store->remove(fmt::format("{}/{}", group.name, tensor));
    }
    store->commit();
  }
  // --- Optimizer steps through the swapper, one state format at a time. ---
  cpu_adam::CpuOptimizer optimizer(options.threads == 0 ? std::thread::hardware_concurrency() : options.threads);
  ZINF_CHECK(!options.formats.empty(), "no state format to step");
  for (const cpu_adam::MomentFormat format : options.formats) {
    SwapFormatRun run;
    run.format = format;
    const std::string name(cpu_adam::to_string(format));
    const std::vector<swap::SubGroup> format_groups =
        swap::sub_groups(options.params, options.sub_group, name + ".group");
    for (const auto& group : format_groups) {
      for (std::size_t t = 0; t < 3; ++t) run.state_bytes += swap::OptimizerSwapper::tensor_bytes(t, group.elements, format);
    }
    std::vector<std::uint16_t> grads(groups.front().elements);
    std::mt19937 random(7);
    std::normal_distribution<float> normal(0.0f, 1e-3f);
    for (auto& g : grads) g = cpu_adam::float_to_bf16(normal(random));
    std::vector<std::uint16_t> copy(groups.front().elements);

    // Compute bound: this format's kernel over the same elements, in memory.
    {
      progress(fmt::format("{} states: optimizer alone (compute bound)", name));
      // In a slot's worth of the pool (free until the swapper leases it),
      // so the bound adds nothing to the peak RSS.
      PinnedBuffer slot = pool.acquire(slot_bytes);
      std::memset(slot.data(), 0, slot_bytes);
      auto* param = reinterpret_cast<float*>(slot.data());
      const auto start = Clock::now();
      for (const auto& group : format_groups) {
        cpu_adam::CompressedTensorState state;
        state.param = {param, group.elements, cpu_adam::DType::f32};
        state.grad = {grads.data(), group.elements, cpu_adam::DType::bf16};
        state.exp_avg = slot.data() + region;
        state.exp_avg_sq = slot.data() + 2 * region;
        state.param_copy = {copy.data(), group.elements, cpu_adam::DType::bf16};
        optimizer.adam_step(cpu_adam::AdamOptions{}, 1, format, std::span(&state, 1));
      }
      run.compute_seconds = seconds_since(start);
    }

    swap::OptimizerSwapperOptions swapper_options;
    swapper_options.moment_format = format;
    swapper_options.name = "optimizer." + name;
    swap::OptimizerSwapper swapper(*store, pool, optimizer, format_groups, swapper_options);
    progress(fmt::format("{} states: laying out {}", name, format_bytes(run.state_bytes)));
    {
      std::vector<float> params(groups.front().elements);
      for (std::size_t e = 0; e < params.size(); ++e) params[e] = 0.01f * static_cast<float>(e % 97) - 0.5f;
      for (std::size_t g = 0; g < format_groups.size(); ++g) {
        check_interrupt();
        swapper.initialize(g, std::span(params).first(format_groups[g].elements));
      }
    }
    std::vector<cpu_adam::Buffer> grad_buffers, copy_buffers;
    for (const auto& group : format_groups) {
      grad_buffers.push_back({grads.data(), group.elements, cpu_adam::DType::bf16});
      copy_buffers.push_back({copy.data(), group.elements, cpu_adam::DType::bf16});
    }
    for (int step = 0; step < options.steps; ++step) {
      check_interrupt();
      progress(fmt::format("{} states: optimizer step {} of {}", name, step + 1, options.steps));
      const auto written_before = store->stats().written_bytes;
      swapper.step(grad_buffers, copy_buffers);
      const auto written_after = store->stats().written_bytes;
      std::map<std::string, std::uint64_t> by_device;
      std::uint64_t step_total = 0;
      for (std::size_t d = 0; d < written_after.size(); ++d) {
        const std::uint64_t bytes = written_after[d] - written_before[d];
        by_device[aio::device_name(options.directories[d])] += bytes;
        step_total += bytes;
      }
      run.step_written_bytes.push_back(step_total);
      run.written_per_device.assign(by_device.begin(), by_device.end());
      const auto& stats = swapper.last_step_stats();
      const auto as_seconds = [](std::chrono::nanoseconds d) { return std::chrono::duration<double>(d).count(); };
      run.step_seconds.push_back(as_seconds(stats.total));
      run.step_read_wait.push_back(as_seconds(stats.read_wait));
      run.step_write_wait.push_back(as_seconds(stats.write_wait));
      run.step_compute.push_back(as_seconds(stats.compute));
      run.step_read_bytes = stats.bytes_read;
      run.step_moved_bytes = stats.bytes_read + stats.bytes_written;
      run.io_bound_seconds = static_cast<double>(stats.bytes_read) / (result.read_gbps * 1e9) +
                             static_cast<double>(stats.bytes_written) / (result.write_gbps * 1e9);
    }
    run.step_median = median(run.step_seconds);
    // This format's states go before the next one's are laid out: the disk
    // holds one format at a time.
    for (const auto& group : format_groups) {
      for (const char* tensor : kTensors) store->remove(fmt::format("{}/{}", group.name, tensor));
    }
    store->commit();
    result.formats.push_back(std::move(run));
  }
  {
    const SwapFormatRun& first = result.formats.front();
    result.compute_seconds = first.compute_seconds;
    result.io_bound_seconds = first.io_bound_seconds;
    result.step_seconds = first.step_seconds;
    result.step_read_wait = first.step_read_wait;
    result.step_write_wait = first.step_write_wait;
    result.step_compute = first.step_compute;
    result.step_median = first.step_median;
    result.step_written_bytes = first.step_written_bytes;
    result.written_per_device = first.written_per_device;
    result.store_written_total = store->stats().written_total;
    result.peak_rss_bytes = status_bytes("VmHWM:");
  }

  // --- Parameter fetch latency, with and without prefetch. ---
  {
    progress(fmt::format("param fetch: {} layers of {}", options.fetch_layers,
                         format_bytes(options.fetch_shard_bytes)));
    std::vector<swap::ParamSpec> specs;
    std::vector<std::string> keys;
    for (int i = 0; i < options.fetch_layers; ++i) {
      keys.push_back(fmt::format("layers.{}.weight", i));
      specs.push_back({keys.back(), options.fetch_shard_bytes});
    }
    swap::ParamSwapperOptions param_options;
    param_options.buffer_count = 3;
    param_options.buffer_bytes = options.fetch_shard_bytes;
    param_options.max_in_cpu_bytes = 0;  // every fetch comes from NVMe
    swap::ParamSwapper params(*store, pool, specs, param_options);
    std::vector<std::byte> shard(options.fetch_shard_bytes, std::byte{1});
    for (const auto& key : keys) params.swap_out(key, shard);
    // "Compute" per layer a little longer than its read, so prefetch can
    // hide it all: 1.2 x the fetch time measured without prefetch (not
    // derived from the optimizer phase's GB/s, which a small --params
    // makes meaningless).
    std::chrono::duration<double> compute{0};
    const auto run = [&](bool prefetch) {
      std::vector<double> waits;
      if (prefetch) params.prefetch(std::span(keys).first(std::min<std::size_t>(2, keys.size())));
      for (std::size_t i = 0; i < keys.size(); ++i) {
        check_interrupt();
        const auto start = Clock::now();
        params.fetch(keys[i]);
        waits.push_back(seconds_since(start) * 1e3);
        if (prefetch && i + 1 < keys.size()) {
          params.prefetch(std::span(keys).subspan(i + 1, std::min<std::size_t>(2, keys.size() - i - 1)));
        }
        std::this_thread::sleep_for(compute);
        params.release(keys[i]);
      }
      double sum = 0;
      for (double w : waits) sum += w;
      return sum / static_cast<double>(waits.size());
    };
    result.fetch_ms_without_prefetch = run(false);
    compute = std::chrono::duration<double>(1.2 * result.fetch_ms_without_prefetch / 1e3);
    result.fetch_ms_with_prefetch = run(true);
    result.fetch_hidden_fraction =
        result.fetch_ms_without_prefetch > 0
            ? 1.0 - result.fetch_ms_with_prefetch / result.fetch_ms_without_prefetch
            : 0;
  }
  store.reset();
  return result;
}

}  // namespace zinf::bench

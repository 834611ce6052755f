// zinf-bench gpu: the device tier's speed on a GPU machine, each figure
// against a reference measured in the same run.
//   copies     pinned-pool H2D and D2H through the CUDA copier, against
//              cudaMemcpy from cudaHostAlloc memory (the best a program
//              gets from the CUDA runtime)
//   streaming  NVMe -> pinned -> GPU through the param swapper (prefetch
//              two ahead) and the copier, against the same reads NVMe ->
//              pinned alone (the disk's own rate here)
//   prefetch   per-layer wait for a shard with and without prefetch while
//              the "trainer" computes a little longer than a read takes
// Built only with CUDA (tools/meson.build).
#include "tools/gpu_bench.hpp"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/device_copy.hpp"
#include "swap/param_swapper.hpp"
#include "swap/swap_store.hpp"
#include "tools/median.hpp"

namespace zinf::bench {
namespace {

using Clock = std::chrono::steady_clock;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw Error(ErrorKind::io, fmt::format("CUDA {} failed: {}", what, cudaGetErrorString(status)));
  }
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double gbps(std::uint64_t bytes, double seconds) { return seconds > 0 ? static_cast<double>(bytes) / seconds / 1e9 : 0; }

}  // namespace

nlohmann::json GpuBenchResult::to_json() const {
  return {{"device", device},
          {"bytes", bytes},
          {"h2d_gbps", h2d_gbps},
          {"d2h_gbps", d2h_gbps},
          {"reference_h2d_gbps", reference_h2d_gbps},
          {"reference_d2h_gbps", reference_d2h_gbps},
          {"stream_gbps", stream_gbps},
          {"disk_gbps", disk_gbps},
          {"fetch_ms_without_prefetch", fetch_ms_without_prefetch},
          {"fetch_ms_with_prefetch", fetch_ms_with_prefetch}};
}

GpuBenchResult run_gpu_bench(const GpuBenchOptions& options, const std::function<void(const std::string&)>& progress) {
  ZINF_CHECK(options.shard_bytes > 0 && options.shard_bytes <= options.bytes && options.repeats > 0,
             "zinf-bench gpu: --shard must be between 1 and --size, --repeat at least 1");
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    throw Error(ErrorKind::unsupported, "zinf-bench gpu: no CUDA device is visible");
  }
  check(cudaSetDevice(options.device_index), "cudaSetDevice");
  cudaDeviceProp properties{};
  check(cudaGetDeviceProperties(&properties, options.device_index), "cudaGetDeviceProperties");
  GpuBenchResult result;
  result.device = properties.name;
  result.bytes = options.bytes;
  auto copier = swap::make_cuda_copier(options.device_index);
  ZINF_CHECK(copier != nullptr, "no CUDA copier");
  void* device = copier->allocate_device(options.bytes);

  // --- copies: pool memory through the copier vs cudaHostAlloc + cudaMemcpy.
  {
    progress("pinned copies");
    PinnedPoolOptions pool_options;
    pool_options.budget_bytes = options.bytes;
    PinnedPool pool(pool_options);
    PinnedBuffer lease = pool.acquire(options.bytes);
    void* reference = nullptr;
    check(cudaHostAlloc(&reference, options.bytes, cudaHostAllocDefault), "cudaHostAlloc");
    std::vector<double> up, down, ref_up, ref_down;
    for (int r = 0; r < options.repeats; ++r) {
      auto start = Clock::now();
      copier->wait(copier->to_device(device, lease.data(), options.bytes));
      up.push_back(seconds_since(start));
      start = Clock::now();
      copier->wait(copier->to_host(lease.data(), device, options.bytes));
      down.push_back(seconds_since(start));
      start = Clock::now();
      check(cudaMemcpy(device, reference, options.bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
      ref_up.push_back(seconds_since(start));
      start = Clock::now();
      check(cudaMemcpy(reference, device, options.bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
      ref_down.push_back(seconds_since(start));
    }
    cudaFreeHost(reference);
    result.h2d_gbps = gbps(options.bytes, median(up));
    result.d2h_gbps = gbps(options.bytes, median(down));
    result.reference_h2d_gbps = gbps(options.bytes, median(ref_up));
    result.reference_d2h_gbps = gbps(options.bytes, median(ref_down));
  }

  // --- streaming and prefetch: layers of shards on NVMe.
  {
    progress("NVMe -> pinned -> GPU streaming");
    const std::filesystem::path dir = options.directory / fmt::format("zinf-bench-gpu.{}", ::getpid());
    struct Cleanup {
      std::filesystem::path path;
      ~Cleanup() {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
      }
    } cleanup{dir};
    swap::SwapStoreOptions store_options;
    store_options.directories = {dir};
    store_options.sync = false;
    swap::SwapStore store(store_options);
    const std::uint64_t shard = options.shard_bytes;
    const int layers = static_cast<int>(std::max<std::uint64_t>(2, options.bytes / shard));
    std::vector<swap::ParamSpec> specs;
    std::vector<std::string> keys;
    for (int i = 0; i < layers; ++i) {
      keys.push_back(fmt::format("layer{}", i));
      specs.push_back({keys.back(), shard});
    }
    swap::ParamSwapperOptions param_options;
    param_options.buffer_count = 4;
    param_options.buffer_bytes = shard;
    param_options.max_in_cpu_bytes = 0;
    PinnedPoolOptions pool_options;
    pool_options.budget_bytes = swap::ParamSwapper::plan(specs, param_options, store.alignment()).pinned_bytes;
    PinnedPool pool(pool_options);
    swap::ParamSwapper params(store, pool, specs, param_options);
    std::vector<std::byte> data(shard, std::byte{7});
    for (const auto& key : keys) params.swap_out(key, data);
    params.commit();
    const auto pass = [&](bool to_gpu, bool prefetch, std::chrono::duration<double> compute) {
      std::vector<double> waits;
      const auto start = Clock::now();
      if (prefetch) params.prefetch(std::span(keys).first(std::min<std::size_t>(2, keys.size())));
      for (std::size_t i = 0; i < keys.size(); ++i) {
        const auto asked = Clock::now();
        const auto bytes = params.fetch(keys[i]);
        if (to_gpu) {
          copier->wait(copier->to_device(device, bytes.data(), shard));
        }
        waits.push_back(seconds_since(asked) * 1e3);
        if (prefetch && i + 1 < keys.size()) {
          params.prefetch(std::span(keys).subspan(i + 1, std::min<std::size_t>(2, keys.size() - i - 1)));
        }
        if (compute.count() > 0) std::this_thread::sleep_for(compute);
        params.release(keys[i]);
      }
      double sum = 0;
      for (double w : waits) sum += w;
      return std::make_pair(gbps(shard * keys.size(), seconds_since(start)), sum / static_cast<double>(waits.size()));
    };
    std::vector<double> disk, stream;
    for (int r = 0; r < options.repeats; ++r) {
      disk.push_back(pass(false, true, std::chrono::duration<double>(0)).first);
      stream.push_back(pass(true, true, std::chrono::duration<double>(0)).first);
    }
    result.disk_gbps = median(disk);
    result.stream_gbps = median(stream);
    progress("prefetch");
    const auto [unused_rate, without] = pass(true, false, std::chrono::duration<double>(0));
    (void)unused_rate;
    result.fetch_ms_without_prefetch = without;
    result.fetch_ms_with_prefetch = pass(true, true, std::chrono::duration<double>(1.2 * without / 1e3)).second;
  }
  copier->free_device(device);
  return result;
}

}  // namespace zinf::bench

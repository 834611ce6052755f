// The param swapper: planning from real shard sizes (buffers are minimums),
// swap_out / prefetch / fetch / release round trips of odd sizes, the
// max_in_cpu LRU, a shard larger than any configured buffer, clear errors
// when memory is exhausted or a shard is unknown, corruption surfacing at
// fetch, and the host stand-in of the device tier.
#include <cstring>
#include <fstream>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "core/error.hpp"
#include "swap/device_copy.hpp"
#include "swap/param_swapper.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

using testing::TempDir;

std::vector<std::byte> shard_bytes(std::uint64_t bytes, std::uint64_t seed) {
  std::vector<std::byte> data(bytes);
  testing::fill_random(data, seed);
  return data;
}

std::vector<ParamSpec> specs(std::initializer_list<std::uint64_t> sizes) {
  std::vector<ParamSpec> result;
  std::size_t i = 0;
  for (const auto bytes : sizes) {
    result.push_back({fmt::format("layers.{}.weight", i++), bytes});
  }
  return result;
}

SwapStoreOptions store_options(const TempDir& dir) {
  SwapStoreOptions options;
  options.directories = {dir.path()};
  options.aio.block_size = 64 << 10;
  return options;
}

PinnedPoolOptions pool_bytes(std::uint64_t bytes) {
  PinnedPoolOptions options;
  options.budget_bytes = bytes;
  options.allow_unpinned = true;
  return options;
}

// Buffers of `count` x 4 KiB (raised to the shards), no host cache.
ParamSwapperOptions uncached(std::uint64_t count,
                             std::chrono::milliseconds wait = std::chrono::milliseconds(10000)) {
  ParamSwapperOptions options;
  options.buffer_count = count;
  options.buffer_bytes = 4096;
  options.max_in_cpu_bytes = 0;
  options.memory_wait = wait;
  return options;
}

bool equal(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size()) == 0;
}

TEST(ParamSwapper, PlanTreatsBufferSettingsAsMinimumsAndFitsTheLargestShard) {
  ParamSwapperOptions options;
  options.buffer_count = 2;
  options.buffer_bytes = 8192;
  options.max_in_cpu_bytes = 0;
  const auto params = specs({100, 50000, 3000, 7});
  const ParamPlan plan = ParamSwapper::plan(params, options, 4096);
  EXPECT_TRUE(plan.raised);
  EXPECT_EQ(plan.largest_key, "layers.1.weight");
  EXPECT_EQ(plan.buffer_bytes, 53248u);  // 50000 padded to 4 KiB
  EXPECT_EQ(plan.buffer_count, 2u);
  // Two 52 KiB buffers would exceed all four shards together (64 KiB).
  EXPECT_EQ(plan.in_flight_bytes, 65536u);
  EXPECT_EQ(plan.pinned_bytes, 65536u);
  options.buffer_bytes = 1 << 20;
  options.max_in_cpu_bytes = 10000;
  const ParamPlan roomy = ParamSwapper::plan(params, options, 4096);
  EXPECT_FALSE(roomy.raised);
  EXPECT_EQ(roomy.buffer_bytes, 1u << 20);
  EXPECT_EQ(roomy.cache_bytes, 10000u);
  EXPECT_EQ(roomy.pinned_bytes, 65536u + 10000u);
  const auto many = specs({40000, 40000, 40000, 40000});
  options.buffer_bytes = 4096;
  EXPECT_EQ(ParamSwapper::plan(many, options, 4096).in_flight_bytes, 2u * 40960u);
}

TEST(ParamSwapper, OddSizedShardsRoundTripThroughPrefetchAndFetch) {
  TempDir dir;
  SwapStore store(store_options(dir));
  PinnedPool pool(pool_bytes(4 << 20));
  const ParamSwapperOptions options = uncached(4);  // every release goes straight back to NVMe
  const auto params = specs({1, 4095, 4097, 100003, 7});
  ParamSwapper swapper(store, pool, params, options);
  std::vector<std::vector<std::byte>> contents;
  for (std::size_t i = 0; i < params.size(); ++i) {
    contents.push_back(shard_bytes(params[i].bytes, i + 1));
    swapper.swap_out(params[i].key, contents.back());
  }
  swapper.commit();
  EXPECT_EQ(swapper.cached_bytes(), 0u);
  std::vector<std::string> keys;
  for (const auto& p : params) keys.push_back(p.key);
  EXPECT_EQ(swapper.prefetch(keys), params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto bytes = swapper.fetch(params[i].key);
    EXPECT_TRUE(equal(bytes, contents[i])) << params[i].key;
    swapper.release(params[i].key);
  }
  auto stats = swapper.stats();
  EXPECT_EQ(stats.prefetch_hits, params.size());
  EXPECT_EQ(stats.misses, 0u);
  // Without a prefetch, fetch reads by itself.
  const auto again = swapper.fetch(params[3].key);
  EXPECT_TRUE(equal(again, contents[3]));
  swapper.release(params[3].key);
  EXPECT_EQ(swapper.stats().misses, 1u);
}

TEST(ParamSwapper, MaxInCpuKeepsTheMostRecentShardsInHostMemory) {
  TempDir dir;
  SwapStore store(store_options(dir));
  PinnedPool pool(pool_bytes(1 << 20));
  ParamSwapperOptions options;
  options.buffer_count = 1;
  options.buffer_bytes = 4096;
  options.max_in_cpu_bytes = 2 * 8192;  // room for two 8 KiB shards
  const auto params = specs({8000, 8000, 8000});
  ParamSwapper swapper(store, pool, params, options);
  for (std::size_t i = 0; i < params.size(); ++i) {
    swapper.swap_out(params[i].key, shard_bytes(8000, i));
  }
  // The first one was evicted to stay within max_in_cpu.
  EXPECT_FALSE(swapper.resident(params[0].key));
  EXPECT_TRUE(swapper.resident(params[1].key));
  EXPECT_TRUE(swapper.resident(params[2].key));
  EXPECT_LE(swapper.cached_bytes(), options.max_in_cpu_bytes);
  // Fetching layer 1 makes it the most recent; fetching layer 0 then
  // evicts layer 2, the least recently used.
  EXPECT_TRUE(equal(swapper.fetch(params[1].key), shard_bytes(8000, 1)));
  swapper.release(params[1].key);
  EXPECT_TRUE(equal(swapper.fetch(params[0].key), shard_bytes(8000, 0)));
  swapper.release(params[0].key);
  EXPECT_TRUE(swapper.resident(params[1].key));
  EXPECT_FALSE(swapper.resident(params[2].key));
  const auto stats = swapper.stats();
  EXPECT_EQ(stats.cache_hits, 1u);
  EXPECT_EQ(stats.misses, 1u);
  EXPECT_GE(stats.evictions, 2u);
}

TEST(ParamSwapper, AShardLargerThanAnyConfiguredBufferIsPlannedForNotCrashedOn) {
  TempDir dir;
  SwapStore store(store_options(dir));
  const ParamSwapperOptions options = uncached(2);  // DeepSpeed would fail mid-run on the 1 MB shard
  const auto params = specs({4096, 1000000});
  const auto plan = ParamSwapper::plan(params, options, store.alignment());
  PinnedPool pool(pool_bytes(plan.pinned_bytes));
  ParamSwapper swapper(store, pool, params, options);
  const auto big = shard_bytes(1000000, 9);
  swapper.swap_out(params[1].key, big);
  EXPECT_TRUE(equal(swapper.fetch(params[1].key), big));
  swapper.release(params[1].key);
}

TEST(ParamSwapper, ErrorsNameTheBudgetTheShardAndTheKey) {
  TempDir dir;
  SwapStore store(store_options(dir));
  const ParamSwapperOptions options = uncached(2);
  const auto params = specs({40000, 40000, 40000});
  {
    PinnedPool small(pool_bytes(64 << 10));
    try {
      ParamSwapper swapper(store, small, params, options);
      FAIL() << "a pool too small for the plan was accepted";
    } catch (const Error& error) {
      EXPECT_EQ(error.kind(), ErrorKind::resource);
      EXPECT_NE(std::string(error.what()).find("81920 bytes"), std::string::npos)
          << error.what();
    }
  }
  PinnedPool pool(pool_bytes(2 * 40960));
  ParamSwapper swapper(store, pool, params, options);
  for (const auto& p : params) swapper.swap_out(p.key, shard_bytes(p.bytes, 3));
  EXPECT_THROW(swapper.fetch("layers.9.weight"), Error);
  EXPECT_THROW(swapper.swap_out(params[0].key, shard_bytes(5, 1)), Error);
  EXPECT_THROW(swapper.release(params[0].key), Error);  // never fetched
  // Holding two shards fills the plan; a third fetch without a release is a
  // clear error, not a hang (after the bounded wait for another thread).
  swapper.fetch(params[0].key);
  swapper.fetch(params[1].key);
  EXPECT_THROW(swapper.swap_out(params[1].key, shard_bytes(40000, 1)), Error);  // in use
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    swapper.release(params[0].key);
  });
  // Another thread's release lets this fetch go on.
  EXPECT_TRUE(equal(swapper.fetch(params[2].key), shard_bytes(40000, 3)));
  releaser.join();
  swapper.release(params[1].key);
  swapper.release(params[2].key);
}

TEST(ParamSwapper, OverSubscribingThePlanIsAClearErrorNotAHang) {
  TempDir dir;
  SwapStore store(store_options(dir));
  const ParamSwapperOptions options = uncached(2, std::chrono::milliseconds(100));
  const auto params = specs({40000, 40000, 40000});
  PinnedPool pool(pool_bytes(2 * 40960));
  ParamSwapper swapper(store, pool, params, options);
  for (const auto& p : params) swapper.swap_out(p.key, shard_bytes(p.bytes, 3));
  swapper.fetch(params[0].key);
  swapper.fetch(params[1].key);
  try {
    swapper.fetch(params[2].key);
    FAIL() << "a third shard fit in memory planned for two";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::resource);
    EXPECT_NE(std::string(error.what()).find(params[2].key), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("2 shard(s)"), std::string::npos) << error.what();
  }
  swapper.release(params[0].key);
  swapper.release(params[1].key);
}

TEST(ParamSwapper, AnUnfetchedPrefetchIsEvictedForAFetchInsteadOfBlockingIt) {
  TempDir dir;
  SwapStore store(store_options(dir));
  const ParamSwapperOptions options = uncached(1, std::chrono::milliseconds(200));
  const auto params = specs({40000, 40000, 40000});
  PinnedPool pool(pool_bytes(40960));
  ParamSwapper swapper(store, pool, params, options);
  swapper.swap_out(params[0].key, shard_bytes(40000, 1));
  swapper.swap_out(params[1].key, shard_bytes(40000, 2));
  // A prefetch nobody fetches holds the only buffer; a fetch of another
  // shard evicts it instead of failing.
  const std::vector<std::string> first = {params[0].key};
  EXPECT_EQ(swapper.prefetch(first), 1u);
  EXPECT_TRUE(equal(swapper.fetch(params[1].key), shard_bytes(40000, 2)));
  swapper.release(params[1].key);
}

TEST(ParamSwapper, AFailedPrefetchListStillCompletesTheReadsItStarted) {
  TempDir dir;
  SwapStore store(store_options(dir));
  PinnedPool pool(pool_bytes(1 << 20));
  ParamSwapperOptions options;
  options.max_in_cpu_bytes = 0;
  const auto params = specs({40000, 40000});
  ParamSwapper swapper(store, pool, params, options);
  swapper.swap_out(params[0].key, shard_bytes(40000, 1));  // params[1] never written
  const std::vector<std::string> both = {params[0].key, params[1].key};
  EXPECT_THROW(swapper.prefetch(both), Error);  // no such key in the store
  // The first read was started before the throw: fetch finds it done.
  EXPECT_TRUE(equal(swapper.fetch(params[0].key), shard_bytes(40000, 1)));
  swapper.release(params[0].key);
  EXPECT_EQ(swapper.stats().prefetch_hits, 1u);
}

TEST(ParamSwapper, ACorruptShardFailsAtFetchNamingTheKeyAndCanBeRewritten) {
  TempDir dir;
  const auto params = specs({20000});
  std::uint64_t offset = 0;
  {
    SwapStore store(store_options(dir));
    PinnedPool pool(pool_bytes(1 << 20));
    ParamSwapperOptions options;
    options.max_in_cpu_bytes = 0;
    ParamSwapper swapper(store, pool, params, options);
    swapper.swap_out(params[0].key, shard_bytes(20000, 5));
    swapper.commit();
    offset = store.find(params[0].key)->offset_bytes;
  }
  {
    std::fstream file(dir / "zinf.volume", std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(offset + 17));
    file.put('\x5a');
  }
  SwapStore store(store_options(dir));
  PinnedPool pool(pool_bytes(1 << 20));
  ParamSwapperOptions options;
  options.max_in_cpu_bytes = 0;
  ParamSwapper swapper(store, pool, params, options);
  try {
    swapper.fetch(params[0].key);
    FAIL() << "corrupt bytes were handed out";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find(params[0].key), std::string::npos);
  }
  EXPECT_FALSE(swapper.resident(params[0].key));
  // A prefetched read is verified off the caller's thread; its failure
  // still reaches the fetch.
  const std::vector<std::string> keys = {params[0].key};
  EXPECT_EQ(swapper.prefetch(keys), 1u);
  try {
    swapper.fetch(params[0].key);
    FAIL() << "a failed prefetch was handed out";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
  }
  swapper.swap_out(params[0].key, shard_bytes(20000, 6));
  EXPECT_TRUE(equal(swapper.fetch(params[0].key), shard_bytes(20000, 6)));
  swapper.release(params[0].key);
}

TEST(ParamSwapper, ShardsStreamNvmeToPinnedToDeviceThroughTheCopier) {
  // The path a layer's params take before it runs: prefetch from NVMe into
  // pinned memory, fetch, copy to the device, release once the copy is done.
  TempDir dir;
  SwapStore store(store_options(dir));
  PinnedPool pool(pool_bytes(4 << 20));
  const ParamSwapperOptions options = uncached(3);
  const auto params = specs({300000, 123457, 4096, 77777, 250001});
  ParamSwapper swapper(store, pool, params, options);
  auto copier = make_device_copier(DeviceKind::host);
  std::vector<void*> device;
  std::vector<std::string> keys;
  for (std::size_t i = 0; i < params.size(); ++i) {
    swapper.swap_out(params[i].key, shard_bytes(params[i].bytes, 40 + i));
    device.push_back(copier->allocate_device(params[i].bytes));
    keys.push_back(params[i].key);
  }
  swapper.prefetch(std::span(keys).first(2));
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto pinned = swapper.fetch(keys[i]);
    if (i + 2 < keys.size()) swapper.prefetch(std::span(keys).subspan(i + 2, 1));
    copier->wait(copier->to_device(device[i], pinned.data(), pinned.size()));
    swapper.release(keys[i]);
  }
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto expected = shard_bytes(params[i].bytes, 40 + i);
    EXPECT_EQ(std::memcmp(device[i], expected.data(), expected.size()), 0) << keys[i];
    copier->free_device(device[i]);
  }
  EXPECT_EQ(swapper.stats().misses, 0u);
}

TEST(DeviceCopy, TheHostStandInCopiesInOrderAndRoundTrips) {
  auto copier = make_device_copier(DeviceKind::host);
  EXPECT_EQ(copier->name(), "host stand-in");
  const auto data = shard_bytes(1 << 20, 4);
  void* device = copier->allocate_device(data.size());
  std::vector<std::byte> back(data.size());
  const CopyTicket up = copier->to_device(device, data.data(), data.size());
  const CopyTicket down = copier->to_host(back.data(), device, back.size());
  copier->wait(down);  // waits for `up` too: copies run in order
  copier->wait(up);
  EXPECT_TRUE(equal(back, data));
  copier->free_device(device);
  // Automatic picks CUDA only where a device is visible.
  auto automatic = make_device_copier();
  EXPECT_TRUE(automatic->name() == "cuda" || automatic->name() == "host stand-in");
}

}  // namespace
}  // namespace zinf::swap

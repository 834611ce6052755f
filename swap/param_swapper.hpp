// The param swapper: parameter shards live in the swap store and come back
// into pinned host buffers just before they are used.
//
//   swap_out(key, bytes)   the shard's new content goes to NVMe
//   prefetch(keys)         start reading these, as far as memory allows
//   fetch(key)             wait for this key only; a pinned span of its bytes
//   release(key)           done with it: it stays cached in host memory (LRU,
//                          at most max_in_cpu bytes) or its buffer goes back
//
// Memory is planned from the real shard sizes before the first step:
// DeepSpeed's buffer_count and buffer_size are minimums, raised to fit the
// largest shard (logged once), so a shard larger than any configured buffer
// is planned for, never crashed on. The one failure for want of memory is the
// constructor's, naming the bytes needed and the pool's budget. Buffers are
// exact-size leases from the pinned pool, so small shards do not each take a
// whole buffer.
#pragma once

#include <chrono>
#include <deque>
#include <exception>
#include <thread>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "pinned_pool/pinned_pool.hpp"
#include "swap/swap_store.hpp"

namespace zinf::swap {

struct ParamSpec {
  std::string key;
  std::uint64_t bytes = 0;
};

struct ParamSwapperOptions {
  std::uint64_t buffer_count = 5;             // offload_param.buffer_count (minimum)
  std::uint64_t buffer_bytes = 200000000;     // offload_param.buffer_size x element size (minimum)
  std::uint64_t max_in_cpu_bytes = 2000000000;  // offload_param.max_in_cpu x element size
  // How long a fetch waits for memory another thread may release before it
  // reports the pool as exhausted.
  std::chrono::milliseconds memory_wait{10000};
};

struct ParamPlan {
  std::uint64_t buffer_count = 0;
  std::uint64_t buffer_bytes = 0;   // raised to the largest padded shard
  // Shards being read or in use: buffer_count x buffer_bytes, capped at all
  // the shards together and at least the largest.
  std::uint64_t in_flight_bytes = 0;
  std::uint64_t cache_bytes = 0;    // host cache, within max_in_cpu
  std::uint64_t pinned_bytes = 0;   // in_flight_bytes + cache_bytes
  bool raised = false;              // buffer_bytes was raised for the largest shard
  std::string largest_key;
};

struct ParamSwapperStats {
  std::uint64_t fetches = 0;
  std::uint64_t cache_hits = 0;      // already resident (cached or fetched before)
  std::uint64_t prefetch_hits = 0;   // a prefetch had started the read
  std::uint64_t misses = 0;          // fetch had to start the read itself
  std::uint64_t evictions = 0;
  std::uint64_t bytes_read = 0;
  std::uint64_t bytes_written = 0;
  std::chrono::nanoseconds fetch_wait{0};  // time fetch() blocked
};

class ParamSwapper {
 public:
  // The memory the swapper needs for these shards; `alignment` is the
  // store's.
  static ParamPlan plan(std::span<const ParamSpec> params, const ParamSwapperOptions& options,
                        std::uint64_t alignment);
  // The same from the largest shard's and all shards' bytes (padded totals
  // are the caller's estimate), for planning before the shapes are known.
  static ParamPlan plan_for(std::uint64_t largest_bytes, std::uint64_t total_bytes,
                            const ParamSwapperOptions& options, std::uint64_t alignment);

  // Throws Error{resource} when the pool is smaller than plan().pinned_bytes.
  ParamSwapper(SwapStore& store, PinnedPool& pool, std::vector<ParamSpec> params,
               ParamSwapperOptions options = {});
  ~ParamSwapper();
  ParamSwapper(const ParamSwapper&) = delete;
  ParamSwapper& operator=(const ParamSwapper&) = delete;

  // Writes the shard (params[key].bytes of `data`) to NVMe and drops any
  // host copy. Refused while the key is fetched and not released.
  void swap_out(std::string_view key, std::span<const std::byte> data);
  // Starts reads for the keys not yet resident, in order, while pinned
  // memory allows (evicting released shards first); never blocks on memory.
  // Returns how many reads it started.
  std::size_t prefetch(std::span<const std::string> keys);
  // Waits for this key only and returns its bytes, verified. Each fetch
  // needs one release.
  std::span<const std::byte> fetch(std::string_view key);
  void release(std::string_view key);
  // Makes every swap_out durable (the store's commit).
  void commit() { store_.commit(); }

  const ParamPlan& current_plan() const { return plan_; }
  ParamSwapperStats stats() const;
  bool resident(std::string_view key) const;
  std::uint64_t cached_bytes() const;

 private:
  enum class State { on_disk, reading, resident };
  struct Entry {
    std::uint64_t bytes = 0;
    State state = State::on_disk;
    PinnedBuffer buffer;
    SwapTicket ticket;
    bool prefetched = false;
    int users = 0;
    std::list<std::string>::iterator lru;  // valid while cached (resident, no users)
    bool cached = false;
    std::exception_ptr error;  // a prefetch that failed, for the next fetch
  };

  Entry& entry(std::string_view key);
  // Frees cached shards, least recently used first, until `bytes` fit the
  // pool or the cache is empty; under mutex_.
  std::optional<PinnedBuffer> lease(std::string_view key, std::uint64_t bytes, bool may_block,
                                    std::unique_lock<std::mutex>& lock);
  // Frees one prefetched shard that finished but was never fetched.
  bool evict_unfetched_prefetch();  // under mutex_
  void evict_one();  // under mutex_
  void start_read(const std::string& key, Entry& entry, PinnedBuffer buffer);
  // Waits for the entry's read with the lock released; the entry ends
  // resident, or on disk (buffer returned) with the error returned.
  std::exception_ptr finish_read(Entry& entry, std::unique_lock<std::mutex>& lock);
  void trim_cache();  // under mutex_
  // Finishes prefetched reads (wait and checksum) off the caller's thread,
  // so a fetch of a prefetched shard finds it verified.
  void complete_prefetches();

  SwapStore& store_;
  PinnedPool& pool_;
  ParamSwapperOptions options_;
  ParamPlan plan_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::unordered_map<std::string, Entry> entries_;
  std::list<std::string> lru_;  // cached keys, least recently used first
  std::uint64_t cached_bytes_ = 0;
  ParamSwapperStats stats_;
  std::deque<std::string> prefetched_;  // reads for the completer, in order
  std::condition_variable prefetch_queued_;
  bool stopping_ = false;
  std::thread completer_;
};

}  // namespace zinf::swap

#include "swap/param_swapper.hpp"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"

namespace zinf::swap {
namespace {

using Clock = std::chrono::steady_clock;

std::uint64_t padded(std::uint64_t bytes, std::uint64_t alignment) {
  return std::max(align_up(bytes, alignment), alignment);
}

}  // namespace

ParamPlan ParamSwapper::plan(std::span<const ParamSpec> params,
                             const ParamSwapperOptions& options, std::uint64_t alignment) {
  std::uint64_t largest = 0;
  std::uint64_t total = 0;
  std::string largest_key;
  for (const auto& param : params) {
    const std::uint64_t bytes = padded(param.bytes, alignment);
    total += bytes;
    if (bytes > largest) {
      largest = bytes;
      largest_key = param.key;
    }
  }
  ParamPlan plan = plan_for(largest, total, options, alignment);
  plan.largest_key = largest_key;
  return plan;
}

ParamPlan ParamSwapper::plan_for(std::uint64_t largest_bytes, std::uint64_t total_bytes,
                                 const ParamSwapperOptions& options, std::uint64_t alignment) {
  ParamPlan plan;
  const std::uint64_t largest = largest_bytes == 0 ? 0 : padded(largest_bytes, alignment);
  plan.buffer_count = std::max<std::uint64_t>(options.buffer_count, 1);
  plan.buffer_bytes = align_up(std::max<std::uint64_t>(options.buffer_bytes, 1), alignment);
  if (largest > plan.buffer_bytes) {
    plan.buffer_bytes = largest;
    plan.raised = true;
  }
  // Leases are exact-size, so shards in flight never need more than all
  // shards together, however large the configured buffers.
  plan.in_flight_bytes =
      std::max(largest, std::min(plan.buffer_count * plan.buffer_bytes, total_bytes));
  plan.cache_bytes = std::min(options.max_in_cpu_bytes, total_bytes);
  plan.pinned_bytes = plan.in_flight_bytes + plan.cache_bytes;
  return plan;
}

ParamSwapper::ParamSwapper(SwapStore& store, PinnedPool& pool, std::vector<ParamSpec> params,
                           ParamSwapperOptions options)
    : store_(store), pool_(pool), options_(options) {
  plan_ = plan(params, options_, store_.alignment());
  const std::uint64_t capacity = pool_.stats().capacity_bytes;
  if (plan_.pinned_bytes > capacity) {
    throw Error(ErrorKind::resource,
                fmt::format("the param swapper needs {} ({} bytes) of pinned memory ({} for "
                            "shards in flight: {} buffer(s) of {}; plus a {} host cache "
                            "(max_in_cpu)) but the pinned pool holds {}: raise the pinned "
                            "budget, or lower offload_param.buffer_count or max_in_cpu",
                            format_bytes(plan_.pinned_bytes), plan_.pinned_bytes,
                            format_bytes(plan_.in_flight_bytes), plan_.buffer_count,
                            format_bytes(plan_.buffer_bytes),
                            format_bytes(plan_.cache_bytes), format_bytes(capacity)));
  }
  if (plan_.raised) {
    log_once("param-buffer-raised", spdlog::level::info,
             fmt::format("offload_param.buffer_size is a minimum: buffers raised to {} for "
                         "the largest shard '{}'",
                         format_bytes(plan_.buffer_bytes), plan_.largest_key));
  }
  for (auto& param : params) {
    ZINF_CHECK(!param.key.empty(), "a param key must not be empty");
    auto [it, inserted] = entries_.try_emplace(param.key);
    if (!inserted) {
      throw Error(ErrorKind::invalid, fmt::format("param key '{}' is listed twice", param.key));
    }
    it->second.bytes = param.bytes;
  }
  completer_ = std::thread([this] { complete_prefetches(); });
}

ParamSwapper::~ParamSwapper() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  prefetch_queued_.notify_all();
  if (completer_.joinable()) completer_.join();  // it finishes every queued read first
}

void ParamSwapper::complete_prefetches() {
  std::unique_lock lock(mutex_);
  while (true) {
    prefetch_queued_.wait(lock, [&] { return stopping_ || !prefetched_.empty(); });
    if (prefetched_.empty()) return;
    const std::string key = std::move(prefetched_.front());
    prefetched_.pop_front();
    Entry& e = entries_.at(key);
    e.error = finish_read(e, lock);
  }
}

std::exception_ptr ParamSwapper::finish_read(Entry& e, std::unique_lock<std::mutex>& lock) {
  const SwapTicket ticket = e.ticket;
  e.ticket = {};
  lock.unlock();
  std::exception_ptr error;
  try {
    store_.wait(ticket);
  } catch (...) {
    error = std::current_exception();
  }
  lock.lock();
  if (error) {
    e.buffer.release();
    e.state = State::on_disk;
  } else {
    e.state = State::resident;
  }
  changed_.notify_all();
  return error;
}

ParamSwapper::Entry& ParamSwapper::entry(std::string_view key) {
  const auto it = entries_.find(std::string(key));
  if (it == entries_.end()) {
    throw Error(ErrorKind::invalid,
                fmt::format("param '{}' was not planned: list every shard when the param "
                            "swapper is made",
                            key));
  }
  return it->second;
}

void ParamSwapper::evict_one() {
  const std::string key = lru_.front();
  lru_.pop_front();
  Entry& victim = entries_.at(key);
  cached_bytes_ -= victim.buffer.size();
  victim.buffer.release();
  victim.cached = false;
  victim.state = State::on_disk;
  ++stats_.evictions;
}

void ParamSwapper::trim_cache() {
  while (cached_bytes_ > plan_.cache_bytes && !lru_.empty()) evict_one();
}

bool ParamSwapper::evict_unfetched_prefetch() {
  for (auto& [key, e] : entries_) {
    if (e.state == State::resident && e.prefetched && e.users == 0) {
      e.buffer.release();
      e.state = State::on_disk;
      e.prefetched = false;
      ++stats_.evictions;
      return true;
    }
  }
  return false;
}

std::optional<PinnedBuffer> ParamSwapper::lease(std::string_view key, std::uint64_t bytes,
                                                bool may_block,
                                                std::unique_lock<std::mutex>& lock) {
  const auto deadline = Clock::now() + options_.memory_wait;
  while (true) {
    if (auto buffer = pool_.try_acquire(bytes)) return buffer;
    // Released shards go first, then prefetched shards nobody fetched.
    if (!lru_.empty()) {
      evict_one();
      continue;
    }
    if (evict_unfetched_prefetch()) continue;
    if (!may_block) return std::nullopt;
    if (Clock::now() >= deadline) break;
    // Everything resident is in use: wait for a release here, or for
    // another user of a shared pool, which does not notify us: poll.
    changed_.wait_for(lock, std::chrono::milliseconds(20));
  }
  std::uint64_t in_use = 0;
  std::size_t shards = 0;
  for (const auto& [name, entry] : entries_) {
    if (entry.state != State::on_disk) {
      in_use += entry.buffer.size();
      ++shards;
    }
  }
  throw Error(ErrorKind::resource,
              fmt::format("no pinned memory to fetch '{}' ({}) after {} ms: {} shard(s) fetched "
                          "or being read hold {} and the {} pool has no room; release shards "
                          "before fetching more (planned: {} buffer(s) of {})",
                          key, format_bytes(bytes), options_.memory_wait.count(), shards,
                          format_bytes(in_use), format_bytes(pool_.stats().capacity_bytes),
                          plan_.buffer_count, format_bytes(plan_.buffer_bytes)));
}

void ParamSwapper::start_read(const std::string& key, Entry& entry, PinnedBuffer buffer) {
  entry.ticket = store_.read(key, buffer.span());  // may throw: the lease goes back
  entry.buffer = std::move(buffer);
  entry.state = State::reading;
  entry.error = nullptr;
  stats_.bytes_read += entry.bytes;
}

void ParamSwapper::swap_out(std::string_view key, std::span<const std::byte> data) {
  std::unique_lock lock(mutex_);
  Entry& e = entry(key);
  if (data.size() != e.bytes) {
    throw Error(ErrorKind::invalid, fmt::format("swap_out of '{}': {} bytes given, {} planned",
                                                key, data.size(), e.bytes));
  }
  if (e.users > 0 || e.state == State::reading) {
    throw Error(ErrorKind::invalid,
                fmt::format("swap_out of '{}' while it is {}: release it first", key,
                            e.users > 0 ? "fetched" : "being read"));
  }
  e.error = nullptr;  // a failed read of the old content no longer matters
  if (e.cached) {  // the host copy is about to be stale
    lru_.erase(e.lru);
    e.cached = false;
    cached_bytes_ -= e.buffer.size();
    e.buffer.release();
    e.state = State::on_disk;
  }
  auto staging = *lease(key, store_.padded_size(e.bytes), true, lock);
  std::memcpy(staging.data(), data.data(), data.size());
  e.state = State::reading;  // nobody may fetch it half-written
  lock.unlock();
  try {
    store_.write_sync(key, staging.span(), data.size());
  } catch (...) {
    lock.lock();
    e.state = State::on_disk;
    changed_.notify_all();
    throw;
  }
  lock.lock();
  stats_.bytes_written += data.size();
  // Keep the fresh copy as a cached host copy (max_in_cpu).
  e.buffer = std::move(staging);
  e.state = State::resident;
  e.cached = true;
  e.lru = lru_.insert(lru_.end(), std::string(key));
  cached_bytes_ += e.buffer.size();
  trim_cache();
  changed_.notify_all();
}

std::size_t ParamSwapper::prefetch(std::span<const std::string> keys) {
  std::unique_lock lock(mutex_);
  std::size_t started = 0;
  try {
    for (const auto& key : keys) {
      Entry& e = entry(key);
      if (e.state != State::on_disk) continue;
      auto buffer = lease(key, store_.padded_size(e.bytes), false, lock);
      if (!buffer) break;  // memory is full of shards in use: fetch() will read the rest
      start_read(key, e, std::move(*buffer));
      e.prefetched = true;
      prefetched_.push_back(key);
      ++started;
    }
  } catch (...) {
    // The reads already started must still be completed.
    if (started > 0) prefetch_queued_.notify_one();
    throw;
  }
  if (started > 0) prefetch_queued_.notify_one();
  return started;
}

std::span<const std::byte> ParamSwapper::fetch(std::string_view key) {
  std::unique_lock lock(mutex_);
  const auto started = Clock::now();
  Entry& e = entry(key);
  ++stats_.fetches;
  bool waited_for_prefetch = false;
  while (true) {
    if (e.error) {  // a read of this shard failed (a prefetch, or another thread's)
      std::exception_ptr error = e.error;
      e.error = nullptr;
      std::rethrow_exception(error);
    }
    if (e.state == State::resident) {
      if (e.cached) {
        lru_.erase(e.lru);
        e.cached = false;
        cached_bytes_ -= e.buffer.size();
      }
      if (e.prefetched || waited_for_prefetch) {
        ++stats_.prefetch_hits;
      } else {
        ++stats_.cache_hits;
      }
      e.prefetched = false;
      break;
    }
    if (e.state == State::on_disk) {
      ++stats_.misses;
      auto buffer = lease(key, store_.padded_size(e.bytes), true, lock);
      start_read(std::string(key), e, std::move(*buffer));
      // This thread started the read: it waits for it.
      if (std::exception_ptr error = finish_read(e, lock)) std::rethrow_exception(error);
      e.prefetched = false;
      break;
    }
    // Being read by the completer (a prefetch) or by another fetch: wait,
    // then look again (it may have been cached, evicted or failed since).
    waited_for_prefetch = waited_for_prefetch || e.prefetched;
    changed_.wait(lock);
  }
  ++e.users;
  stats_.fetch_wait += Clock::now() - started;
  return {e.buffer.data(), e.bytes};
}

void ParamSwapper::release(std::string_view key) {
  std::lock_guard lock(mutex_);
  Entry& e = entry(key);
  ZINF_CHECK(e.users > 0 && e.state == State::resident,
             fmt::format("release of '{}' without a fetch", key));
  if (--e.users > 0) return;
  e.cached = true;
  e.lru = lru_.insert(lru_.end(), std::string(key));
  cached_bytes_ += e.buffer.size();
  trim_cache();
  changed_.notify_all();
}

ParamSwapperStats ParamSwapper::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

bool ParamSwapper::resident(std::string_view key) const {
  std::lock_guard lock(mutex_);
  const auto it = entries_.find(std::string(key));
  return it != entries_.end() && it->second.state == State::resident;
}

std::uint64_t ParamSwapper::cached_bytes() const {
  std::lock_guard lock(mutex_);
  return cached_bytes_;
}

}  // namespace zinf::swap

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

std::uint64_t round_up(std::uint64_t value, std::uint64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

std::uint64_t padded(std::uint64_t bytes, std::uint64_t alignment) {
  return std::max(round_up(bytes, alignment), alignment);
}

// How long fetch() waits for another thread to release memory before it
// reports the pool as exhausted.
constexpr auto kMemoryWait = std::chrono::seconds(10);

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
  plan.buffer_bytes = round_up(std::max<std::uint64_t>(options.buffer_bytes, 1), alignment);
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
      e.error = error;
      e.buffer.release();
      e.state = State::on_disk;
    } else {
      e.state = State::resident;
    }
    changed_.notify_all();
  }
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

std::optional<PinnedBuffer> ParamSwapper::lease(std::uint64_t bytes, bool may_block,
                                                std::unique_lock<std::mutex>& lock) {
  const auto deadline = Clock::now() + kMemoryWait;
  while (true) {
    if (auto buffer = pool_.try_acquire(bytes)) return buffer;
    if (!lru_.empty()) {
      evict_one();
      continue;
    }
    if (!may_block) return std::nullopt;
    // Everything resident is in use: wait for a release by another thread.
    if (changed_.wait_until(lock, deadline) == std::cv_status::timeout) {
      std::uint64_t in_use = 0;
      std::size_t shards = 0;
      for (const auto& [key, entry] : entries_) {
        if (entry.state != State::on_disk) {
          in_use += entry.buffer.size();
          ++shards;
        }
      }
      throw Error(ErrorKind::resource,
                  fmt::format("no pinned memory for a {} shard: {} shard(s) fetched or being "
                              "read hold {} of the {} pool; release shards before fetching "
                              "more (planned: {} buffer(s) of {})",
                              format_bytes(bytes), shards, format_bytes(in_use),
                              format_bytes(pool_.stats().capacity_bytes), plan_.buffer_count,
                              format_bytes(plan_.buffer_bytes)));
    }
  }
}

void ParamSwapper::start_read(const std::string& key, Entry& entry, PinnedBuffer buffer) {
  entry.buffer = std::move(buffer);
  entry.ticket = store_.read(key, entry.buffer.span());
  entry.state = State::reading;
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
  if (e.cached) {  // the host copy is about to be stale
    lru_.erase(e.lru);
    e.cached = false;
    cached_bytes_ -= e.buffer.size();
    e.buffer.release();
    e.state = State::on_disk;
  }
  auto staging = *lease(store_.padded_size(e.bytes), true, lock);
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
  for (const auto& key : keys) {
    Entry& e = entry(key);
    if (e.state != State::on_disk) continue;
    auto buffer = lease(store_.padded_size(e.bytes), false, lock);
    if (!buffer) break;  // memory is full of shards in use: fetch() will read the rest
    start_read(key, e, std::move(*buffer));
    e.prefetched = true;
    prefetched_.push_back(key);
    ++started;
  }
  if (started > 0) prefetch_queued_.notify_one();
  return started;
}

std::span<const std::byte> ParamSwapper::fetch(std::string_view key) {
  std::unique_lock lock(mutex_);
  const auto started = Clock::now();
  Entry& e = entry(key);
  ++stats_.fetches;
  const auto take_error = [&] {
    if (!e.error) return;
    std::exception_ptr error = e.error;
    e.error = nullptr;
    std::rethrow_exception(error);
  };
  take_error();  // a prefetch that already failed
  if (e.state == State::resident) {
    if (e.cached) {
      lru_.erase(e.lru);
      e.cached = false;
      cached_bytes_ -= e.buffer.size();
    }
    if (e.prefetched) {
      ++stats_.prefetch_hits;  // read and verified before it was asked for
      e.prefetched = false;
    } else {
      ++stats_.cache_hits;
    }
    ++e.users;
    return {e.buffer.data(), e.bytes};
  }
  if (e.state == State::on_disk) {
    ++stats_.misses;
    auto buffer = lease(store_.padded_size(e.bytes), true, lock);
    start_read(std::string(key), e, std::move(*buffer));
  } else if (e.prefetched) {
    ++stats_.prefetch_hits;
  }
  e.prefetched = false;
  if (e.ticket.valid() && std::find(prefetched_.begin(), prefetched_.end(), key) == prefetched_.end()) {
    // This thread started the read: it waits for it.
    const SwapTicket ticket = e.ticket;
    e.ticket = {};
    lock.unlock();
    try {
      store_.wait(ticket);
    } catch (...) {
      lock.lock();
      e.buffer.release();
      e.state = State::on_disk;
      changed_.notify_all();
      throw;
    }
    lock.lock();
    e.state = State::resident;
    changed_.notify_all();
  } else {
    // The completer (or another fetching thread) finishes this read.
    changed_.wait(lock, [&] { return e.state != State::reading; });
    take_error();
    if (e.state != State::resident) {
      throw Error(ErrorKind::io, fmt::format("fetch of '{}' failed in another thread", key));
    }
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

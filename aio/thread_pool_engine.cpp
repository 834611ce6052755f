#include "aio/thread_pool_engine.hpp"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "aio/file.hpp"
#include "core/error.hpp"

namespace zinf::aio {

std::int64_t PosixDevice::transfer(Op op, const File& file, std::uint64_t offset_bytes,
                                   std::byte* buffer, std::uint64_t length_bytes) {
  const ssize_t result =
      op == Op::read
          ? ::pread(file.fd(), buffer, length_bytes, static_cast<off_t>(offset_bytes))
          : ::pwrite(file.fd(), buffer, length_bytes, static_cast<off_t>(offset_bytes));
  return result < 0 ? -static_cast<std::int64_t>(errno) : result;
}

std::int64_t MemoryDevice::transfer(Op op, const File& file, std::uint64_t offset_bytes,
                                    std::byte* buffer, std::uint64_t length_bytes) {
  std::lock_guard lock(mutex_);
  auto it = files_.find(file.path());
  if (op == Op::read) {
    if (it == files_.end() || offset_bytes >= it->second.size()) return 0;  // EOF
    const std::uint64_t count = std::min(length_bytes, it->second.size() - offset_bytes);
    std::memcpy(buffer, it->second.data() + offset_bytes, count);
    return static_cast<std::int64_t>(count);
  }
  if (it == files_.end()) it = files_.emplace(file.path(), std::vector<std::byte>{}).first;
  std::vector<std::byte>& data = it->second;
  std::uint64_t count = length_bytes;
  const std::uint64_t end = offset_bytes + length_bytes;
  if (end > data.size()) {
    const std::uint64_t growth = end - data.size();
    if (capacity_bytes_ && stored_bytes_ + growth > *capacity_bytes_) {
      const std::uint64_t room = *capacity_bytes_ - stored_bytes_;
      if (offset_bytes >= data.size() + room) return -ENOSPC;
      count = data.size() + room - offset_bytes;  // fill up to the limit
    }
    const std::uint64_t new_size = std::max<std::uint64_t>(data.size(), offset_bytes + count);
    stored_bytes_ += new_size - data.size();
    data.resize(new_size);
  }
  std::memcpy(data.data() + offset_bytes, buffer, count);
  return static_cast<std::int64_t>(count);
}

std::vector<std::byte> MemoryDevice::contents(const std::string& path) const {
  std::lock_guard lock(mutex_);
  auto it = files_.find(path);
  return it == files_.end() ? std::vector<std::byte>{} : it->second;
}

std::uint64_t MemoryDevice::stored_bytes() const {
  std::lock_guard lock(mutex_);
  return stored_bytes_;
}

FaultInjectingDevice::FaultInjectingDevice(std::unique_ptr<SyncDevice> inner, FaultPlan plan)
    : inner_(std::move(inner)),
      plan_(std::move(plan)),
      random_(plan_.seed),
      error_hits_(plan_.errors.size(), 0) {}

std::uint64_t FaultInjectingDevice::faults_injected() const {
  std::lock_guard lock(mutex_);
  return faults_injected_;
}

std::int64_t FaultInjectingDevice::transfer(Op op, const File& file, std::uint64_t offset_bytes,
                                            std::byte* buffer, std::uint64_t length_bytes) {
  std::chrono::microseconds delay{0};
  std::uint64_t length = length_bytes;
  {
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < plan_.errors.size(); ++i) {
      const InjectedError& fault = plan_.errors[i];
      const bool overlaps = offset_bytes < fault.offset_end &&
                            fault.offset_begin < offset_bytes + length_bytes;
      if (fault.op == op && overlaps && error_hits_[i] < fault.times &&
          file.path().find(fault.path_contains) != std::string::npos) {
        ++error_hits_[i];
        ++faults_injected_;
        return -fault.error_number;
      }
    }
    std::uniform_real_distribution<double> chance(0.0, 1.0);
    if (storm_left_ == 0 && plan_.eagain_rate > 0 && chance(random_) < plan_.eagain_rate) {
      storm_left_ = plan_.eagain_storm_length;
    }
    if (storm_left_ > 0) {
      --storm_left_;
      ++faults_injected_;
      return -EAGAIN;
    }
    if (plan_.short_transfer_rate > 0 && chance(random_) < plan_.short_transfer_rate) {
      // Keep O_DIRECT's alignment so the rest can be resubmitted, as the
      // kernel does when it cuts a direct transfer short.
      const std::uint64_t unit = std::max<std::uint64_t>(1, file.offset_alignment());
      if (length_bytes > unit) {
        std::uniform_int_distribution<std::uint64_t> cut(1, (length_bytes - 1) / unit);
        length = cut(random_) * unit;
        ++faults_injected_;
      }
    }
    delay = plan_.latency;
    if (plan_.latency_jitter.count() > 0) {
      std::uniform_int_distribution<std::int64_t> jitter(0, plan_.latency_jitter.count() - 1);
      delay += std::chrono::microseconds(jitter(random_));
    }
  }
  if (delay.count() > 0) std::this_thread::sleep_for(delay);
  return inner_->transfer(op, file, offset_bytes, buffer, length);
}

ThreadPoolEngine::ThreadPoolEngine(const AioOptions& options, std::unique_ptr<SyncDevice> device,
                                   std::size_t workers, std::string name)
    : Engine(options), device_(std::move(device)), name_(std::move(name)) {
  workers_.reserve(workers);
  try {
    for (std::size_t i = 0; i < workers; ++i) {
      workers_.emplace_back([this, i] {
        const std::string thread_name = fmt::format("zinf-{}-{}", name_, i).substr(0, 15);
        pthread_setname_np(pthread_self(), thread_name.c_str());
        run_worker();
      });
    }
  } catch (...) {
    stop_workers();
    throw;
  }
}

ThreadPoolEngine::~ThreadPoolEngine() {
  drain();
  stop_workers();
}

void ThreadPoolEngine::stop_workers() noexcept {
  {
    std::lock_guard lock(queue_mutex_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  for (std::thread& worker : workers_) {
    if (worker.joinable()) worker.join();
  }
}

std::string ThreadPoolEngine::description() const {
  return fmt::format("{}: {} thread(s), block {} B", name_, workers_.size(),
                     options().block_size);
}

void ThreadPoolEngine::enqueue(std::span<Piece*> pieces) {
  {
    std::lock_guard lock(queue_mutex_);
    queue_.insert(queue_.end(), pieces.begin(), pieces.end());
  }
  if (pieces.size() == 1) {
    queue_cv_.notify_one();
  } else {
    queue_cv_.notify_all();
  }
}

void ThreadPoolEngine::run_worker() {
  for (;;) {
    Piece* piece = nullptr;
    {
      std::unique_lock lock(queue_mutex_);
      queue_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, nothing left
      piece = queue_.front();
      queue_.pop_front();
    }
    std::int64_t result = 0;
    do {
      result = device_->transfer(piece->op, *piece->file, piece->next_offset(),
                                 piece->next_buffer(), piece->remaining_bytes());
      if (result == -EAGAIN) std::this_thread::yield();
    } while (complete(*piece, result));
  }
}

std::unique_ptr<ThreadPoolEngine> make_posix_engine(const AioOptions& options) {
  validate(options);
  const std::size_t workers = std::clamp<std::size_t>(
      static_cast<std::size_t>(options.intra_op_parallelism) * options.queue_depth, 1, 128);
  return std::make_unique<ThreadPoolEngine>(options, std::make_unique<PosixDevice>(), workers,
                                            "posix");
}

std::unique_ptr<ThreadPoolEngine> make_memory_engine(const AioOptions& options, FaultPlan plan,
                                                     std::optional<std::uint64_t> capacity_bytes) {
  validate(options);
  const std::size_t workers = std::clamp<std::size_t>(
      static_cast<std::size_t>(options.intra_op_parallelism) * options.queue_depth, 1, 128);
  auto device = std::make_unique<FaultInjectingDevice>(
      std::make_unique<MemoryDevice>(capacity_bytes), std::move(plan));
  return std::make_unique<ThreadPoolEngine>(options, std::move(device), workers, "memory");
}

}  // namespace zinf::aio

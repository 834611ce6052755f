#include "swap/strict_device.hpp"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <unordered_set>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"

namespace zinf::swap {
namespace {

[[noreturn]] void misuse(const std::string& message) {
  std::fprintf(stderr, "zinf strict device: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

class StrictDeviceImpl final : public StrictDevice {
 public:
  explicit StrictDeviceImpl(StrictDeviceOptions options)
      : options_(options), random_(options.seed), thread_([this] { run(); }) {}

  ~StrictDeviceImpl() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      for (auto& stream : streams_) stream->stopping = true;
    }
    queued_.notify_all();
    for (auto& stream : streams_) {
      stream->queued.notify_all();
      stream->thread.join();
    }
    thread_.join();
    for (auto& [address, allocation] : allocations_) unmap(address, allocation);
  }

  // -- compute streams ----------------------------------------------------------
  void* create_stream() override {
    auto stream = std::make_unique<Stream>();
    Stream* raw = stream.get();
    std::lock_guard lock(mutex_);
    streams_.push_back(std::move(stream));
    raw->thread = std::thread([this, raw] { run_stream(*raw); });
    return raw;
  }

  void launch(void* stream, std::function<void()> kernel) override {
    std::lock_guard lock(mutex_);
    Stream& s = stream_of(stream);
    s.items.push_back(StreamItem{std::move(kernel), 0});
    s.queued.notify_one();
  }

  void synchronize(void* stream) override {
    const CopyTicket ticket = record_stream(stream);
    wait(ticket);
  }

  CopyTicket record_stream(void* stream) override {
    std::lock_guard lock(mutex_);
    const std::uint64_t id = ++submitted_;
    outstanding_.insert(id);
    if (stream == nullptr) {
      finished_.insert(id);  // the default stream: the host trainer's work is done
    } else {
      Stream& s = stream_of(stream);
      s.items.push_back(StreamItem{{}, id});
      s.queued.notify_one();
    }
    return CopyTicket{id};
  }

  // -- memory ---------------------------------------------------------------
  void* allocate_device(std::uint64_t bytes) override {
    const std::uint64_t page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    const std::uint64_t mapped = (std::max<std::uint64_t>(bytes, 1) + page - 1) / page * page;
    {
      std::lock_guard lock(mutex_);
      if (options_.capacity_bytes != 0 && in_use_ + bytes > options_.capacity_bytes) {
        throw Error(ErrorKind::resource,
                    fmt::format("strict device: out of memory allocating {} bytes ({} in use of {})", bytes,
                                in_use_, options_.capacity_bytes));
      }
    }
    const int fd = ::memfd_create("zinf-strict-device", MFD_CLOEXEC);
    if (fd < 0) throw_path_error("memfd_create", "zinf-strict-device", errno);
    if (::ftruncate(fd, static_cast<off_t>(mapped)) != 0) {
      const int error = errno;
      ::close(fd);
      throw Error(ErrorKind::resource, fmt::format("strict device: cannot reserve {} bytes: {}", mapped,
                                                   std::strerror(error)));
    }
    void* device = ::mmap(nullptr, mapped, PROT_NONE, MAP_SHARED, fd, 0);
    void* view = device == MAP_FAILED ? MAP_FAILED : ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);
    if (device == MAP_FAILED || view == MAP_FAILED) {
      if (device != MAP_FAILED) ::munmap(device, mapped);
      throw Error(ErrorKind::resource, fmt::format("strict device: cannot map {} bytes", mapped));
    }
    // Fresh device memory is not zeroed on a GPU either.
    std::memset(view, 0xFF, mapped);
    std::lock_guard lock(mutex_);
    allocations_[reinterpret_cast<std::uintptr_t>(device)] = Allocation{static_cast<std::byte*>(view), bytes, mapped};
    in_use_ += bytes;
    peak_ = std::max(peak_, in_use_);
    return device;
  }

  void free_device(void* device) noexcept override {
    if (device == nullptr) return;
    std::unique_lock lock(mutex_);
    const auto it = allocations_.find(reinterpret_cast<std::uintptr_t>(device));
    if (it == allocations_.end()) {
      misuse(fmt::format("free_device({}): not the start of a live device allocation", device));
    }
    for (const Op& op : ops_) {
      if (op.allocation == it->first) {
        misuse(fmt::format("free_device({}): a queued copy still uses it (wait for the copy first)", device));
      }
    }
    if (running_ == it->first) misuse(fmt::format("free_device({}): a copy is running on it", device));
    const Allocation allocation = it->second;
    allocations_.erase(it);
    in_use_ -= allocation.bytes;
    lock.unlock();
    unmap(reinterpret_cast<std::uintptr_t>(device), allocation);
  }

  bool is_device(const void* pointer, std::uint64_t bytes) const override {
    std::lock_guard lock(mutex_);
    return find(pointer, bytes) != nullptr;
  }

  std::byte* access(const void* device, std::uint64_t bytes, const char* what) const override {
    std::lock_guard lock(mutex_);
    std::byte* view = find(device, bytes);
    if (view == nullptr) {
      throw Error(ErrorKind::invalid,
                  fmt::format("{}: {} bytes at {} are not device memory (a host pointer where the device "
                              "needs device memory)", what, bytes, device));
    }
    return view;
  }

  std::uint64_t bytes_in_use() const override {
    std::lock_guard lock(mutex_);
    return in_use_;
  }
  std::uint64_t peak_bytes() const override {
    std::lock_guard lock(mutex_);
    return peak_;
  }
  std::uint64_t live_allocations() const override {
    std::lock_guard lock(mutex_);
    return allocations_.size();
  }

  // -- copies -----------------------------------------------------------------
  CopyTicket to_device(void* device, const std::byte* host, std::uint64_t bytes) override {
    ZINF_CHECK(device != nullptr && host != nullptr, "device copy of a null buffer");
    std::lock_guard lock(mutex_);
    std::byte* view = checked_device(device, bytes, "to_device destination");
    checked_host(host, bytes, "to_device source");
    std::memset(view, 0xFF, bytes);  // in flight: what a reader sees without waiting
    return queue(Op{view, host, bytes, allocation_of(device), 0});
  }

  CopyTicket to_host(std::byte* host, const void* device, std::uint64_t bytes) override {
    ZINF_CHECK(device != nullptr && host != nullptr, "device copy of a null buffer");
    std::lock_guard lock(mutex_);
    const std::byte* view = checked_device(device, bytes, "to_host source");
    checked_host(host, bytes, "to_host destination");
    std::memset(host, 0xFF, bytes);
    return queue(Op{host, view, bytes, allocation_of(device), 0});
  }

  CopyTicket fill_zero(void* device, std::uint64_t bytes) override {
    ZINF_CHECK(device != nullptr, "fill_zero of a null buffer");
    std::lock_guard lock(mutex_);
    std::byte* view = checked_device(device, bytes, "fill_zero");
    std::memset(view, 0xFF, bytes);
    return queue(Op{view, nullptr, bytes, allocation_of(device), 0});
  }

  void wait(CopyTicket ticket) override {
    std::unique_lock lock(mutex_);
    if (!ticket.valid() || outstanding_.count(ticket.id) == 0) {
      throw Error(ErrorKind::invalid,
                  fmt::format("strict device: wait on copy ticket {} that is unknown or already waited for",
                              ticket.id));
    }
    done_.wait(lock, [&] { return finished_.count(ticket.id) != 0; });
    finished_.erase(ticket.id);
    outstanding_.erase(ticket.id);
  }

  std::string_view name() const override { return "strict device stand-in"; }

 private:
  struct Allocation {
    std::byte* view;
    std::uint64_t bytes;   // asked for
    std::uint64_t mapped;  // whole pages
  };
  struct StreamItem {
    std::function<void()> kernel;  // empty for a marker
    std::uint64_t marker;          // the ticket it completes, or 0
  };
  struct Stream {
    std::deque<StreamItem> items;
    std::condition_variable queued;
    bool stopping = false;
    std::thread thread;
  };

  Stream& stream_of(void* stream) {
    for (auto& s : streams_) {
      if (s.get() == stream) return *s;
    }
    throw Error(ErrorKind::invalid, fmt::format("strict device: {} is not one of its streams", stream));
  }

  void run_stream(Stream& stream) {
    std::unique_lock lock(mutex_);
    for (;;) {
      stream.queued.wait(lock, [&] { return stream.stopping || !stream.items.empty(); });
      if (stream.items.empty()) return;
      StreamItem item = std::move(stream.items.front());
      stream.items.pop_front();
      if (item.kernel) {
        const auto delay = next_delay();
        lock.unlock();
        if (delay.count() > 0) std::this_thread::sleep_for(delay);
        item.kernel();
        lock.lock();
      } else {
        finished_.insert(item.marker);
        done_.notify_all();
      }
    }
  }

  std::chrono::microseconds next_delay() {
    return std::chrono::microseconds(
        options_.max_delay.count() > 0 ? random_() % static_cast<std::uint64_t>(options_.max_delay.count() + 1) : 0);
  }

  struct Op {
    void* destination;
    const void* source;  // null: fill with zeros
    std::uint64_t bytes;
    std::uintptr_t allocation;
    std::uint64_t id;
  };

  static void unmap(std::uintptr_t device, const Allocation& allocation) {
    ::munmap(reinterpret_cast<void*>(device), allocation.mapped);
    ::munmap(allocation.view, allocation.mapped);
  }

  // Caller holds mutex_. The view of [pointer, pointer + bytes) or null.
  std::byte* find(const void* pointer, std::uint64_t bytes) const {
    const auto address = reinterpret_cast<std::uintptr_t>(pointer);
    auto it = allocations_.upper_bound(address);
    if (it == allocations_.begin()) return nullptr;
    --it;
    const std::uint64_t offset = address - it->first;
    if (offset > it->second.bytes || bytes > it->second.bytes - offset) return nullptr;
    return it->second.view + offset;
  }
  std::uintptr_t allocation_of(const void* device) const {
    auto it = allocations_.upper_bound(reinterpret_cast<std::uintptr_t>(device));
    return (--it)->first;
  }
  std::byte* checked_device(const void* device, std::uint64_t bytes, const char* what) const {
    std::byte* view = find(device, bytes);
    if (view == nullptr) {
      throw Error(ErrorKind::invalid,
                  fmt::format("strict device: {} ({} bytes at {}) is not device memory", what, bytes, device));
    }
    return view;
  }
  void checked_host(const void* host, std::uint64_t bytes, const char* what) const {
    const auto start = reinterpret_cast<std::uintptr_t>(host);
    for (const auto& [address, allocation] : allocations_) {
      if (start < address + allocation.mapped && address < start + bytes) {
        throw Error(ErrorKind::invalid,
                    fmt::format("strict device: {} ({} bytes at {}) is device memory, not host memory", what,
                                bytes, host));
      }
    }
  }

  CopyTicket queue(Op op) {
    op.id = ++submitted_;
    outstanding_.insert(op.id);
    ops_.push_back(op);
    queued_.notify_one();
    return CopyTicket{op.id};
  }

  void run() {
    std::unique_lock lock(mutex_);
    for (;;) {
      queued_.wait(lock, [&] { return stopping_ || !ops_.empty(); });
      if (ops_.empty()) return;
      const Op op = ops_.front();
      ops_.pop_front();
      running_ = op.allocation;
      const auto delay = next_delay();
      lock.unlock();
      // The copy lands later than the caller's next line, as on a stream.
      if (delay.count() > 0) std::this_thread::sleep_for(delay);
      if (op.source == nullptr) std::memset(op.destination, 0, op.bytes);
      else std::memcpy(op.destination, op.source, op.bytes);
      lock.lock();
      running_ = 0;
      finished_.insert(op.id);
      done_.notify_all();
    }
  }

  StrictDeviceOptions options_;
  mutable std::mutex mutex_;
  std::condition_variable queued_;
  std::condition_variable done_;
  std::map<std::uintptr_t, Allocation> allocations_;
  std::uint64_t in_use_ = 0;
  std::uint64_t peak_ = 0;
  std::deque<Op> ops_;
  std::unordered_set<std::uint64_t> outstanding_;  // issued, not yet waited for
  std::unordered_set<std::uint64_t> finished_;     // done, not yet waited for
  std::vector<std::unique_ptr<Stream>> streams_;
  std::uint64_t submitted_ = 0;
  std::uintptr_t running_ = 0;
  bool stopping_ = false;
  std::mt19937_64 random_;
  std::thread thread_;
};

}  // namespace

std::shared_ptr<StrictDevice> make_strict_device(StrictDeviceOptions options) {
  return std::make_shared<StrictDeviceImpl>(options);
}

}  // namespace zinf::swap

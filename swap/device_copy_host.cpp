// The host stand-in for a GPU: "device memory" is ordinary memory and one
// copy thread runs the copies in order, as a CUDA stream would.
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_set>

#include <fmt/format.h>

#include "core/error.hpp"
#include "swap/device_copy.hpp"

namespace zinf::swap {
namespace {

class HostCopier final : public DeviceCopier {
 public:
  HostCopier() : thread_([this] { run(); }) {}
  ~HostCopier() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    queued_.notify_all();
    thread_.join();
  }

  void* allocate_device(std::uint64_t bytes) override {
    void* memory = std::malloc(bytes == 0 ? 1 : bytes);
    if (memory == nullptr) {
      throw Error(ErrorKind::resource,
                  fmt::format("host stand-in device: cannot allocate {} bytes", bytes));
    }
    return memory;
  }
  void free_device(void* device) noexcept override { std::free(device); }

  CopyTicket to_device(void* device, const std::byte* host, std::uint64_t bytes) override {
    return queue(device, host, bytes);
  }
  CopyTicket to_host(std::byte* host, const void* device, std::uint64_t bytes) override {
    return queue(host, device, bytes);
  }
  CopyTicket fill_zero(void* device, std::uint64_t bytes) override {
    ZINF_CHECK(device != nullptr, "fill_zero of a null buffer");
    return queue(device, nullptr, bytes, true);
  }
  // A host trainer computes synchronously: its work is done when it calls.
  CopyTicket record_stream(void*) override {
    static std::byte nothing{};
    return queue(&nothing, &nothing, 0);
  }

  void wait(CopyTicket ticket) override {
    std::unique_lock lock(mutex_);
    // As the CUDA copier: a ticket is waited for once.
    if (!ticket.valid() || outstanding_.erase(ticket.id) == 0) {
      throw Error(ErrorKind::invalid,
                  fmt::format("wait on copy ticket {} that is unknown or already waited for", ticket.id));
    }
    done_.wait(lock, [&] { return completed_ >= ticket.id; });
  }

  std::string_view name() const override { return "host stand-in"; }
  bool host_accessible() const override { return true; }

 private:
  struct Copy {
    void* destination;
    const void* source;  // null: zero the destination
    std::uint64_t bytes;
    std::uint64_t id;
  };

  CopyTicket queue(void* destination, const void* source, std::uint64_t bytes, bool zero = false) {
    ZINF_CHECK(destination != nullptr && (source != nullptr || zero), "device copy of a null buffer");
    std::lock_guard lock(mutex_);
    const std::uint64_t id = ++submitted_;
    outstanding_.insert(id);
    copies_.push_back(Copy{destination, source, bytes, id});
    queued_.notify_one();
    return CopyTicket{id};
  }

  void run() {
    std::unique_lock lock(mutex_);
    while (true) {
      queued_.wait(lock, [&] { return stopping_ || !copies_.empty(); });
      if (copies_.empty()) return;
      const Copy copy = copies_.front();
      copies_.pop_front();
      lock.unlock();
      if (copy.source == nullptr) std::memset(copy.destination, 0, copy.bytes);
      else std::memcpy(copy.destination, copy.source, copy.bytes);
      lock.lock();
      completed_ = copy.id;
      done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable queued_;
  std::condition_variable done_;
  std::deque<Copy> copies_;
  std::unordered_set<std::uint64_t> outstanding_;  // issued, not yet waited for
  std::uint64_t submitted_ = 0;
  std::uint64_t completed_ = 0;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace

std::unique_ptr<DeviceCopier> make_host_copier() { return std::make_unique<HostCopier>(); }

std::unique_ptr<DeviceCopier> make_device_copier(DeviceKind kind, int device_index) {
  if (kind == DeviceKind::host) return make_host_copier();
  auto cuda = make_cuda_copier(device_index);
  if (cuda) return cuda;
  if (kind == DeviceKind::cuda) {
    throw Error(ErrorKind::unsupported,
                fmt::format("no CUDA device {} is visible (or zinf was built without CUDA)",
                            device_index));
  }
  return make_host_copier();
}

}  // namespace zinf::swap

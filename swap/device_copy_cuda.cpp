// The CUDA device tier: copies on one non-blocking stream of the chosen
// device, each followed by an event the ticket waits on. Host buffers should
// be pinned-pool memory (registered with CUDA), or the copies run at
// pageable speed and are not truly asynchronous.
#include <cuda_runtime_api.h>

#include <mutex>
#include <unordered_map>

#include <fmt/format.h>

#include "core/error.hpp"
#include "swap/device_copy.hpp"

namespace zinf::swap {
namespace {

void check(cudaError_t status, std::string_view what) {
  if (status != cudaSuccess) {
    throw Error(status == cudaErrorMemoryAllocation ? ErrorKind::resource : ErrorKind::io,
                fmt::format("CUDA {} failed: {} ({})", what, cudaGetErrorString(status),
                            cudaGetErrorName(status)));
  }
}

class CudaCopier final : public DeviceCopier {
 public:
  explicit CudaCopier(int device) : device_(device) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~CudaCopier() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    for (auto& [id, event] : events_) cudaEventDestroy(event);
    cudaStreamDestroy(stream_);
  }

  void* allocate_device(std::uint64_t bytes) override {
    check(cudaSetDevice(device_), "cudaSetDevice");
    void* memory = nullptr;
    check(cudaMalloc(&memory, bytes == 0 ? 1 : bytes), fmt::format("cudaMalloc of {} bytes", bytes));
    return memory;
  }
  void free_device(void* device) noexcept override { cudaFree(device); }

  CopyTicket to_device(void* device, const std::byte* host, std::uint64_t bytes) override {
    return queue(device, host, bytes, cudaMemcpyHostToDevice);
  }
  CopyTicket to_host(std::byte* host, const void* device, std::uint64_t bytes) override {
    return queue(host, device, bytes, cudaMemcpyDeviceToHost);
  }
  CopyTicket record_stream(void* stream) override {
    std::lock_guard lock(mutex_);
    check(cudaSetDevice(device_), "cudaSetDevice");
    cudaEvent_t event = nullptr;
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    const cudaError_t status = cudaEventRecord(event, static_cast<cudaStream_t>(stream));
    if (status != cudaSuccess) {
      cudaEventDestroy(event);
      check(status, "cudaEventRecord on the compute stream");
    }
    const std::uint64_t id = ++next_id_;
    events_.emplace(id, event);
    return CopyTicket{id};
  }

  CopyTicket fill_zero(void* device, std::uint64_t bytes) override {
    ZINF_CHECK(device != nullptr, "fill_zero of a null buffer");
    return enqueue([&] { return cudaMemsetAsync(device, 0, bytes, stream_); }, "cudaMemsetAsync");
  }

  void wait(CopyTicket ticket) override {
    cudaEvent_t event = nullptr;
    {
      std::lock_guard lock(mutex_);
      const auto it = events_.find(ticket.id);
      if (it == events_.end()) {
        throw Error(ErrorKind::invalid,
                    fmt::format("wait on copy ticket {} that is unknown or already waited for", ticket.id));
      }
      event = it->second;
      events_.erase(it);
    }
    const cudaError_t status = cudaEventSynchronize(event);
    cudaEventDestroy(event);
    check(status, "copy");
  }

  std::string_view name() const override { return "cuda"; }

 private:
  CopyTicket queue(void* destination, const void* source, std::uint64_t bytes,
                   cudaMemcpyKind kind) {
    ZINF_CHECK(destination != nullptr && source != nullptr, "device copy of a null buffer");
    return enqueue([&] { return cudaMemcpyAsync(destination, source, bytes, kind, stream_); },
                   "cudaMemcpyAsync");
  }

  // Queues `operation` on the stream followed by an event the ticket waits on.
  template <class Operation>
  CopyTicket enqueue(Operation operation, const char* what) {
    std::lock_guard lock(mutex_);
    check(cudaSetDevice(device_), "cudaSetDevice");
    // The event exists before the copy is queued, so a failure after the
    // copy started cannot leave it running without a ticket.
    cudaEvent_t event = nullptr;
    check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    cudaError_t status = operation();
    if (status == cudaSuccess) status = cudaEventRecord(event, stream_);
    if (status != cudaSuccess) {
      cudaStreamSynchronize(stream_);  // whatever was queued is done with the buffers
      cudaEventDestroy(event);
      check(status, what);
    }
    const std::uint64_t id = ++next_id_;
    events_.emplace(id, event);
    return CopyTicket{id};
  }

  int device_;
  cudaStream_t stream_ = nullptr;
  std::mutex mutex_;
  std::unordered_map<std::uint64_t, cudaEvent_t> events_;
  std::uint64_t next_id_ = 0;
};

}  // namespace

std::unique_ptr<DeviceCopier> make_cuda_copier(int device_index) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device_index < 0 || device_index >= count) {
    return nullptr;
  }
  return std::make_unique<CudaCopier>(device_index);
}

}  // namespace zinf::swap

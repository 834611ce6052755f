// The device tier: asynchronous copies between pinned host buffers and
// device memory. The CUDA engine (device_copy_cuda.cpp, built when the build
// finds CUDA) runs them on its own stream and marks each with an event; the
// host engine (device_copy_host.cpp, always built) stands in for a GPU with
// "device memory" in RAM and a copy thread, so the swappers' logic runs
// anywhere; the strict stand-in (strict_device.hpp) behaves like CUDA where
// bugs hide, for the tests. Callers pick one with make_device_copier() and
// never see which.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>

namespace zinf::swap {

struct CopyTicket {
  std::uint64_t id = 0;
  bool valid() const { return id != 0; }
};

class DeviceCopier {
 public:
  virtual ~DeviceCopier() = default;

  // Device memory of `bytes`; freed with free_device(). Throws
  // Error{resource} when the device is out of memory.
  virtual void* allocate_device(std::uint64_t bytes) = 0;
  virtual void free_device(void* device) noexcept = 0;
  // Queue a copy and return at once; the buffers must stay valid until
  // wait(). Copies on one copier run in submission order.
  virtual CopyTicket to_device(void* device, const std::byte* host, std::uint64_t bytes) = 0;
  virtual CopyTicket to_host(std::byte* host, const void* device, std::uint64_t bytes) = 0;
  // Queue zeroing `bytes` of device memory (cudaMemsetAsync on a GPU: no
  // host buffer of zeros crosses the bus).
  virtual CopyTicket fill_zero(void* device, std::uint64_t bytes) = 0;
  // Marks what the trainer has queued so far on `stream` (its compute
  // stream, a cudaStream_t; null: the default stream): the ticket's wait()
  // returns once that work is done. This is how device buffers the
  // trainer's kernels still read or write are not reused or reduced early.
  virtual CopyTicket record_stream(void* stream) = 0;
  // Blocks until the copy (and every copy queued before it) is done; throws
  // the copy's error. Each ticket is waited for once: a second wait (or a
  // ticket from another copier) is Error{invalid}.
  virtual void wait(CopyTicket ticket) = 0;
  virtual std::string_view name() const = 0;
  // True when "device" memory is ordinary host memory the CPU may read and
  // write directly (the host stand-in), so callers may skip copies.
  virtual bool host_accessible() const { return false; }
};

enum class DeviceKind { automatic, host, cuda };

// cuda: a CUDA device (Error{unsupported} when none is visible or the build
// has no CUDA); host: the stand-in; automatic: CUDA where a device is
// visible, else the stand-in.
std::unique_ptr<DeviceCopier> make_device_copier(DeviceKind kind = DeviceKind::automatic,
                                                 int device_index = 0);
std::unique_ptr<DeviceCopier> make_host_copier();
// Null where the build has no CUDA or no device is visible.
std::unique_ptr<DeviceCopier> make_cuda_copier(int device_index);

}  // namespace zinf::swap

// A strict stand-in for a GPU, for machines without one: it behaves like
// CUDA where device bugs hide, so the CPU test suite catches them.
//
// - Device memory is its own address space: each allocation is a memfd
//   mapped twice, once PROT_NONE (the "device address" callers get: a CPU
//   load or store through it faults, as dereferencing a cudaMalloc pointer
//   on the host does) and once read-write for the stand-in's own copy
//   engine and collectives. A host pointer where a device pointer is
//   required (or a device pointer given as host memory) is an Error.
// - Copies and fills are asynchronous: they run later, after a random
//   delay, on a worker thread, in submission order. Their destination holds
//   poison (0xFF bytes: NaN as floats) from submission until completion, so
//   reading it without waiting reads garbage. Waiting twice on a ticket, or
//   on one this device never issued, is an Error.
// - Compute streams stand in for the trainer's: its "kernels" run late on
//   a thread of their own, so an engine that reuses a buffer, or reduces a
//   gradient, without waiting for the trainer's stream sees the race.
// - A ledger counts bytes in use and their peak; with a capacity set,
//   allocating beyond it is Error{resource}, as cudaMalloc runs out.
// - Freeing memory a queued copy still uses, or a pointer it never
//   allocated, aborts with a message (a use-after-free on a real GPU
//   corrupts silently).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

#include "swap/device_copy.hpp"

namespace zinf::swap {

struct StrictDeviceOptions {
  std::uint64_t capacity_bytes = 0;             // 0: unlimited
  std::chrono::microseconds max_delay{300};    // per queued operation
  std::uint64_t seed = 1;                       // for the delays
};

class StrictDevice : public DeviceCopier {
 public:
  // True when [pointer, pointer + bytes) lies inside one live allocation.
  virtual bool is_device(const void* pointer, std::uint64_t bytes) const = 0;
  // The read-write view of device memory, for the stand-in's collectives
  // (as NCCL reaches device memory itself); throws Error{invalid} naming
  // `what` when the range is not device memory.
  virtual std::byte* access(const void* device, std::uint64_t bytes, const char* what) const = 0;
  // A stand-in compute stream, as the trainer's CUDA stream: kernels
  // launched on it run later, in launch order, on the stream's own thread
  // (each after a random delay), and record_stream(stream) marks them.
  // Kernels reach device memory through access(). The streams live as long
  // as the device.
  virtual void* create_stream() = 0;
  virtual void launch(void* stream, std::function<void()> kernel) = 0;
  virtual void synchronize(void* stream) = 0;

  virtual std::uint64_t bytes_in_use() const = 0;
  virtual std::uint64_t peak_bytes() const = 0;
  virtual std::uint64_t live_allocations() const = 0;
};

std::shared_ptr<StrictDevice> make_strict_device(StrictDeviceOptions options = {});

}  // namespace zinf::swap

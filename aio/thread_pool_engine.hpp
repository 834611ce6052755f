// Engines whose workers run one blocking transfer at a time: the posix engine
// (pread/pwrite), chosen where io_uring is refused, and the memory engine,
// which keeps files in RAM and injects faults from a seed so the layers
// above can be tested against EIO, ENOSPC, short transfers, EAGAIN storms and
// latency without a disk. Both are a ThreadPoolEngine over a SyncDevice;
// FaultInjectingDevice wraps any device, real files included.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "aio/engine.hpp"

namespace zinf::aio {

// One blocking transfer. Returns bytes transferred (possibly fewer than
// asked) or -errno, exactly like pread/pwrite.
class SyncDevice {
 public:
  virtual ~SyncDevice() = default;
  virtual std::int64_t transfer(Op op, const File& file, std::uint64_t offset_bytes,
                                std::byte* buffer, std::uint64_t length_bytes) = 0;
  virtual std::string_view name() const = 0;
};

class PosixDevice final : public SyncDevice {
 public:
  std::int64_t transfer(Op op, const File& file, std::uint64_t offset_bytes, std::byte* buffer,
                        std::uint64_t length_bytes) override;
  std::string_view name() const override { return "posix"; }
};

// Files kept in memory, keyed by path. capacity_bytes bounds the total
// stored: a write past it is cut short at the limit, then fails with ENOSPC,
// as a real filesystem does.
class MemoryDevice final : public SyncDevice {
 public:
  explicit MemoryDevice(std::optional<std::uint64_t> capacity_bytes = std::nullopt)
      : capacity_bytes_(capacity_bytes) {}
  std::int64_t transfer(Op op, const File& file, std::uint64_t offset_bytes, std::byte* buffer,
                        std::uint64_t length_bytes) override;
  std::string_view name() const override { return "memory"; }

  // A copy of a file's bytes (empty when it was never written).
  std::vector<std::byte> contents(const std::string& path) const;
  std::uint64_t stored_bytes() const;

 private:
  mutable std::mutex mutex_;
  std::map<std::string, std::vector<std::byte>, std::less<>> files_;
  std::uint64_t stored_bytes_ = 0;
  std::optional<std::uint64_t> capacity_bytes_;
};

// A fault at chosen offsets: every transfer of `op` that overlaps
// [offset_begin, offset_end) of a file whose path contains `path_contains`
// fails with `error_number`, at most `times` times.
struct InjectedError {
  Op op = Op::read;
  std::uint64_t offset_begin = 0;
  std::uint64_t offset_end = UINT64_MAX;
  int error_number = 5;  // EIO
  std::string path_contains;
  std::uint32_t times = UINT32_MAX;
};

struct FaultPlan {
  std::uint64_t seed = 1;                 // print it when a test fails
  std::vector<InjectedError> errors;
  double short_transfer_rate = 0;         // chance a transfer is cut short
  double eagain_rate = 0;                 // chance a transfer starts an EAGAIN storm
  std::uint32_t eagain_storm_length = 1;  // EAGAINs in a row per storm
  std::chrono::microseconds latency{0};   // added to every transfer
  std::chrono::microseconds latency_jitter{0};  // plus uniform [0, jitter)
};

class FaultInjectingDevice final : public SyncDevice {
 public:
  FaultInjectingDevice(std::unique_ptr<SyncDevice> inner, FaultPlan plan);
  std::int64_t transfer(Op op, const File& file, std::uint64_t offset_bytes, std::byte* buffer,
                        std::uint64_t length_bytes) override;
  std::string_view name() const override { return inner_->name(); }
  SyncDevice& inner() { return *inner_; }
  std::uint64_t faults_injected() const;

 private:
  std::unique_ptr<SyncDevice> inner_;
  FaultPlan plan_;
  mutable std::mutex mutex_;
  std::mt19937_64 random_;
  std::vector<std::uint32_t> error_hits_;
  std::uint32_t storm_left_ = 0;
  std::uint64_t faults_injected_ = 0;
};

class ThreadPoolEngine : public Engine {
 public:
  // Runs `workers` threads; each takes a piece, runs it to completion (short
  // transfers and retries included), and takes the next.
  ThreadPoolEngine(const AioOptions& options, std::unique_ptr<SyncDevice> device,
                   std::size_t workers, std::string name);
  ~ThreadPoolEngine() override;

  std::string_view name() const override { return name_; }
  std::string description() const override;
  SyncDevice& device() { return *device_; }

 protected:
  void enqueue(std::span<Piece*> pieces) override;

 private:
  void run_worker();
  void stop_workers() noexcept;

  std::unique_ptr<SyncDevice> device_;
  std::string name_;
  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<Piece*> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

// The posix engine keeps as many pieces in flight as io_uring would with the
// same options (intra_op_parallelism x queue_depth, at most 128), one
// blocking thread per piece.
std::unique_ptr<ThreadPoolEngine> make_posix_engine(const AioOptions& options);

// An in-memory engine with faults from `plan` (none by default); its
// device() is a FaultInjectingDevice over a MemoryDevice.
std::unique_ptr<ThreadPoolEngine> make_memory_engine(
    const AioOptions& options, FaultPlan plan = {},
    std::optional<std::uint64_t> capacity_bytes = std::nullopt);

}  // namespace zinf::aio

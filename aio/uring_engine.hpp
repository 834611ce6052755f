// The io_uring engine: intra_op_parallelism worker threads, each owning one
// ring with at most queue_depth pieces in flight. Pieces are submitted in
// batches (one by one with single_submit); with overlap_events the queue is
// refilled as each completion is reaped, without it a worker waits for its
// whole batch. Pool memory registered with register_buffers() is used as
// fixed buffers and registered files as fixed files: the kernel then skips
// pinning pages and looking up the fd on every I/O (half the CPU per byte on
// the machines measured in docs/performance.md). Features are probed at
// set-up; what is missing is left unused with one log line.
#pragma once

#include "zinf_config.h"

#if ZINF_HAVE_LIBURING

#include <condition_variable>
#include <functional>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "aio/engine.hpp"

namespace zinf::aio {

class UringEngine final : public Engine {
 public:
  // Throws Error{unsupported} naming the reason (seccomp, the
  // kernel.io_uring_disabled sysctl, no kernel support, memlock) when the
  // kernel refuses io_uring.
  explicit UringEngine(const AioOptions& options);
  ~UringEngine() override;

  void register_buffers(std::span<const MemoryRegion> regions) override;
  void unregister_buffers() override;
  void register_file(const File& file) override;
  void unregister_file(const File& file) override;

  std::string_view name() const override { return "io_uring"; }
  std::string description() const override;
  bool fixed_buffers_enabled() const;
  bool fixed_files_supported() const { return fixed_files_supported_; }

  // For tests: every completion's result goes through `filter` before the
  // engine sees it, so a test can hand the real io_uring reaping path short
  // transfers, -EAGAIN or a delay. Set before the first submit.
  using CompletionFilter = std::function<std::int64_t(const Piece& piece, std::int64_t result)>;
  void set_completion_filter_for_testing(CompletionFilter filter) { completion_filter_ = std::move(filter); }

 protected:
  void enqueue(std::span<Piece*> pieces) override;

 private:
  struct Worker;
  struct Region {
    std::byte* begin;
    std::byte* end;
    int index;
  };
  void run_worker(Worker& worker);
  void annotate(std::span<Piece*> pieces) const;  // under registry_mutex_
  void stop_workers() noexcept;

  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<Piece*> queue_;
  bool stopping_ = false;

  mutable std::shared_mutex registry_mutex_;
  std::vector<Region> regions_;  // sorted by begin
  bool fixed_files_supported_ = false;
  CompletionFilter completion_filter_;
  std::unordered_map<std::uint64_t, int> file_slots_;  // File::id -> slot
  std::vector<int> free_file_slots_;
  unsigned setup_flags_ = 0;
};

// Why io_uring_setup failed with `error_number`, in words a user can act on.
std::string describe_uring_refusal(int error_number);

}  // namespace zinf::aio

#endif  // ZINF_HAVE_LIBURING

// A pool of page-locked, aligned host memory under a byte budget. The whole
// budget is mapped, huge-page advised, page-locked and pre-faulted once at
// construction: on the machines zinf targets a fresh 4 KiB page costs about
// 11 us to fault in, so a pool that allocated per use would be slower than
// the disk. Leases are exact-size (rounded up to the alignment), move-only,
// and return to the pool on scope exit, error paths included. The pool is
// one contiguous region, so an engine registers it once (region()) and every
// lease is then an io_uring fixed buffer; with a GPU present it is also
// registered with CUDA (cudaHostRegister) for fast device copies.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <span>
#include <string>

#include "aio/request.hpp"

namespace zinf {

struct PinnedPoolOptions {
  std::uint64_t budget_bytes = 0;
  std::uint64_t alignment_bytes = 4096;  // power of two, >= 4096 for O_DIRECT
  // When page-locking fails (RLIMIT_MEMLOCK), use pageable memory with a
  // warning instead of failing. DeepSpeed's pin_memory: false.
  bool allow_unpinned = false;
  // false: do not page-lock at all (pageable, pre-faulted memory, no
  // warning): DeepSpeed's pin_memory: false asked for explicitly.
  bool lock = true;
  bool huge_pages = true;     // MADV_HUGEPAGE where the kernel offers THP
  bool cuda_register = true;  // cudaHostRegister when built with CUDA and a GPU is present
};

struct PinnedPoolStats {
  std::uint64_t capacity_bytes = 0;
  std::uint64_t in_use_bytes = 0;      // reserved by live leases (rounded sizes)
  std::uint64_t high_water_bytes = 0;  // the most ever in use at once
  std::uint64_t leases_outstanding = 0;
  std::uint64_t acquires = 0;
  std::uint64_t acquires_waited = 0;   // acquires that had to block
};

class PinnedPool;

// A lease on pool memory: size() bytes at data(), aligned to the pool's
// alignment. Returns itself to the pool when destroyed.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(PinnedBuffer&& other) noexcept;
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() { release(); }

  std::byte* data() const noexcept { return data_; }
  std::uint64_t size() const noexcept { return size_bytes_; }
  std::span<std::byte> span() const noexcept { return {data_, size_bytes_}; }
  explicit operator bool() const noexcept { return data_ != nullptr; }
  // Returns the memory now rather than at scope exit.
  void release() noexcept;

 private:
  friend class PinnedPool;
  PinnedPool* pool_ = nullptr;
  std::byte* data_ = nullptr;
  std::uint64_t size_bytes_ = 0;
  std::uint64_t reserved_bytes_ = 0;
};

class PinnedPool {
 public:
  // Maps, locks and pre-faults budget_bytes. Throws Error{resource} when the
  // memory cannot be page-locked (naming RLIMIT_MEMLOCK and the fix) unless
  // allow_unpinned is set.
  explicit PinnedPool(const PinnedPoolOptions& options);
  // Every lease must have been returned: a live lease here is a bug.
  ~PinnedPool();
  PinnedPool(const PinnedPool&) = delete;
  PinnedPool& operator=(const PinnedPool&) = delete;

  // Blocks until `bytes` fit. Throws Error{resource} at once when `bytes`
  // exceed the whole budget.
  PinnedBuffer acquire(std::uint64_t bytes);
  // As above, but throws Error{resource} naming the budget and what is in
  // use when the timeout passes first.
  PinnedBuffer acquire(std::uint64_t bytes, std::chrono::milliseconds timeout);
  // Never blocks; empty when the bytes do not fit now.
  std::optional<PinnedBuffer> try_acquire(std::uint64_t bytes);

  // The whole pool as one region, to register with an I/O engine.
  aio::MemoryRegion region() const { return {base_, capacity_bytes_}; }
  PinnedPoolStats stats() const;
  std::uint64_t alignment() const { return options_.alignment_bytes; }
  bool page_locked() const { return page_locked_; }
  bool huge_pages_advised() const { return huge_pages_; }
  bool cuda_registered() const { return cuda_registered_; }
  // One line for logs: size, pinned or not, huge pages, CUDA.
  std::string description() const;

 private:
  friend class PinnedBuffer;
  std::optional<PinnedBuffer> take_locked(std::uint64_t bytes);
  void give_back(std::byte* data, std::uint64_t reserved_bytes) noexcept;
  void check_fits_budget(std::uint64_t bytes) const;

  PinnedPoolOptions options_;
  void* mapping_ = nullptr;  // what mmap returned; base_ may be rounded up in it
  std::byte* base_ = nullptr;
  std::uint64_t capacity_bytes_ = 0;
  std::uint64_t mapped_bytes_ = 0;
  bool page_locked_ = false;
  bool huge_pages_ = false;
  bool cuda_registered_ = false;

  mutable std::mutex mutex_;
  std::condition_variable returned_;
  std::map<std::uint64_t, std::uint64_t> free_;  // offset -> length, coalesced
  PinnedPoolStats stats_;
};

// The current RLIMIT_MEMLOCK soft limit in bytes (UINT64_MAX if unlimited),
// and whether this process may lock memory beyond it (CAP_IPC_LOCK).
std::uint64_t memlock_limit_bytes();
bool has_ipc_lock_capability();

}  // namespace zinf

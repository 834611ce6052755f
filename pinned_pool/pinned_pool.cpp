#include "pinned_pool/pinned_pool.hpp"

#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <algorithm>
#include <cstring>
#include <fstream>
#include <utility>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"
#include "pinned_pool/cuda_host.hpp"

namespace zinf {
namespace {

constexpr std::uint64_t kHugePage = 2 * MiB;

bool transparent_huge_pages_available() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  std::getline(in, line);
  return !line.empty() && line.find("[never]") == std::string::npos;
}

void prefault(std::byte* base, std::uint64_t bytes) {
#ifdef MADV_POPULATE_WRITE
  if (::madvise(base, bytes, MADV_POPULATE_WRITE) == 0) return;
#endif
  const long page = ::sysconf(_SC_PAGESIZE);
  for (std::uint64_t offset = 0; offset < bytes; offset += static_cast<std::uint64_t>(page)) {
    base[offset] = std::byte{0};
  }
}

}  // namespace

std::uint64_t memlock_limit_bytes() {
  rlimit limit{};
  if (::getrlimit(RLIMIT_MEMLOCK, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) {
    return UINT64_MAX;
  }
  return limit.rlim_cur;
}

bool has_ipc_lock_capability() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2]{};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  return (data[CAP_IPC_LOCK / 32].effective & (1u << (CAP_IPC_LOCK % 32))) != 0;
}

PinnedBuffer::PinnedBuffer(PinnedBuffer&& other) noexcept { *this = std::move(other); }

PinnedBuffer& PinnedBuffer::operator=(PinnedBuffer&& other) noexcept {
  if (this != &other) {
    release();
    pool_ = std::exchange(other.pool_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    size_bytes_ = std::exchange(other.size_bytes_, 0);
    reserved_bytes_ = std::exchange(other.reserved_bytes_, 0);
  }
  return *this;
}

void PinnedBuffer::release() noexcept {
  if (pool_ != nullptr) {
    pool_->give_back(data_, reserved_bytes_);
    pool_ = nullptr;
    data_ = nullptr;
    size_bytes_ = 0;
    reserved_bytes_ = 0;
  }
}

PinnedPool::PinnedPool(const PinnedPoolOptions& options) : options_(options) {
  if (!is_power_of_two(options_.alignment_bytes) || options_.alignment_bytes < 4096) {
    throw Error(ErrorKind::invalid,
                fmt::format("pinned pool alignment {} must be a power of two of at least 4096",
                            options_.alignment_bytes));
  }
  ZINF_CHECK(options_.budget_bytes > 0, "pinned pool budget must be positive");
  capacity_bytes_ = align_up(options_.budget_bytes, options_.alignment_bytes);
  const bool want_huge = options_.huge_pages && transparent_huge_pages_available() &&
                         capacity_bytes_ >= kHugePage;
  // Over-map so the region can start on a boundary of the lease alignment
  // (and of a huge page): every lease is then aligned, not just offset by
  // a multiple of the alignment.
  const std::uint64_t base_alignment =
      std::max<std::uint64_t>(options_.alignment_bytes, want_huge ? kHugePage : 4096);
  mapped_bytes_ = capacity_bytes_ + (base_alignment > 4096 ? base_alignment : 0);
  void* mapped = ::mmap(nullptr, mapped_bytes_, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mapped == MAP_FAILED) {
    const int error = errno;
    throw Error(ErrorKind::resource,
                fmt::format("cannot map {} for the pinned pool: {}", format_bytes(mapped_bytes_),
                            std::strerror(error)),
                ErrorContext::with_errno(error));
  }
  mapping_ = mapped;
  auto* start = static_cast<std::byte*>(mapped);
  base_ = reinterpret_cast<std::byte*>(
      align_up(reinterpret_cast<std::uintptr_t>(start), base_alignment));
  if (want_huge) huge_pages_ = ::madvise(base_, capacity_bytes_, MADV_HUGEPAGE) == 0;

  // mlock faults every page in, so pinned memory is pre-faulted too. The
  // raw system call, because the sanitizers replace mlock() with a no-op
  // that reports success, which would hide a low RLIMIT_MEMLOCK under test.
  if (!options_.lock) {
    prefault(base_, capacity_bytes_);
  } else if (::syscall(SYS_mlock, base_, capacity_bytes_) == 0) {
    page_locked_ = true;
  } else {
    const int error = errno;
    const std::uint64_t limit = memlock_limit_bytes();
    const std::string message = fmt::format(
        "cannot page-lock {} for the pinned pool: {} ({}); RLIMIT_MEMLOCK is {} and this "
        "process {} CAP_IPC_LOCK. Raise the limit (ulimit -l unlimited; LimitMEMLOCK=infinity "
        "under systemd; --ulimit memlock=-1 for docker) or allow unpinned memory "
        "(pin_memory: false)",
        format_bytes(capacity_bytes_), std::strerror(error), errno_name(error),
        limit == UINT64_MAX ? std::string("unlimited") : format_bytes(limit),
        has_ipc_lock_capability() ? "has" : "lacks");
    if (!options_.allow_unpinned) {
      ::munmap(mapping_, mapped_bytes_);
      throw Error(ErrorKind::resource, message, ErrorContext::with_errno(error));
    }
    log().warn("{}; continuing with unpinned memory as allowed", message);
    prefault(base_, capacity_bytes_);
  }
  if (options_.cuda_register) cuda_registered_ = cuda_host_register(base_, capacity_bytes_);

  free_.emplace(0, capacity_bytes_);
  stats_.capacity_bytes = capacity_bytes_;
  log().debug("pinned pool: {}", description());
}

PinnedPool::~PinnedPool() {
  {
    std::lock_guard lock(mutex_);
    ZINF_ASSERT(stats_.leases_outstanding == 0,
                "pinned pool destroyed while leases are still out");
  }
  if (cuda_registered_) cuda_host_unregister(base_);
  if (page_locked_) ::syscall(SYS_munlock, base_, capacity_bytes_);
  ::munmap(mapping_, mapped_bytes_);
}

std::string PinnedPool::description() const {
  return fmt::format("{} {}{}{}", format_bytes(capacity_bytes_),
                     page_locked_ ? "page-locked" : "unpinned",
                     huge_pages_ ? ", huge pages advised" : "",
                     cuda_registered_ ? ", CUDA-registered" : "");
}

void PinnedPool::check_fits_budget(std::uint64_t bytes) const {
  ZINF_CHECK(bytes > 0, "pinned pool: cannot acquire 0 bytes");
  // Compared before rounding: align_up of a huge value would wrap to 0.
  if (bytes > capacity_bytes_ || align_up(bytes, options_.alignment_bytes) > capacity_bytes_) {
    throw Error(ErrorKind::resource,
                fmt::format("pinned pool: a request of {} ({} bytes) exceeds the whole budget of "
                            "{} ({} bytes)",
                            format_bytes(bytes), bytes, format_bytes(capacity_bytes_),
                            capacity_bytes_));
  }
}

std::optional<PinnedBuffer> PinnedPool::take_locked(std::uint64_t bytes) {
  const std::uint64_t reserved = align_up(bytes, options_.alignment_bytes);
  // Best fit keeps large holes for large requests.
  auto best = free_.end();
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second >= reserved && (best == free_.end() || it->second < best->second)) best = it;
  }
  if (best == free_.end()) return std::nullopt;
  const std::uint64_t offset = best->first;
  const std::uint64_t hole = best->second;
  free_.erase(best);
  if (hole > reserved) free_.emplace(offset + reserved, hole - reserved);

  stats_.in_use_bytes += reserved;
  stats_.high_water_bytes = std::max(stats_.high_water_bytes, stats_.in_use_bytes);
  ++stats_.leases_outstanding;
  ++stats_.acquires;
  PinnedBuffer buffer;
  buffer.pool_ = this;
  buffer.data_ = base_ + offset;
  buffer.size_bytes_ = bytes;
  buffer.reserved_bytes_ = reserved;
  return buffer;
}

void PinnedPool::give_back(std::byte* data, std::uint64_t reserved_bytes) noexcept {
  {
    std::lock_guard lock(mutex_);
    std::uint64_t offset = static_cast<std::uint64_t>(data - base_);
    std::uint64_t length = reserved_bytes;
    auto next = free_.lower_bound(offset);
    if (next != free_.end() && offset + length == next->first) {
      length += next->second;
      next = free_.erase(next);
    }
    if (next != free_.begin()) {
      auto previous = std::prev(next);
      if (previous->first + previous->second == offset) {
        offset = previous->first;
        length += previous->second;
        free_.erase(previous);
      }
    }
    free_.emplace(offset, length);
    stats_.in_use_bytes -= reserved_bytes;
    --stats_.leases_outstanding;
  }
  returned_.notify_all();
}

PinnedBuffer PinnedPool::acquire(std::uint64_t bytes) {
  check_fits_budget(bytes);
  std::unique_lock lock(mutex_);
  std::optional<PinnedBuffer> buffer = take_locked(bytes);
  if (buffer) return std::move(*buffer);
  ++stats_.acquires_waited;
  returned_.wait(lock, [&] { return (buffer = take_locked(bytes)).has_value(); });
  return std::move(*buffer);
}

PinnedBuffer PinnedPool::acquire(std::uint64_t bytes, std::chrono::milliseconds timeout) {
  check_fits_budget(bytes);
  std::unique_lock lock(mutex_);
  std::optional<PinnedBuffer> buffer = take_locked(bytes);
  if (buffer) return std::move(*buffer);
  ++stats_.acquires_waited;
  if (!returned_.wait_for(lock, timeout,
                          [&] { return (buffer = take_locked(bytes)).has_value(); })) {
    throw Error(ErrorKind::resource,
                fmt::format("pinned pool: no room for {} after {} ms: {} of the {} budget in "
                            "use by {} lease(s)",
                            format_bytes(bytes), timeout.count(),
                            format_bytes(stats_.in_use_bytes), format_bytes(capacity_bytes_),
                            stats_.leases_outstanding));
  }
  return std::move(*buffer);
}

std::optional<PinnedBuffer> PinnedPool::try_acquire(std::uint64_t bytes) {
  check_fits_budget(bytes);
  std::lock_guard lock(mutex_);
  return take_locked(bytes);
}

PinnedPoolStats PinnedPool::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

}  // namespace zinf

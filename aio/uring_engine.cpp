#include "aio/uring_engine.hpp"

#if ZINF_HAVE_LIBURING

#include <liburing.h>
#include <pthread.h>
#include <sys/resource.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <chrono>
#include <thread>

#include <fmt/format.h>

#include "aio/file.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"

namespace zinf::aio {
namespace {

constexpr unsigned kFileSlots = 256;
// The kernel refuses a single fixed buffer larger than 1 GiB.
constexpr std::uint64_t kMaxFixedBuffer = 1 * GiB;

std::string read_first_line(const char* path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

bool seccomp_filter_active() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("Seccomp:", 0) == 0) return line.find('2') != std::string::npos;
  }
  return false;
}

}  // namespace

std::string describe_uring_refusal(int error_number) {
  const std::string disabled = read_first_line("/proc/sys/kernel/io_uring_disabled");
  switch (error_number) {
    case ENOSYS:
      return seccomp_filter_active()
                 ? "a seccomp filter refuses io_uring_setup (ENOSYS); container runtimes "
                   "do this by default"
                 : "this kernel has no io_uring (ENOSYS)";
    case EPERM:
      if (disabled == "2") return "io_uring is disabled by the sysctl kernel.io_uring_disabled=2 (EPERM)";
      if (disabled == "1") {
        return "io_uring is restricted by kernel.io_uring_disabled=1 and this process is not "
               "in kernel.io_uring_group (EPERM)";
      }
      if (seccomp_filter_active()) return "a seccomp filter refuses io_uring_setup (EPERM)";
      return "io_uring_setup is not permitted (EPERM)";
    case ENOMEM:
      return "not enough locked memory for the ring (ENOMEM): raise RLIMIT_MEMLOCK (ulimit -l)";
    default:
      return fmt::format("io_uring_setup failed: {} ({})", std::strerror(error_number),
                         errno_name(error_number));
  }
}

struct UringEngine::Worker {
  io_uring ring{};
  bool ring_ready = false;
  std::thread thread;
  unsigned index = 0;
};

UringEngine::UringEngine(const AioOptions& options) : Engine(options) {
  const unsigned entries =
      static_cast<unsigned>(std::bit_ceil(std::max<std::uint32_t>(options.queue_depth, 1)));
  for (unsigned i = 0; i < options.intra_op_parallelism; ++i) {
    auto worker = std::make_unique<Worker>();
    worker->index = i;
    io_uring_params params{};
    params.flags = IORING_SETUP_CQSIZE | IORING_SETUP_COOP_TASKRUN;
    params.cq_entries = entries * 2;
    if (options.use_sqpoll) {
      params.flags |= IORING_SETUP_SQPOLL;
      params.sq_thread_idle = 100;  // ms before the poller sleeps
    }
    int result = io_uring_queue_init_params(entries, &worker->ring, &params);
    if (result == -EINVAL) {
      // Older kernels lack COOP_TASKRUN: retry with the basic flags.
      params = io_uring_params{};
      params.flags = IORING_SETUP_CQSIZE | (options.use_sqpoll ? IORING_SETUP_SQPOLL : 0);
      params.cq_entries = entries * 2;
      params.sq_thread_idle = 100;
      result = io_uring_queue_init_params(entries, &worker->ring, &params);
    }
    if (result < 0) {
      for (auto& made : workers_) io_uring_queue_exit(&made->ring);
      throw Error(ErrorKind::unsupported, describe_uring_refusal(-result));
    }
    worker->ring_ready = true;
    setup_flags_ = params.flags;
    workers_.push_back(std::move(worker));
  }

  // Probe the opcodes used. READ/WRITE need 5.6; older kernels fall back.
  io_uring_probe* probe = io_uring_get_probe_ring(&workers_[0]->ring);
  const bool have_ops = probe != nullptr && io_uring_opcode_supported(probe, IORING_OP_READ) &&
                        io_uring_opcode_supported(probe, IORING_OP_WRITE) &&
                        io_uring_opcode_supported(probe, IORING_OP_READ_FIXED) &&
                        io_uring_opcode_supported(probe, IORING_OP_WRITE_FIXED);
  if (probe != nullptr) io_uring_free_probe(probe);
  if (!have_ops) {
    for (auto& made : workers_) io_uring_queue_exit(&made->ring);
    throw Error(ErrorKind::unsupported,
                "this kernel's io_uring lacks IORING_OP_READ/WRITE (needs Linux 5.6 or later)");
  }

  // A sparse table of fixed-file slots per ring (Linux 5.19+).
  fixed_files_supported_ = true;
  for (auto& worker : workers_) {
    if (io_uring_register_files_sparse(&worker->ring, kFileSlots) < 0) {
      fixed_files_supported_ = false;
      break;
    }
  }
  if (fixed_files_supported_) {
    for (int slot = static_cast<int>(kFileSlots) - 1; slot >= 0; --slot) {
      free_file_slots_.push_back(slot);
    }
  } else {
    log_once("uring-no-fixed-files", spdlog::level::info,
             "io_uring: sparse fixed-file tables are not supported here; using plain fds");
  }

  if (options.use_sqpoll && !fixed_files_supported_) {
    for (auto& made : workers_) io_uring_queue_exit(&made->ring);
    throw Error(ErrorKind::unsupported,
                "SQPOLL needs sparse fixed-file tables (Linux 5.19 or later) on this kernel");
  }

  try {
    for (auto& worker : workers_) {
      Worker* raw = worker.get();
      raw->thread = std::thread([this, raw] {
        const std::string thread_name = fmt::format("zinf-uring-{}", raw->index);
        pthread_setname_np(pthread_self(), thread_name.c_str());
        run_worker(*raw);
      });
    }
  } catch (...) {
    stop_workers();
    throw;
  }
}

void UringEngine::stop_workers() noexcept {
  {
    std::lock_guard lock(queue_mutex_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  for (auto& worker : workers_) {
    if (worker->thread.joinable()) worker->thread.join();
  }
  for (auto& worker : workers_) io_uring_queue_exit(&worker->ring);
  workers_.clear();
}

UringEngine::~UringEngine() {
  drain();
  stop_workers();
}

std::string UringEngine::description() const {
  std::shared_lock lock(registry_mutex_);
  return fmt::format("io_uring: {} ring(s), depth {}, block {}, {} submit, {}{}{}{}",
                     workers_.size(), options().queue_depth, format_bytes(options().block_size),
                     options().single_submit ? "single" : "batched",
                     options().overlap_events ? "overlapped events" : "batch waits",
                     regions_.empty() ? "" : ", fixed buffers",
                     fixed_files_supported_ ? ", fixed files" : "",
                     (setup_flags_ & IORING_SETUP_SQPOLL) != 0 ? ", SQPOLL" : "");
}

bool UringEngine::fixed_buffers_enabled() const {
  std::shared_lock lock(registry_mutex_);
  return !regions_.empty();
}

void UringEngine::register_buffers(std::span<const MemoryRegion> regions) {
  std::unique_lock lock(registry_mutex_);
  if (outstanding_tickets() != 0) {
    throw Error(ErrorKind::invalid, "register_buffers needs an idle engine: wait for every ticket first");
  }
  std::vector<iovec> vectors;
  for (const MemoryRegion& region : regions) {
    for (std::uint64_t done = 0; done < region.size_bytes; done += kMaxFixedBuffer) {
      vectors.push_back(iovec{region.data + done,
                              std::min(kMaxFixedBuffer, region.size_bytes - done)});
    }
  }
  if (!regions_.empty()) {
    for (auto& worker : workers_) io_uring_unregister_buffers(&worker->ring);
    regions_.clear();
  }
  if (vectors.empty()) return;
  for (std::size_t i = 0; i < workers_.size(); ++i) {
    const int result = io_uring_register_buffers(&workers_[i]->ring, vectors.data(),
                                                 static_cast<unsigned>(vectors.size()));
    if (result < 0) {
      for (std::size_t j = 0; j < i; ++j) io_uring_unregister_buffers(&workers_[j]->ring);
      rlimit limit{};
      getrlimit(RLIMIT_MEMLOCK, &limit);
      log_once("uring-fixed-buffers", spdlog::level::warn,
               fmt::format("io_uring: registering {} buffer(s) failed: {} ({}); RLIMIT_MEMLOCK "
                           "is {}; continuing without fixed buffers (more CPU per byte)",
                           vectors.size(), std::strerror(-result), errno_name(-result),
                           limit.rlim_cur == RLIM_INFINITY ? std::string("unlimited")
                                                           : format_bytes(limit.rlim_cur)));
      return;
    }
  }
  for (std::size_t i = 0; i < vectors.size(); ++i) {
    auto* begin = static_cast<std::byte*>(vectors[i].iov_base);
    regions_.push_back(Region{begin, begin + vectors[i].iov_len, static_cast<int>(i)});
  }
  std::sort(regions_.begin(), regions_.end(),
            [](const Region& a, const Region& b) { return a.begin < b.begin; });
}

void UringEngine::unregister_buffers() {
  std::unique_lock lock(registry_mutex_);
  if (outstanding_tickets() != 0) {
    throw Error(ErrorKind::invalid,
                "unregister_buffers needs an idle engine: wait for every ticket first");
  }
  if (regions_.empty()) return;
  for (auto& worker : workers_) io_uring_unregister_buffers(&worker->ring);
  regions_.clear();
}

void UringEngine::register_file(const File& file) {
  if (!fixed_files_supported_) return;
  std::unique_lock lock(registry_mutex_);
  if (file_slots_.contains(file.id())) return;
  if (free_file_slots_.empty()) {
    log_once("uring-file-slots", spdlog::level::info,
             fmt::format("io_uring: all {} fixed-file slots in use; further files use plain fds",
                         kFileSlots));
    return;
  }
  const int slot = free_file_slots_.back();
  int fd = file.fd();
  for (auto& worker : workers_) {
    const int result = io_uring_register_files_update(&worker->ring, static_cast<unsigned>(slot), &fd, 1);
    if (result < 0) {
      int none = -1;
      for (auto& undo : workers_) {
        if (undo == worker) break;
        io_uring_register_files_update(&undo->ring, static_cast<unsigned>(slot), &none, 1);
      }
      return;  // plain fd for this file
    }
  }
  free_file_slots_.pop_back();
  file_slots_.emplace(file.id(), slot);
}

void UringEngine::unregister_file(const File& file) {
  std::unique_lock lock(registry_mutex_);
  auto it = file_slots_.find(file.id());
  if (it == file_slots_.end()) return;
  // Queued pieces carry the slot number: freeing it now could send them to
  // whichever file takes the slot next.
  if (file_in_flight(file)) {
    throw Error(ErrorKind::invalid,
                fmt::format("cannot unregister {}: it still has I/O in flight; wait for its "
                            "tickets first",
                            file.path()));
  }
  int none = -1;
  for (auto& worker : workers_) {
    io_uring_register_files_update(&worker->ring, static_cast<unsigned>(it->second), &none, 1);
  }
  free_file_slots_.push_back(it->second);
  file_slots_.erase(it);
}

void UringEngine::annotate(std::span<Piece*> pieces) const {
  const File* last_file = nullptr;
  int last_slot = -1;
  for (Piece* piece : pieces) {
    if (piece->file != last_file) {
      last_file = piece->file;
      auto it = file_slots_.find(piece->file->id());
      last_slot = it == file_slots_.end() ? -1 : it->second;
    }
    piece->fixed_file = last_slot;
    piece->fixed_buffer = -1;
    if (regions_.empty()) continue;
    auto after = std::upper_bound(regions_.begin(), regions_.end(), piece->buffer,
                                  [](std::byte* address, const Region& region) {
                                    return address < region.begin;
                                  });
    if (after == regions_.begin()) continue;
    const Region& region = *(after - 1);
    if (piece->buffer + piece->length_bytes <= region.end) piece->fixed_buffer = region.index;
  }
}

void UringEngine::enqueue(std::span<Piece*> pieces) {
  {
    // Held shared until the pieces are queued, so a concurrent
    // register_buffers() (which needs an idle engine) cannot change the
    // tables the pieces were annotated with.
    std::shared_lock registry(registry_mutex_);
    annotate(pieces);
    std::lock_guard lock(queue_mutex_);
    queue_.insert(queue_.end(), pieces.begin(), pieces.end());
  }
  queue_cv_.notify_all();
}

namespace {

void prepare(io_uring_sqe* sqe, Piece& piece) {
  const int fd = piece.fixed_file >= 0 ? piece.fixed_file : piece.file->fd();
  const auto length = static_cast<unsigned>(piece.remaining_bytes());
  if (piece.fixed_buffer >= 0) {
    if (piece.op == Op::read) {
      io_uring_prep_read_fixed(sqe, fd, piece.next_buffer(), length, piece.next_offset(),
                               piece.fixed_buffer);
    } else {
      io_uring_prep_write_fixed(sqe, fd, piece.next_buffer(), length, piece.next_offset(),
                                piece.fixed_buffer);
    }
  } else if (piece.op == Op::read) {
    io_uring_prep_read(sqe, fd, piece.next_buffer(), length, piece.next_offset());
  } else {
    io_uring_prep_write(sqe, fd, piece.next_buffer(), length, piece.next_offset());
  }
  if (piece.fixed_file >= 0) sqe->flags |= IOSQE_FIXED_FILE;
  io_uring_sqe_set_data(sqe, &piece);
}

}  // namespace

void UringEngine::run_worker(Worker& worker) {
  io_uring* ring = &worker.ring;
  const unsigned depth = options().queue_depth;
  const bool overlap = options().overlap_events;
  const bool single = options().single_submit;
  std::deque<Piece*> ready;  // taken from the queue or coming back for a retry
  unsigned in_flight = 0;

  for (;;) {
    // Without overlap_events a worker takes no new pieces while its batch
    // is in flight, so idle rings can take them instead.
    if (in_flight + ready.size() < depth && (overlap || in_flight == 0)) {
      std::unique_lock lock(queue_mutex_);
      if (in_flight == 0 && ready.empty()) {
        queue_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping and nothing left
      }
      while (!queue_.empty() && in_flight + ready.size() < depth) {
        ready.push_back(queue_.front());
        queue_.pop_front();
      }
    }

    if (overlap || in_flight == 0) {
      while (!ready.empty() && in_flight < depth) {
        io_uring_sqe* sqe = io_uring_get_sqe(ring);
        if (sqe == nullptr) break;  // SQ full until the next submit
        prepare(sqe, *ready.front());
        ready.pop_front();
        ++in_flight;
        if (single) io_uring_submit(ring);
      }
    }
    if (in_flight == 0) continue;

    const unsigned wait_for = overlap ? 1 : in_flight;
    const int submitted = io_uring_submit_and_wait(ring, wait_for);
    if (submitted == -ENOMEM) {
      // The kernel is short of memory for requests: back off and retry.
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    } else if (submitted < 0 && submitted != -EINTR && submitted != -EAGAIN &&
               submitted != -EBUSY) {
      // EFAULT, EBADF, EINVAL... mean zinf broke the ring: a bug, not an I/O
      // error, and pieces may be in the kernel, so there is no safe way on.
      abort_internal(__FILE__, __LINE__, "io_uring_submit_and_wait",
                     fmt::format("io_uring_enter failed: {}", std::strerror(-submitted)));
    }

    unsigned head = 0;
    unsigned reaped = 0;
    io_uring_cqe* cqe = nullptr;
    io_uring_for_each_cqe(ring, head, cqe) {
      auto* piece = static_cast<Piece*>(io_uring_cqe_get_data(cqe));
      const std::int64_t result = completion_filter_ ? completion_filter_(*piece, cqe->res) : cqe->res;
      ++reaped;
      --in_flight;
      if (complete(*piece, result)) ready.push_back(piece);
    }
    io_uring_cq_advance(ring, reaped);
  }
}

}  // namespace zinf::aio

#endif  // ZINF_HAVE_LIBURING

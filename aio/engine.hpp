// The engine interface: callers submit plain requests and get a ticket, then
// wait on their own ticket (optionally with a timeout that reports what is
// still in flight), or on everything with wait_all(). Engines cut requests
// into block_size pieces and run them on their workers; every transfer
// result goes through handle_completion() (completion.hpp), and every error
// surfaces at the wait with path, offset, length and errno.
//
// Three engines implement it: io_uring (uring_engine.hpp), a thread pool of
// pread/pwrite, and an in-memory one with seeded fault injection
// (thread_pool_engine.hpp). make_engine() picks io_uring and falls back to
// the thread pool, saying why, where the kernel or a sandbox refuses it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>

#include "aio/completion.hpp"
#include "aio/request.hpp"

namespace zinf::aio {

struct EngineStats {
  std::uint64_t bytes_read = 0;
  std::uint64_t bytes_written = 0;
  std::uint64_t pieces_completed = 0;
  std::uint64_t short_transfers = 0;
  std::uint64_t retries = 0;
  std::uint64_t pieces_failed = 0;
};

// Throws Error{config} naming the aio.* key when an option is out of range.
void validate(const AioOptions& options);
// Bytes per piece: block_size rounded up to whole 4 KiB.
std::uint64_t piece_bytes(const AioOptions& options);

class Engine {
 public:
  explicit Engine(const AioOptions& options);
  virtual ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues the requests and returns at once. Requests on O_DIRECT files must
  // be aligned (offset, length, buffer address) to the file's alignment:
  // misaligned ones throw Error{alignment} before anything is submitted.
  // Buffers must stay valid until the ticket is waited on.
  Ticket submit(std::span<const Request> requests);
  Ticket submit(const Request& request) { return submit(std::span(&request, 1)); }

  // Blocks until every piece of the ticket is finished and returns the bytes
  // transferred. One thread waits on a ticket; a second is refused.
  // transferred (always the full length: short transfers are completed or
  // reported). Throws the first error among the ticket's pieces, only after
  // all of them have left the kernel, so buffers are free to reuse.
  std::uint64_t wait(Ticket ticket);
  // As above, but throws Error{timeout} listing the pieces still in flight
  // when the deadline passes; the ticket stays valid and may be waited again.
  std::uint64_t wait(Ticket ticket, std::chrono::milliseconds timeout);
  // True when the ticket is finished (wait() will not block).
  bool ready(Ticket ticket) const;
  // Waits for every outstanding ticket no other thread is waiting on, and
  // throws the first error among them.
  void wait_all();
  std::size_t outstanding_tickets() const;

  // Registers memory the engine may use as fixed buffers (io_uring). Only
  // while no ticket is outstanding. Engines without the notion ignore it.
  virtual void register_buffers(std::span<const MemoryRegion> regions);
  virtual void unregister_buffers();
  // Registers a file for cheaper submission (io_uring fixed files). The
  // file must be unregistered before it is closed, and only once its I/O
  // has been waited for (unregister_file refuses otherwise).
  virtual void register_file(const File& file);
  virtual void unregister_file(const File& file);

  virtual std::string_view name() const = 0;
  // One line for logs: engine, workers, depth, features in use.
  virtual std::string description() const;
  const AioOptions& options() const { return options_; }
  std::uint64_t piece_bytes() const { return piece_bytes_; }
  EngineStats stats() const;

 protected:
  // Hands one ticket's pieces to the workers, filling in engine-specific
  // fields (fixed buffer and file slots) on the way; runs on the submitting
  // thread. Must queue all of them or, when it throws, none.
  virtual void enqueue(std::span<Piece*> pieces) = 0;
  // Workers report each transfer result here. Returns true when the piece
  // must be submitted again (short transfer or EINTR/EAGAIN).
  bool complete(Piece& piece, std::int64_t result);
  // Waits until no ticket has pieces in flight; derived destructors call it
  // before stopping their workers so no buffer is in use after destruction.
  void drain() noexcept;
  // True while a piece on `file` has not finished.
  bool file_in_flight(const File& file) const;

 private:
  struct TicketState;
  TicketState& claim(Ticket ticket);
  std::uint64_t take(std::uint64_t id, std::unique_lock<std::mutex>& lock);
  std::string in_flight_report(const TicketState& state) const;

  AioOptions options_;
  std::uint64_t piece_bytes_;
  mutable std::mutex book_mutex_;
  std::condition_variable book_cv_;
  std::unordered_map<std::uint64_t, std::unique_ptr<TicketState>> tickets_;
  std::uint64_t next_ticket_ = 1;

  std::atomic<std::uint64_t> bytes_read_{0};
  std::atomic<std::uint64_t> bytes_written_{0};
  std::atomic<std::uint64_t> pieces_completed_{0};
  std::atomic<std::uint64_t> short_transfers_{0};
  std::atomic<std::uint64_t> retries_{0};
  std::atomic<std::uint64_t> pieces_failed_{0};
};

enum class EngineKind { automatic, uring, posix };

EngineKind parse_engine_kind(std::string_view text);  // "auto", "uring", "posix"

// automatic: io_uring, or the posix engine with one log line naming why
// io_uring was refused. uring: io_uring or Error{unsupported}.
std::unique_ptr<Engine> make_engine(EngineKind kind, const AioOptions& options);

}  // namespace zinf::aio

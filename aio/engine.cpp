#include "aio/engine.hpp"

#include <algorithm>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "aio/file.hpp"
#include "aio/thread_pool_engine.hpp"
#include "aio/uring_engine.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"
#include "zinf_config.h"

namespace zinf::aio {

struct Engine::TicketState {
  std::uint64_t id = 0;
  std::unique_ptr<Piece[]> pieces;
  std::unique_ptr<std::atomic<bool>[]> piece_finished;
  std::size_t piece_count = 0;
  std::atomic<std::size_t> remaining{0};
  std::atomic<std::uint64_t> bytes{0};
  std::mutex error_mutex;
  std::optional<Error> error;
  bool finished = false;  // guarded by the engine's book_mutex_
  bool claimed = false;   // a wait() owns it; wait_all() leaves it alone (book_mutex_)
  std::chrono::steady_clock::time_point submitted_at;
};

void validate(const AioOptions& options) {
  const auto fail = [](std::string_view key, std::string message) {
    ErrorContext ctx;
    ctx.key_path = fmt::format("aio.{}", key);
    throw Error(ErrorKind::config, fmt::format("aio.{} {}", key, message), std::move(ctx));
  };
  // DeepSpeed takes any multiple of 1 KiB (its tests use 1024); pieces are
  // rounded up to whole 4 KiB (piece_bytes), so O_DIRECT stays aligned.
  if (options.block_size < 1024 || options.block_size % 1024 != 0) {
    fail("block_size", fmt::format("is {}: it must be a positive multiple of 1024 bytes",
                                   options.block_size));
  }
  if (options.block_size > 1 * GiB) {
    fail("block_size", fmt::format("is {}: at most 1 GiB", options.block_size));
  }
  if (options.queue_depth < 1 || options.queue_depth > 4096) {
    fail("queue_depth", fmt::format("is {}: it must be between 1 and 4096", options.queue_depth));
  }
  if (options.intra_op_parallelism < 1 || options.intra_op_parallelism > 256) {
    fail("intra_op_parallelism",
         fmt::format("is {}: it must be between 1 and 256", options.intra_op_parallelism));
  }
}

std::uint64_t piece_bytes(const AioOptions& options) {
  constexpr std::uint64_t kDirectAlignment = 4096;
  return (options.block_size + kDirectAlignment - 1) / kDirectAlignment * kDirectAlignment;
}

Engine::Engine(const AioOptions& options) : options_(options), piece_bytes_(0) {
  validate(options_);
  piece_bytes_ = zinf::aio::piece_bytes(options_);
}

Engine::~Engine() = default;

void Engine::register_buffers(std::span<const MemoryRegion>) {}
void Engine::unregister_buffers() {}
void Engine::register_file(const File&) {}
void Engine::unregister_file(const File&) {}

std::string Engine::description() const {
  return fmt::format("{}: {} worker(s), depth {}, block {}", name(),
                     options_.intra_op_parallelism, options_.queue_depth,
                     format_bytes(options_.block_size));
}

namespace {

// Far beyond any file, and small enough that offset + length cannot wrap.
constexpr std::uint64_t kMaxRequestBytes = std::uint64_t{1} << 62;

void check_request(const Request& request, std::uint64_t block_size) {
  ZINF_CHECK(request.file != nullptr, "aio request without a file");
  const File& file = *request.file;
  if (request.length_bytes == 0) return;
  ZINF_CHECK(request.length_bytes <= kMaxRequestBytes && request.offset_bytes <= kMaxRequestBytes,
             fmt::format("aio {} of {}: offset {} length {} is out of range", to_string(request.op),
                         file.path(), request.offset_bytes, request.length_bytes));
  ZINF_CHECK(request.buffer != nullptr,
             fmt::format("aio {} of {} at offset {} has a null buffer",
                         to_string(request.op), file.path(), request.offset_bytes));
  if (request.op == Op::write && !file.writable()) {
    throw Error(ErrorKind::invalid,
                fmt::format("cannot write {}: it was opened read-only", file.path()));
  }
  if (!file.direct()) return;
  const std::uint32_t offset_alignment = file.offset_alignment();
  const std::uint32_t memory_alignment = file.memory_alignment();
  // Pieces start every piece_bytes, so the piece size must keep them
  // aligned too (drives with 16 KiB sectors need more than 4096).
  if (!is_aligned(block_size, std::max(offset_alignment, memory_alignment))) {
    ErrorContext ctx;
    ctx.path = file.path();
    ctx.key_path = "aio.block_size";
    throw Error(ErrorKind::alignment,
                fmt::format("aio.block_size {} is not a multiple of the O_DIRECT alignment of {} "
                            "({} bytes)",
                            block_size, file.path(), std::max(offset_alignment, memory_alignment)),
                std::move(ctx));
  }
  if (!is_aligned(request.offset_bytes, offset_alignment) ||
      !is_aligned(request.length_bytes, offset_alignment) ||
      !is_aligned(request.buffer, memory_alignment)) {
    ErrorContext ctx;
    ctx.path = file.path();
    ctx.offset_bytes = request.offset_bytes;
    ctx.length_bytes = request.length_bytes;
    ctx.error_number = EINVAL;
    throw Error(ErrorKind::alignment,
                fmt::format("misaligned O_DIRECT {} of {}: offset {} length {} buffer {}; "
                            "this file needs offsets and lengths in multiples of {} and "
                            "buffers aligned to {} bytes",
                            to_string(request.op), file.path(), request.offset_bytes,
                            request.length_bytes, static_cast<const void*>(request.buffer),
                            offset_alignment, memory_alignment),
                std::move(ctx));
  }
}

}  // namespace

Ticket Engine::submit(std::span<const Request> requests) {
  std::size_t piece_count = 0;
  for (const Request& request : requests) {
    check_request(request, piece_bytes_);
    piece_count += request.length_bytes / piece_bytes_ +
                   (request.length_bytes % piece_bytes_ != 0 ? 1 : 0);
  }

  auto state = std::make_unique<TicketState>();
  state->pieces = std::make_unique<Piece[]>(piece_count);
  state->piece_finished = std::make_unique<std::atomic<bool>[]>(piece_count);
  state->piece_count = piece_count;
  state->remaining.store(piece_count, std::memory_order_relaxed);
  state->submitted_at = std::chrono::steady_clock::now();

  std::size_t index = 0;
  for (const Request& request : requests) {
    for (std::uint64_t done = 0; done < request.length_bytes; done += piece_bytes_) {
      Piece& piece = state->pieces[index];
      piece.op = request.op;
      piece.file = request.file;
      piece.offset_bytes = request.offset_bytes + done;
      piece.buffer = request.buffer + done;
      piece.length_bytes = std::min<std::uint64_t>(piece_bytes_, request.length_bytes - done);
      piece.ticket = state.get();
      state->piece_finished[index].store(false, std::memory_order_relaxed);
      ++index;
    }
  }
  std::vector<Piece*> queued(piece_count);
  for (std::size_t i = 0; i < piece_count; ++i) queued[i] = &state->pieces[i];

  Ticket ticket;
  {
    std::lock_guard lock(book_mutex_);
    ticket.id = next_ticket_++;
    state->id = ticket.id;
    state->finished = piece_count == 0;
    tickets_.emplace(ticket.id, std::move(state));
  }
  if (piece_count > 0) {
    try {
      enqueue(queued);
    } catch (...) {
      // Nothing was queued (enqueue gives the strong guarantee): forget it.
      std::lock_guard lock(book_mutex_);
      tickets_.erase(ticket.id);
      throw;
    }
  }
  return ticket;
}

bool Engine::complete(Piece& piece, std::int64_t result) {
  const CompletionOutcome outcome = handle_completion(piece, result);
  if (outcome.short_transfer) short_transfers_.fetch_add(1, std::memory_order_relaxed);
  if (outcome.retried) retries_.fetch_add(1, std::memory_order_relaxed);
  if (outcome.action == CompletionAction::resubmit) return true;

  auto* state = static_cast<TicketState*>(piece.ticket);
  if (outcome.action == CompletionAction::done) {
    (piece.op == Op::read ? bytes_read_ : bytes_written_)
        .fetch_add(piece.length_bytes, std::memory_order_relaxed);
    pieces_completed_.fetch_add(1, std::memory_order_relaxed);
    state->bytes.fetch_add(piece.length_bytes, std::memory_order_relaxed);
  } else {
    pieces_failed_.fetch_add(1, std::memory_order_relaxed);
    std::lock_guard lock(state->error_mutex);
    if (!state->error) {
      state->error.emplace(io_error(to_string(piece.op), piece.file->path(), piece.next_offset(),
                                    piece.remaining_bytes(), outcome.error_number,
                                    outcome.reason));
    }
  }
  const std::size_t index = static_cast<std::size_t>(&piece - state->pieces.get());
  state->piece_finished[index].store(true, std::memory_order_release);
  if (state->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    std::lock_guard lock(book_mutex_);
    state->finished = true;
    book_cv_.notify_all();
  }
  return false;
}

std::uint64_t Engine::take(std::uint64_t id, std::unique_lock<std::mutex>& lock) {
  // Found again by id: other tickets may have been added (rehashing the
  // map) while this thread slept.
  auto it = tickets_.find(id);
  ZINF_ASSERT(it != tickets_.end(), "a claimed ticket vanished");
  std::unique_ptr<TicketState> state = std::move(it->second);
  tickets_.erase(it);
  lock.unlock();
  if (state->error) throw Error(*state->error);
  return state->bytes.load(std::memory_order_relaxed);
}

Engine::TicketState& Engine::claim(Ticket ticket) {
  auto it = tickets_.find(ticket.id);
  if (it == tickets_.end() || it->second->claimed) {
    throw Error(ErrorKind::invalid,
                fmt::format("ticket {} is unknown, already waited on, or being waited on by "
                            "another thread",
                            ticket.id));
  }
  it->second->claimed = true;
  return *it->second;
}

std::uint64_t Engine::wait(Ticket ticket) {
  std::unique_lock lock(book_mutex_);
  TicketState& state = claim(ticket);
  book_cv_.wait(lock, [&state] { return state.finished; });
  return take(ticket.id, lock);
}

std::uint64_t Engine::wait(Ticket ticket, std::chrono::milliseconds timeout) {
  std::unique_lock lock(book_mutex_);
  TicketState& state = claim(ticket);
  if (!book_cv_.wait_for(lock, timeout, [&state] { return state.finished; })) {
    state.claimed = false;  // the caller may wait again
    const std::string report = in_flight_report(state);
    throw Error(ErrorKind::timeout,
                fmt::format("timed out after {} ms waiting for ticket {} on the {} engine: {}",
                            timeout.count(), ticket.id, name(), report));
  }
  return take(ticket.id, lock);
}

std::string Engine::in_flight_report(const TicketState& state) const {
  std::size_t pending = 0;
  std::string listed;
  constexpr std::size_t kListed = 4;
  for (std::size_t i = 0; i < state.piece_count; ++i) {
    if (state.piece_finished[i].load(std::memory_order_acquire)) continue;
    if (pending < kListed) {
      const Piece& piece = state.pieces[i];
      listed += fmt::format("{}{} {} offset {} length {}", pending == 0 ? "" : "; ",
                            to_string(piece.op), piece.file->path(), piece.offset_bytes,
                            piece.length_bytes);
    }
    ++pending;
  }
  const auto age = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - state.submitted_at);
  return fmt::format("{} of {} pieces still in flight, submitted {} ms ago: {}{}", pending,
                     state.piece_count, age.count(), listed,
                     pending > kListed ? fmt::format("; and {} more", pending - kListed) : "");
}

bool Engine::ready(Ticket ticket) const {
  std::lock_guard lock(book_mutex_);
  auto it = tickets_.find(ticket.id);
  if (it == tickets_.end()) {
    throw Error(ErrorKind::invalid,
                fmt::format("ticket {} is unknown or was already waited on", ticket.id));
  }
  return it->second->finished;
}

void Engine::wait_all() {
  std::unique_lock lock(book_mutex_);
  // Tickets another thread is waiting on are that thread's to collect.
  book_cv_.wait(lock, [this] {
    return std::all_of(tickets_.begin(), tickets_.end(), [](const auto& entry) {
      return entry.second->claimed || entry.second->finished;
    });
  });
  std::optional<Error> first;
  std::uint64_t first_id = 0;
  for (auto it = tickets_.begin(); it != tickets_.end();) {
    if (it->second->claimed) {
      ++it;
      continue;
    }
    if (it->second->error && (!first || it->first < first_id)) {
      first.emplace(*it->second->error);
      first_id = it->first;
    }
    it = tickets_.erase(it);
  }
  lock.unlock();
  if (first) throw Error(*first);
}

bool Engine::file_in_flight(const File& file) const {
  std::lock_guard lock(book_mutex_);
  for (const auto& [id, state] : tickets_) {
    if (state->finished) continue;
    for (std::size_t i = 0; i < state->piece_count; ++i) {
      if (state->pieces[i].file == &file &&
          !state->piece_finished[i].load(std::memory_order_acquire)) {
        return true;
      }
    }
  }
  return false;
}

std::size_t Engine::outstanding_tickets() const {
  std::lock_guard lock(book_mutex_);
  return tickets_.size();
}

void Engine::drain() noexcept {
  std::unique_lock lock(book_mutex_);
  book_cv_.wait(lock, [this] {
    return std::all_of(tickets_.begin(), tickets_.end(),
                       [](const auto& entry) { return entry.second->finished; });
  });
}

EngineStats Engine::stats() const {
  EngineStats stats;
  stats.bytes_read = bytes_read_.load(std::memory_order_relaxed);
  stats.bytes_written = bytes_written_.load(std::memory_order_relaxed);
  stats.pieces_completed = pieces_completed_.load(std::memory_order_relaxed);
  stats.short_transfers = short_transfers_.load(std::memory_order_relaxed);
  stats.retries = retries_.load(std::memory_order_relaxed);
  stats.pieces_failed = pieces_failed_.load(std::memory_order_relaxed);
  return stats;
}

EngineKind parse_engine_kind(std::string_view text) {
  if (text == "auto" || text == "automatic") return EngineKind::automatic;
  if (text == "uring" || text == "io_uring") return EngineKind::uring;
  if (text == "posix") return EngineKind::posix;
  throw Error(ErrorKind::invalid,
              fmt::format("unknown engine '{}': expected auto, uring or posix", text));
}

std::unique_ptr<Engine> make_engine(EngineKind kind, const AioOptions& options) {
  validate(options);
  if (kind == EngineKind::posix) return make_posix_engine(options);
#if ZINF_HAVE_LIBURING
  try {
    return std::make_unique<UringEngine>(options);
  } catch (const Error& error) {
    if (kind == EngineKind::uring || error.kind() != ErrorKind::unsupported) throw;
    log_once("uring-fallback", spdlog::level::warn,
             fmt::format("io_uring is not available ({}); using the posix thread-pool engine",
                         error.what()));
    return make_posix_engine(options);
  }
#else
  if (kind == EngineKind::uring) {
    throw Error(ErrorKind::unsupported,
                "this zinf was built without liburing: install liburing-dev and rebuild");
  }
  log_once("uring-fallback", spdlog::level::warn,
           "zinf was built without liburing; using the posix thread-pool engine");
  return make_posix_engine(options);
#endif
}

}  // namespace zinf::aio

// The one place that interprets a transfer's result, for every engine.
// A result is what the kernel reports: bytes transferred, or -errno.
//   - the whole remainder done            -> done
//   - fewer bytes, more than zero         -> resubmit the rest (short transfer)
//   - -EINTR / -EAGAIN                    -> resubmit unchanged, up to a bound
//   - zero bytes with bytes still to go   -> fail: early end of file (read) or
//                                            no progress (write)
//   - more bytes than asked               -> fail: a broken kernel or device
//   - any other -errno                    -> fail with that errno
#pragma once

#include <cstdint>

#include "aio/request.hpp"

namespace zinf::aio {

class File;

// One block_size slice of a request, tracked until it is done. Pieces are
// owned by their ticket; the ring only holds their address.
struct Piece {
  Op op = Op::read;
  const File* file = nullptr;
  std::uint64_t offset_bytes = 0;  // where the piece starts (fixed)
  std::byte* buffer = nullptr;     // where the piece starts (fixed)
  std::uint64_t length_bytes = 0;  // whole piece (fixed)
  std::uint64_t done_bytes = 0;    // progress, owned by the worker running it
  std::uint32_t retries = 0;
  int fixed_file = -1;    // io_uring registered file slot, -1 for none
  int fixed_buffer = -1;  // io_uring registered buffer index, -1 for none
  void* ticket = nullptr; // the engine's ticket state

  std::uint64_t next_offset() const { return offset_bytes + done_bytes; }
  std::byte* next_buffer() const { return buffer + done_bytes; }
  std::uint64_t remaining_bytes() const { return length_bytes - done_bytes; }
};

enum class CompletionAction { done, resubmit, fail };

struct CompletionOutcome {
  CompletionAction action = CompletionAction::done;
  int error_number = 0;       // for fail
  const char* reason = "";    // for fail: a short human description
  bool short_transfer = false;
  bool retried = false;
};

// How many EINTR/EAGAIN results in a row a piece may see before it fails.
inline constexpr std::uint32_t kMaxRetries = 1000;

// Applies `result` to `piece` (advancing done_bytes on partial progress) and
// says what to do next.
CompletionOutcome handle_completion(Piece& piece, std::int64_t result);

}  // namespace zinf::aio

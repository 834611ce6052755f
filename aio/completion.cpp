#include "aio/completion.hpp"

#include <cerrno>

namespace zinf::aio {

CompletionOutcome handle_completion(Piece& piece, std::int64_t result) {
  CompletionOutcome outcome;
  const std::uint64_t remaining = piece.remaining_bytes();
  if (result < 0) {
    const int error = static_cast<int>(-result);
    if (error == EINTR || error == EAGAIN) {
      if (++piece.retries > kMaxRetries) {
        outcome.action = CompletionAction::fail;
        outcome.error_number = error;
        outcome.reason = "still refused after the retry limit";
        return outcome;
      }
      outcome.action = CompletionAction::resubmit;
      outcome.retried = true;
      return outcome;
    }
    outcome.action = CompletionAction::fail;
    outcome.error_number = error;
    return outcome;
  }
  const auto transferred = static_cast<std::uint64_t>(result);
  if (transferred > remaining) {
    outcome.action = CompletionAction::fail;
    outcome.error_number = EIO;
    outcome.reason = "the device reported more bytes than were asked for";
    return outcome;
  }
  if (transferred == 0 && remaining > 0) {
    outcome.action = CompletionAction::fail;
    if (piece.op == Op::read) {
      outcome.error_number = ENODATA;
      outcome.reason = "unexpected end of file";
    } else {
      outcome.error_number = EIO;
      outcome.reason = "the write made no progress";
    }
    return outcome;
  }
  piece.retries = 0;  // progress resets the EINTR/EAGAIN budget
  piece.done_bytes += transferred;
  if (piece.done_bytes == piece.length_bytes) {
    outcome.action = CompletionAction::done;
    return outcome;
  }
  outcome.action = CompletionAction::resubmit;
  outcome.short_transfer = true;
  return outcome;
}

}  // namespace zinf::aio

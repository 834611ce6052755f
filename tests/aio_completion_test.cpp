// The one function that reads every transfer result (aio/completion.hpp).
#include <cerrno>

#include <gtest/gtest.h>

#include "aio/completion.hpp"

namespace zinf::aio {
namespace {

Piece make_piece(Op op, std::uint64_t length) {
  Piece piece;
  piece.op = op;
  piece.offset_bytes = 4096;
  piece.length_bytes = length;
  return piece;
}

TEST(Completion, FullTransferIsDone) {
  Piece piece = make_piece(Op::read, 8192);
  EXPECT_EQ(handle_completion(piece, 8192).action, CompletionAction::done);
  EXPECT_EQ(piece.done_bytes, 8192u);
}

TEST(Completion, ShortTransferResubmitsTheRest) {
  Piece piece = make_piece(Op::write, 8192);
  const CompletionOutcome outcome = handle_completion(piece, 4096);
  EXPECT_EQ(outcome.action, CompletionAction::resubmit);
  EXPECT_TRUE(outcome.short_transfer);
  EXPECT_EQ(piece.next_offset(), 8192u);
  EXPECT_EQ(piece.remaining_bytes(), 4096u);
  EXPECT_EQ(handle_completion(piece, 4096).action, CompletionAction::done);
}

TEST(Completion, EintrAndEagainAreRetriedUnchanged) {
  Piece piece = make_piece(Op::read, 4096);
  for (int error : {EINTR, EAGAIN}) {
    const CompletionOutcome outcome = handle_completion(piece, -error);
    EXPECT_EQ(outcome.action, CompletionAction::resubmit);
    EXPECT_TRUE(outcome.retried);
    EXPECT_EQ(piece.done_bytes, 0u);
  }
}

TEST(Completion, EndlessEagainFailsAfterTheRetryLimit) {
  Piece piece = make_piece(Op::read, 4096);
  CompletionOutcome outcome;
  std::uint32_t attempts = 0;
  do {
    outcome = handle_completion(piece, -EAGAIN);
    ++attempts;
  } while (outcome.action == CompletionAction::resubmit && attempts < 10 * kMaxRetries);
  EXPECT_EQ(outcome.action, CompletionAction::fail);
  EXPECT_EQ(outcome.error_number, EAGAIN);
  EXPECT_EQ(attempts, kMaxRetries + 1);
}

TEST(Completion, ProgressResetsTheRetryBudget) {
  Piece piece = make_piece(Op::read, 2 * 4096);
  for (std::uint32_t i = 0; i < kMaxRetries; ++i) handle_completion(piece, -EAGAIN);
  EXPECT_EQ(handle_completion(piece, 4096).action, CompletionAction::resubmit);
  EXPECT_EQ(handle_completion(piece, -EAGAIN).action, CompletionAction::resubmit);
}

TEST(Completion, ZeroBytesOnReadIsUnexpectedEof) {
  Piece piece = make_piece(Op::read, 4096);
  const CompletionOutcome outcome = handle_completion(piece, 0);
  EXPECT_EQ(outcome.action, CompletionAction::fail);
  EXPECT_EQ(outcome.error_number, ENODATA);
  EXPECT_STREQ(outcome.reason, "unexpected end of file");
}

TEST(Completion, ZeroBytesOnWriteIsNoProgress) {
  Piece piece = make_piece(Op::write, 4096);
  const CompletionOutcome outcome = handle_completion(piece, 0);
  EXPECT_EQ(outcome.action, CompletionAction::fail);
  EXPECT_EQ(outcome.error_number, EIO);
}

TEST(Completion, OverLongResultIsAnError) {
  Piece piece = make_piece(Op::read, 4096);
  const CompletionOutcome outcome = handle_completion(piece, 8192);
  EXPECT_EQ(outcome.action, CompletionAction::fail);
  EXPECT_EQ(piece.done_bytes, 0u);
}

TEST(Completion, OtherErrnoFails) {
  Piece piece = make_piece(Op::write, 4096);
  for (int error : {EIO, ENOSPC, EBADF, EINVAL}) {
    const CompletionOutcome outcome = handle_completion(piece, -error);
    EXPECT_EQ(outcome.action, CompletionAction::fail);
    EXPECT_EQ(outcome.error_number, error);
  }
}

}  // namespace
}  // namespace zinf::aio

// Behaviour every engine shares, run against io_uring, posix and memory.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <future>
#include <cstring>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include "aio/engine.hpp"
#include "aio/file.hpp"
#include "aio/thread_pool_engine.hpp"
#include "aio/uring_engine.hpp"
#include "core/error.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "test_util.hpp"
#include "zinf_config.h"

namespace zinf::aio {
namespace {

using zinf::testing::aligned_bytes;
using zinf::testing::fill_random;
using zinf::testing::TempDir;

struct EngineCase {
  std::string kind;  // uring, posix, memory
  AioOptions options;
  std::string label;
};

std::unique_ptr<Engine> make(const EngineCase& c) {
  if (c.kind == "memory") return make_memory_engine(c.options);
  if (c.kind == "posix") return make_posix_engine(c.options);
  return make_engine(EngineKind::uring, c.options);
}

class EngineTest : public ::testing::TestWithParam<EngineCase> {
 protected:
  void SetUp() override {
#if !ZINF_HAVE_LIBURING
    if (GetParam().kind == "uring") GTEST_SKIP() << "built without liburing";
#endif
    try {
      engine_ = make(GetParam());
    } catch (const Error& error) {
      if (error.kind() == ErrorKind::unsupported) GTEST_SKIP() << "io_uring refused here: " << error.what();
      throw;
    }
    file_ = std::make_unique<File>(File::open(dir_ / "data.bin", OpenMode::create));
    engine_->register_file(*file_);
  }
  void TearDown() override {
    if (engine_ && file_) engine_->unregister_file(*file_);
  }
  std::uint32_t unit() const { return std::max<std::uint32_t>(file_->offset_alignment(), 1); }

  TempDir dir_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<File> file_;
};

TEST_P(EngineTest, WriteThenReadRandomSizesAndOffsets) {
  std::mt19937_64 random(42);
  const std::uint64_t u = 4096;
  struct Extent {
    std::uint64_t offset, length;
  };
  std::vector<Extent> extents;
  std::uint64_t offset = 0;
  for (int i = 0; i < 24; ++i) {
    const std::uint64_t length = (1 + random() % 700) * u;  // up to ~2.7 MiB: several pieces
    offset += (random() % 3) * u;                            // leave holes sometimes
    extents.push_back({offset, length});
    offset += length;
  }
  auto source = aligned_bytes(offset);
  fill_random({source.get(), offset}, 7);
  std::vector<Request> writes;
  for (const Extent& e : extents) {
    writes.push_back({Op::write, file_.get(), e.offset, source.get() + e.offset, e.length});
  }
  std::uint64_t total = 0;
  for (const Extent& e : extents) total += e.length;
  EXPECT_EQ(engine_->wait(engine_->submit(writes)), total);

  auto back = aligned_bytes(offset);
  std::memset(back.get(), 0xAB, offset);
  std::vector<Ticket> tickets;
  for (const Extent& e : extents) {
    tickets.push_back(engine_->submit({Op::read, file_.get(), e.offset, back.get() + e.offset, e.length}));
  }
  std::reverse(tickets.begin(), tickets.end());  // waiting order is the caller's business
  for (Ticket t : tickets) engine_->wait(t);
  for (const Extent& e : extents) {
    ASSERT_EQ(std::memcmp(source.get() + e.offset, back.get() + e.offset, e.length), 0)
        << "extent at " << e.offset << " length " << e.length;
  }
}

TEST_P(EngineTest, MisalignedRequestIsRefusedBeforeSubmission) {
  if (!file_->direct()) GTEST_SKIP() << "file is not O_DIRECT here (" << file_->filesystem() << ")";
  auto buffer = aligned_bytes(3 * 4096);
  const auto stats_before = engine_->stats();
  struct Case {
    std::uint64_t offset;
    std::size_t buffer_shift;
    std::uint64_t length;
  };
  for (const Case c : {Case{1, 0, 4096}, Case{0, 1, 4096}, Case{0, 0, 100}}) {
    try {
      engine_->submit({Op::write, file_.get(), c.offset, buffer.get() + c.buffer_shift, c.length});
      ADD_FAILURE() << "accepted offset " << c.offset << " shift " << c.buffer_shift;
    } catch (const Error& error) {
      EXPECT_EQ(error.kind(), ErrorKind::alignment);
      EXPECT_EQ(error.context().path, file_->path());
      EXPECT_EQ(error.context().offset_bytes, c.offset);
    }
  }
  EXPECT_EQ(engine_->outstanding_tickets(), 0u);
  EXPECT_EQ(engine_->stats().pieces_completed, stats_before.pieces_completed);
}

TEST_P(EngineTest, ReadPastEndOfFileIsAnErrorNotSuccess) {
  auto buffer = aligned_bytes(8192);
  std::memset(buffer.get(), 1, 8192);
  engine_->wait(engine_->submit({Op::write, file_.get(), 0, buffer.get(), 4096}));
  try {
    engine_->wait(engine_->submit({Op::read, file_.get(), 0, buffer.get(), 8192}));
    FAIL() << "a read past EOF succeeded";
  } catch (const Error& error) {
    EXPECT_EQ(error.context().path, file_->path());
    EXPECT_EQ(error.context().offset_bytes, 4096u);
    EXPECT_NE(std::string(error.what()).find("end of file"), std::string::npos);
  }
}

TEST_P(EngineTest, UnregisteringAFileWithIoInFlightIsRefused) {
  const std::uint64_t size = 64 << 20;
  auto buffer = aligned_bytes(size);
  const Ticket t = engine_->submit({Op::write, file_.get(), 0, buffer.get(), size});
  bool refused = false;
  try {
    engine_->unregister_file(*file_);
  } catch (const Error& error) {
    refused = true;
    EXPECT_NE(std::string(error.what()).find("in flight"), std::string::npos);
  }
  const bool finished_before = engine_->ready(t);
  engine_->wait(t);
  // Engines without fixed files have nothing to refuse; the io_uring one
  // must refuse while pieces that carry the slot are queued.
  if (dynamic_cast<ThreadPoolEngine*>(engine_.get()) == nullptr && !finished_before) {
    EXPECT_TRUE(refused);
  }
  engine_->register_file(*file_);
}

TEST_P(EngineTest, AbsurdLengthsAreRefused) {
  auto buffer = aligned_bytes(4096);
  EXPECT_THROW(engine_->submit({Op::read, file_.get(), 0, buffer.get(), UINT64_MAX - 4095}), Error);
  EXPECT_EQ(engine_->outstanding_tickets(), 0u);
}

TEST_P(EngineTest, WaitingTwiceOnATicketIsRefused) {
  auto buffer = aligned_bytes(4096);
  const Ticket t = engine_->submit({Op::write, file_.get(), 0, buffer.get(), 4096});
  engine_->wait(t);
  EXPECT_THROW(engine_->wait(t), Error);
}

TEST_P(EngineTest, WaitAllCollectsEveryTicket) {
  auto buffer = aligned_bytes(64 * 4096);
  for (int i = 0; i < 16; ++i) {
    engine_->submit({Op::write, file_.get(), static_cast<std::uint64_t>(i) * 4 * 4096,
                     buffer.get() + i * 4 * 4096, 4 * 4096});
  }
  engine_->wait_all();
  EXPECT_EQ(engine_->outstanding_tickets(), 0u);
  EXPECT_EQ(engine_->stats().bytes_written, 64u * 4096);
}

TEST_P(EngineTest, ConcurrentSubmittersEachWaitOnTheirOwnTickets) {
  constexpr int kThreads = 4;
  constexpr std::uint64_t kSlice = 256 * 1024;
  auto source = aligned_bytes(kThreads * kSlice);
  fill_random({source.get(), kThreads * kSlice}, 3);
  auto back = aligned_bytes(kThreads * kSlice);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      try {
        const std::uint64_t off = t * kSlice;
        for (int round = 0; round < 8; ++round) {
          engine_->wait(engine_->submit({Op::write, file_.get(), off, source.get() + off, kSlice}));
          engine_->wait(engine_->submit({Op::read, file_.get(), off, back.get() + off, kSlice}));
          if (std::memcmp(source.get() + off, back.get() + off, kSlice) != 0) ++failures;
        }
      } catch (...) {
        ++failures;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
}

TEST_P(EngineTest, PoolBuffersRegisteredWithTheEngineRoundTrip) {
  PinnedPoolOptions pool_options;
  pool_options.budget_bytes = 8 << 20;
  PinnedPool pool(pool_options);
  const MemoryRegion region = pool.region();
  engine_->register_buffers(std::span(&region, 1));
  {
    PinnedBuffer out = pool.acquire(3 << 20);
    PinnedBuffer in = pool.acquire(3 << 20);
    fill_random(out.span(), 11);
    engine_->wait(engine_->submit({Op::write, file_.get(), 0, out.data(), out.size()}));
    engine_->wait(engine_->submit({Op::read, file_.get(), 0, in.data(), in.size()}));
    EXPECT_EQ(std::memcmp(out.data(), in.data(), out.size()), 0);
  }
#if ZINF_HAVE_LIBURING
  if (auto* uring = dynamic_cast<UringEngine*>(engine_.get())) {
    EXPECT_TRUE(uring->fixed_buffers_enabled()) << uring->description();
  }
#endif
  engine_->unregister_buffers();
}

TEST_P(EngineTest, RegisteringBuffersWhileBusyIsRefused) {
  auto buffer = aligned_bytes(4 << 20);
  const Ticket t = engine_->submit({Op::write, file_.get(), 0, buffer.get(), 4 << 20});
  const MemoryRegion region{buffer.get(), 4 << 20};
  if (dynamic_cast<ThreadPoolEngine*>(engine_.get()) == nullptr && !engine_->ready(t)) {
    EXPECT_THROW(engine_->register_buffers(std::span(&region, 1)), Error);
  }
  engine_->wait(t);
}

AioOptions options(std::uint64_t block, std::uint32_t depth, std::uint32_t threads,
                   bool single = false, bool overlap = true) {
  AioOptions o;
  o.block_size = block;
  o.queue_depth = depth;
  o.intra_op_parallelism = threads;
  o.single_submit = single;
  o.overlap_events = overlap;
  return o;
}

AioOptions sqpoll(AioOptions o) {
  o.use_sqpoll = true;
  return o;
}

INSTANTIATE_TEST_SUITE_P(
    Engines, EngineTest,
    ::testing::Values(
        EngineCase{"uring", options(64 << 10, 8, 1), "uring_64K_qd8"},
        EngineCase{"uring", options(128 << 10, 4, 2, true, true), "uring_2rings_single_submit"},
        EngineCase{"uring", options(256 << 10, 16, 2, false, false), "uring_batch_waits"},
        EngineCase{"uring", options(1 << 20, 32, 1), "uring_1M_qd32"},
        EngineCase{"uring", sqpoll(options(64 << 10, 8, 1)), "uring_sqpoll"},
        EngineCase{"posix", options(64 << 10, 4, 2), "posix"},
        // DeepSpeed's tests use 1 KiB blocks: pieces round up to 4 KiB.
        EngineCase{"uring", options(1024, 2, 2), "uring_1K_blocks"},
        EngineCase{"posix", options(5 << 10, 2, 2), "posix_5K_blocks"},
        EngineCase{"memory", options(64 << 10, 4, 1), "memory"}),
    [](const auto& info) { return info.param.label; });

TEST(EngineOptions, OutOfRangeOptionsNameTheAioKey) {
  AioOptions o;
  o.block_size = 1000;
  try {
    make_posix_engine(o);
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_EQ(error.context().key_path, "aio.block_size");
  }
  o = AioOptions{};
  o.queue_depth = 0;
  EXPECT_THROW(make_posix_engine(o), Error);
  o = AioOptions{};
  o.intra_op_parallelism = 0;
  EXPECT_THROW(make_posix_engine(o), Error);
}

TEST(EngineOptions, BlockSizesInKibMultiplesRoundUpToWholePages) {
  EXPECT_EQ(piece_bytes(options(1024, 1, 1)), 4096u);
  EXPECT_EQ(piece_bytes(options(5 << 10, 1, 1)), 8192u);
  EXPECT_EQ(piece_bytes(options(1 << 20, 1, 1)), std::uint64_t{1} << 20);
  const auto engine = make_posix_engine(options(1024, 1, 1));
  EXPECT_EQ(engine->options().block_size, 1024u);  // what the user asked for is kept
  EXPECT_EQ(engine->piece_bytes(), 4096u);
}

TEST(EngineKinds, ParseNamesAndRejectOthers) {
  EXPECT_EQ(parse_engine_kind("auto"), EngineKind::automatic);
  EXPECT_EQ(parse_engine_kind("uring"), EngineKind::uring);
  EXPECT_EQ(parse_engine_kind("posix"), EngineKind::posix);
  EXPECT_THROW(parse_engine_kind("libaio"), Error);
}

TEST(EngineWrites, WriteToReadOnlyFileIsRefused) {
  TempDir dir;
  File::open(dir / "a", OpenMode::create);
  File file = File::open(dir / "a", OpenMode::read_only);
  auto engine = make_posix_engine(AioOptions{});
  auto buffer = aligned_bytes(4096);
  EXPECT_THROW(engine->submit({Op::write, &file, 0, buffer.get(), 4096}), Error);
}

#if ZINF_HAVE_LIBURING
std::unique_ptr<UringEngine> uring_or_null(const AioOptions& o) {
  try {
    return std::make_unique<UringEngine>(o);
  } catch (const Error& error) {
    if (error.kind() == ErrorKind::unsupported) return nullptr;
    throw;
  }
}
#endif

// The real io_uring reaping path fed short transfers and -EAGAIN (a fast
// disk never produces them): every piece is resubmitted until done and the
// data is exact.
TEST(UringRetries, ShortTransfersAndEagainAreResubmittedUntilTheDataIsExact) {
#if ZINF_HAVE_LIBURING
  auto engine = uring_or_null(options(64 << 10, 4, 2));
  if (!engine) GTEST_SKIP() << "io_uring refused here";
  std::atomic<std::uint64_t> seen{0};
  engine->set_completion_filter_for_testing([&](const Piece&, std::int64_t result) -> std::int64_t {
    const std::uint64_t n = seen.fetch_add(1);
    if (result <= 0) return result;
    if (n % 3 == 0) return -EAGAIN;
    // A block-aligned short transfer, as O_DIRECT gives them.
    if (n % 3 == 1 && result >= 8192) return result / 2 / 4096 * 4096;
    return result;
  });
  TempDir dir;
  File file = File::open(dir / "data.bin", OpenMode::create);
  engine->register_file(file);
  const std::uint64_t size = 4 << 20;
  auto source = aligned_bytes(size);
  auto back = aligned_bytes(size);
  fill_random({source.get(), size}, 11);
  engine->wait(engine->submit({Op::write, &file, 0, source.get(), size}));
  engine->wait(engine->submit({Op::read, &file, 0, back.get(), size}));
  EXPECT_EQ(std::memcmp(source.get(), back.get(), size), 0);
  const EngineStats stats = engine->stats();
  EXPECT_GT(stats.short_transfers, 0u);
  EXPECT_GT(stats.retries, 0u);
  EXPECT_EQ(stats.pieces_failed, 0u);
  EXPECT_EQ(stats.bytes_written, size);
  EXPECT_EQ(stats.bytes_read, size);
  engine->unregister_file(file);
#else
  GTEST_SKIP() << "built without liburing";
#endif
}

// With a completion held back, the piece is certainly in flight: a fixed
// file it uses cannot be unregistered (on any disk, however fast).
TEST(UringRetries, AFileWithAPieceInFlightCannotBeUnregistered) {
#if ZINF_HAVE_LIBURING
  auto engine = uring_or_null(options(64 << 10, 4, 1));
  if (!engine) GTEST_SKIP() << "io_uring refused here";
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> holding{false};
  engine->set_completion_filter_for_testing([&](const Piece&, std::int64_t result) {
    holding = true;
    released.wait();
    return result;
  });
  TempDir dir;
  File file = File::open(dir / "data.bin", OpenMode::create);
  engine->register_file(file);
  auto buffer = aligned_bytes(64 << 10);
  const Ticket ticket = engine->submit({Op::write, &file, 0, buffer.get(), 64 << 10});
  while (!holding) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_FALSE(engine->ready(ticket));
  try {
    engine->unregister_file(file);
    ADD_FAILURE() << "a file with a piece in flight was unregistered";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("in flight"), std::string::npos) << error.what();
  }
  release.set_value();
  engine->wait(ticket);
  engine->unregister_file(file);
#else
  GTEST_SKIP() << "built without liburing";
#endif
}

}  // namespace
}  // namespace zinf::aio

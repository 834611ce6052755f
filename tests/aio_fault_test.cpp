// Seeded fault injection: the memory engine (and the posix engine on real
// files) must turn every injected fault into either correct data or an
// error that names path, offset, length and errno.
#include <cerrno>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>

#include "aio/file.hpp"
#include "aio/thread_pool_engine.hpp"
#include "core/error.hpp"
#include "test_util.hpp"

namespace zinf::aio {
namespace {

using zinf::testing::aligned_bytes;
using zinf::testing::fill_random;
using zinf::testing::TempDir;

constexpr std::uint64_t kBlock = 64 << 10;

AioOptions small_blocks() {
  AioOptions o;
  o.block_size = kBlock;
  o.queue_depth = 4;
  return o;
}

class FaultTest : public ::testing::Test {
 protected:
  File open(const std::string& name) { return File::open(dir_ / name, OpenMode::create); }
  TempDir dir_;
};

TEST_F(FaultTest, InjectedEioSurfacesWithPathOffsetLengthAndErrno) {
  FaultPlan plan;
  plan.seed = 5;
  plan.errors.push_back({Op::read, 512 << 10, (512 << 10) + 4096, EIO, "", UINT32_MAX});
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("a.bin");
  auto buffer = aligned_bytes(1 << 20);
  engine->wait(engine->submit({Op::write, &file, 0, buffer.get(), 1 << 20}));
  try {
    engine->wait(engine->submit({Op::read, &file, 0, buffer.get(), 1 << 20}));
    FAIL() << "EIO was swallowed";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::io);
    EXPECT_EQ(error.error_number(), EIO);
    EXPECT_EQ(error.context().path, file.path());
    EXPECT_EQ(error.context().offset_bytes, 512u << 10);  // the failing piece
    EXPECT_EQ(error.context().length_bytes, kBlock);
    EXPECT_NE(std::string(error.what()).find("EIO"), std::string::npos);
  }
  EXPECT_EQ(engine->stats().pieces_failed, 1u);
}

TEST_F(FaultTest, ShortTransfersAreCompletedNotTakenAsSuccess) {
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(::testing::Message() << "fault seed " << seed);
    FaultPlan plan;
    plan.seed = seed;
    plan.short_transfer_rate = 0.5;
    auto engine = make_memory_engine(small_blocks(), plan);
    File file = open("s.bin");
    const std::uint64_t size = 3 * (1 << 20) + 4096 * 3;
    auto out = aligned_bytes(size);
    auto in = aligned_bytes(size);
    fill_random({out.get(), size}, seed);
    EXPECT_EQ(engine->wait(engine->submit({Op::write, &file, 0, out.get(), size})), size);
    EXPECT_EQ(engine->wait(engine->submit({Op::read, &file, 0, in.get(), size})), size);
    EXPECT_EQ(std::memcmp(out.get(), in.get(), size), 0);
    EXPECT_GT(engine->stats().short_transfers, 0u);
  }
}

TEST_F(FaultTest, EagainStormsAreRetried) {
  FaultPlan plan;
  plan.seed = 9;
  plan.eagain_rate = 0.3;
  plan.eagain_storm_length = 25;
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("e.bin");
  const std::uint64_t size = 2 << 20;
  auto out = aligned_bytes(size);
  auto in = aligned_bytes(size);
  fill_random({out.get(), size}, 9);
  engine->wait(engine->submit({Op::write, &file, 0, out.get(), size}));
  engine->wait(engine->submit({Op::read, &file, 0, in.get(), size}));
  EXPECT_EQ(std::memcmp(out.get(), in.get(), size), 0);
  EXPECT_GT(engine->stats().retries, 25u);
}

TEST_F(FaultTest, EndlessEagainFailsInsteadOfHanging) {
  FaultPlan plan;
  plan.errors.push_back({Op::write, 0, UINT64_MAX, EAGAIN, "", UINT32_MAX});
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("x.bin");
  auto buffer = aligned_bytes(4096);
  try {
    engine->wait(engine->submit({Op::write, &file, 0, buffer.get(), 4096}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), EAGAIN);
    EXPECT_NE(std::string(error.what()).find("retry limit"), std::string::npos);
  }
}

TEST_F(FaultTest, InjectedEnospcIsNoSpaceAndKeepsEarlierData) {
  FaultPlan plan;
  plan.errors.push_back({Op::write, 1 << 20, UINT64_MAX, ENOSPC, "", UINT32_MAX});
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("n.bin");
  const std::uint64_t size = 1 << 20;
  auto first = aligned_bytes(size);
  fill_random({first.get(), size}, 1);
  engine->wait(engine->submit({Op::write, &file, 0, first.get(), size}));
  auto second = aligned_bytes(size);
  try {
    engine->wait(engine->submit({Op::write, &file, size, second.get(), size}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::no_space);
    EXPECT_EQ(error.context().offset_bytes, size);
  }
  auto back = aligned_bytes(size);
  engine->wait(engine->submit({Op::read, &file, 0, back.get(), size}));
  EXPECT_EQ(std::memcmp(first.get(), back.get(), size), 0);
}

TEST_F(FaultTest, DeviceCapacityCutsWritesShortThenEnospc) {
  auto engine = make_memory_engine(small_blocks(), FaultPlan{}, 1 << 20);
  File file = open("c.bin");
  auto buffer = aligned_bytes(2 << 20);
  try {
    engine->wait(engine->submit({Op::write, &file, 0, buffer.get(), 2 << 20}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::no_space);
    EXPECT_GE(*error.context().offset_bytes, 1u << 20);
  }
}

TEST_F(FaultTest, TimeoutReportsWhatIsStillInFlightAndTicketStaysValid) {
  FaultPlan plan;
  plan.latency = std::chrono::milliseconds(300);
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("slow.bin");
  auto buffer = aligned_bytes(kBlock);
  const Ticket t = engine->submit({Op::write, &file, 0, buffer.get(), kBlock});
  try {
    engine->wait(t, std::chrono::milliseconds(20));
    FAIL() << "did not time out";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::timeout);
    const std::string text = error.what();
    EXPECT_NE(text.find("1 of 1 pieces still in flight"), std::string::npos) << text;
    EXPECT_NE(text.find(file.path()), std::string::npos) << text;
    EXPECT_NE(text.find("offset 0 length 65536"), std::string::npos) << text;
  }
  EXPECT_EQ(engine->wait(t), kBlock);
}

TEST_F(FaultTest, WaitAllLeavesTicketsOtherThreadsAreWaitingOn) {
  FaultPlan plan;
  plan.latency = std::chrono::milliseconds(150);
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("claimed.bin");
  auto buffer = aligned_bytes(2 * kBlock);
  const Ticket theirs = engine->submit({Op::write, &file, 0, buffer.get(), kBlock});
  std::uint64_t their_bytes = 0;
  std::thread waiter([&] { their_bytes = engine->wait(theirs); });
  std::this_thread::sleep_for(std::chrono::milliseconds(30));  // let it claim the ticket
  EXPECT_THROW(engine->wait(theirs), Error);  // one waiter per ticket
  engine->submit({Op::write, &file, kBlock, buffer.get() + kBlock, kBlock});
  engine->wait_all();
  waiter.join();
  EXPECT_EQ(their_bytes, kBlock);
  EXPECT_EQ(engine->outstanding_tickets(), 0u);
}

TEST_F(FaultTest, ErrorsInOneTicketDoNotLeakIntoAnother) {
  FaultPlan plan;
  plan.errors.push_back({Op::write, 0, 4096, EIO, "bad", UINT32_MAX});
  auto engine = make_memory_engine(small_blocks(), plan);
  File bad = open("bad.bin");
  File good = open("good.bin");
  auto buffer = aligned_bytes(4096);
  const Ticket failing = engine->submit({Op::write, &bad, 0, buffer.get(), 4096});
  const Ticket fine = engine->submit({Op::write, &good, 0, buffer.get(), 4096});
  EXPECT_EQ(engine->wait(fine), 4096u);
  EXPECT_THROW(engine->wait(failing), Error);
}

TEST_F(FaultTest, WaitAllThrowsTheFirstErrorAfterEverythingFinished) {
  FaultPlan plan;
  plan.errors.push_back({Op::write, 0, 4096, EIO, "", 1});
  auto engine = make_memory_engine(small_blocks(), plan);
  File file = open("w.bin");
  auto buffer = aligned_bytes(8 * 4096);
  for (int i = 0; i < 8; ++i) {
    engine->submit({Op::write, &file, static_cast<std::uint64_t>(i) * 4096, buffer.get(), 4096});
  }
  EXPECT_THROW(engine->wait_all(), Error);
  EXPECT_EQ(engine->outstanding_tickets(), 0u);
}

TEST_F(FaultTest, ShortTransfersOnRealODirectFilesKeepAlignment) {
  FaultPlan plan;
  plan.seed = 17;
  plan.short_transfer_rate = 0.7;
  AioOptions o = small_blocks();
  ThreadPoolEngine engine(o, std::make_unique<FaultInjectingDevice>(std::make_unique<PosixDevice>(), plan), 4,
                          "posix-faulty");
  File file = open("real.bin");
  const std::uint64_t size = 1 << 20;
  auto out = aligned_bytes(size);
  auto in = aligned_bytes(size);
  fill_random({out.get(), size}, 17);
  engine.wait(engine.submit({Op::write, &file, 0, out.get(), size}));
  engine.wait(engine.submit({Op::read, &file, 0, in.get(), size}));
  EXPECT_EQ(std::memcmp(out.get(), in.get(), size), 0);
  EXPECT_GT(engine.stats().short_transfers, 0u);
}

}  // namespace
}  // namespace zinf::aio

#include <linux/capability.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <random>
#include <stdexcept>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "core/units.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "test_util.hpp"

namespace zinf {
namespace {

using zinf::testing::run_in_child;

PinnedPoolOptions budget(std::uint64_t bytes) {
  PinnedPoolOptions options;
  options.budget_bytes = bytes;
  return options;
}

TEST(PinnedPool, LeasesAreExactAlignedAndCounted) {
  PinnedPool pool(budget(4 * MiB));
  EXPECT_TRUE(pool.page_locked()) << pool.description();
  {
    PinnedBuffer a = pool.acquire(1000);
    PinnedBuffer b = pool.acquire(MiB);
    EXPECT_EQ(a.size(), 1000u);
    EXPECT_EQ(b.size(), MiB);
    EXPECT_TRUE(is_aligned(a.data(), 4096));
    EXPECT_TRUE(is_aligned(b.data(), 4096));
    const PinnedPoolStats stats = pool.stats();
    EXPECT_EQ(stats.in_use_bytes, 4096 + MiB);
    EXPECT_EQ(stats.leases_outstanding, 2u);
    const auto region = pool.region();
    EXPECT_GE(a.data(), region.data);
    EXPECT_LE(b.data() + b.size(), region.data + region.size_bytes);
  }
  const PinnedPoolStats stats = pool.stats();
  EXPECT_EQ(stats.in_use_bytes, 0u);
  EXPECT_EQ(stats.leases_outstanding, 0u);
  EXPECT_EQ(stats.high_water_bytes, 4096 + MiB);
}

TEST(PinnedPool, RequestBeyondTheBudgetFailsAtOnceNamingIt) {
  PinnedPool pool(budget(2 * MiB));
  try {
    pool.acquire(3 * MiB);
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::resource);
    EXPECT_NE(std::string(error.what()).find("budget of 2 MiB"), std::string::npos) << error.what();
  }
}

TEST(PinnedPool, HugeRequestsFailInsteadOfWrapping) {
  PinnedPool pool(budget(2 * MiB));
  EXPECT_THROW(pool.acquire(UINT64_MAX), Error);
  EXPECT_THROW(pool.acquire(UINT64_MAX - 100), Error);
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
}

TEST(PinnedPool, LeasesHonourLargeAlignmentsWithoutHugePages) {
  PinnedPoolOptions options = budget(4 * MiB);
  options.alignment_bytes = 64 * KiB;
  options.huge_pages = false;
  PinnedPool pool(options);
  std::vector<PinnedBuffer> leases;
  for (int i = 0; i < 8; ++i) {
    leases.push_back(pool.acquire(1000 + i));
    EXPECT_TRUE(is_aligned(leases.back().data(), 64 * KiB));
  }
}

TEST(PinnedPool, AcquireTimesOutNamingBudgetAndUse) {
  PinnedPool pool(budget(2 * MiB));
  PinnedBuffer held = pool.acquire(2 * MiB);
  try {
    pool.acquire(MiB, std::chrono::milliseconds(20));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::resource);
    const std::string text = error.what();
    EXPECT_NE(text.find("2 MiB of the 2 MiB budget"), std::string::npos) << text;
    EXPECT_NE(text.find("1 lease"), std::string::npos) << text;
  }
  EXPECT_FALSE(pool.try_acquire(4096).has_value());
}

TEST(PinnedPool, BlockedAcquireWakesWhenALeaseReturns) {
  PinnedPool pool(budget(2 * MiB));
  PinnedBuffer held = pool.acquire(2 * MiB);
  std::thread releaser([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    held.release();
  });
  PinnedBuffer got = pool.acquire(2 * MiB, std::chrono::seconds(10));
  releaser.join();
  EXPECT_EQ(got.size(), 2 * MiB);
  EXPECT_GE(pool.stats().acquires_waited, 1u);
}

TEST(PinnedPool, LeasesComeBackWhenAnExceptionUnwinds) {
  PinnedPool pool(budget(4 * MiB));
  try {
    PinnedBuffer a = pool.acquire(MiB);
    PinnedBuffer b = pool.acquire(2 * MiB);
    throw std::runtime_error("failure mid-step");
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
  EXPECT_EQ(pool.acquire(4 * MiB).size(), 4 * MiB);  // and the space coalesced
}

TEST(PinnedPool, MovedLeaseReturnsOnce) {
  PinnedPool pool(budget(MiB));
  PinnedBuffer a = pool.acquire(MiB);
  PinnedBuffer b = std::move(a);
  EXPECT_FALSE(a);
  EXPECT_TRUE(b);
  b = PinnedBuffer{};
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
  EXPECT_EQ(pool.stats().leases_outstanding, 0u);
}

TEST(PinnedPool, ConcurrentUseNeverExceedsTheBudget) {
  const std::uint64_t capacity = 8 * MiB;
  PinnedPool pool(budget(capacity));
  std::atomic<std::uint64_t> live{0};
  std::atomic<std::uint64_t> worst{0};
  std::atomic<bool> corrupt{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 random(static_cast<std::uint64_t>(t) + 1);
      for (int i = 0; i < 300; ++i) {
        const std::uint64_t bytes = 1 + random() % (3 * MiB);
        PinnedBuffer lease = pool.acquire(bytes);
        const std::uint64_t now = live.fetch_add(align_up(bytes, 4096)) + align_up(bytes, 4096);
        std::uint64_t seen = worst.load();
        while (now > seen && !worst.compare_exchange_weak(seen, now)) {}
        // Leases must not overlap: stamp and check our own bytes.
        const auto stamp = static_cast<std::byte>(t * 16 + i % 16);
        lease.data()[0] = stamp;
        lease.data()[bytes - 1] = stamp;
        std::this_thread::yield();
        if (lease.data()[0] != stamp || lease.data()[bytes - 1] != stamp) corrupt = true;
        live.fetch_sub(align_up(bytes, 4096));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_LE(worst.load(), capacity);
  EXPECT_LE(pool.stats().high_water_bytes, capacity);
  EXPECT_EQ(pool.stats().in_use_bytes, 0u);
  EXPECT_FALSE(corrupt.load());
}

TEST(PinnedPool, HugePagesAreAdvisedWhereTheKernelOffersThem) {
  PinnedPool pool(budget(8 * MiB));
  std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string mode;
  std::getline(thp, mode);
  if (mode.empty() || mode.find("[never]") != std::string::npos) {
    GTEST_SKIP() << "transparent huge pages are off on this kernel";
  }
  EXPECT_TRUE(pool.huge_pages_advised());
  EXPECT_TRUE(is_aligned(pool.region().data, 2 * MiB));
}

// Drops CAP_IPC_LOCK so RLIMIT_MEMLOCK applies, even to root.
bool drop_ipc_lock() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[2]{};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  data[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
  return ::syscall(SYS_capset, &header, data) == 0;
}

TEST(PinnedPool, LowMemlockLimitIsReportedWithNumbersAndTheFix) {
  const int code = run_in_child([] {
    if (!drop_ipc_lock()) return 10;
    rlimit limit{MiB, MiB};
    if (::setrlimit(RLIMIT_MEMLOCK, &limit) != 0) return 11;
    try {
      PinnedPool pool(budget(64 * MiB));
      return 12;  // must not succeed
    } catch (const Error& error) {
      const std::string text = error.what();
      if (error.kind() != ErrorKind::resource) return 13;
      if (text.find("RLIMIT_MEMLOCK is 1 MiB") == std::string::npos) return 14;
      if (text.find("ulimit -l") == std::string::npos) return 15;
      if (text.find("64 MiB") == std::string::npos) return 16;
    }
    return 0;
  });
  EXPECT_EQ(code, 0) << "child step " << code;
}

TEST(PinnedPool, UnpinnedFallbackOnlyWhenAllowed) {
  const int code = run_in_child([] {
    if (!drop_ipc_lock()) return 10;
    rlimit limit{MiB, MiB};
    if (::setrlimit(RLIMIT_MEMLOCK, &limit) != 0) return 11;
    PinnedPoolOptions options = budget(16 * MiB);
    options.allow_unpinned = true;
    PinnedPool pool(options);
    if (pool.page_locked()) return 12;
    PinnedBuffer lease = pool.acquire(16 * MiB);
    lease.data()[16 * MiB - 1] = std::byte{1};
    return 0;
  });
  EXPECT_EQ(code, 0) << "child step " << code;
}

TEST(PinnedPool, PinMemoryFalseLocksNothing) {
  // DeepSpeed's pin_memory: false, asked for: pageable memory that works,
  // whatever RLIMIT_MEMLOCK allows.
  PinnedPoolOptions options = budget(8 * MiB);
  options.lock = false;
  PinnedPool pool(options);
  EXPECT_FALSE(pool.page_locked());
  PinnedBuffer lease = pool.acquire(8 * MiB);
  lease.data()[0] = std::byte{3};
  lease.data()[8 * MiB - 1] = std::byte{4};
  EXPECT_EQ(lease.data()[0], std::byte{3});
}

}  // namespace
}  // namespace zinf

// The swap store: round trips, padding, striping, checksums, the manifest
// across clean exits and kills, copy-on-write under injected EIO/ENOSPC and a
// real full disk, space reuse, the directory lock, and every refusal.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <atomic>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <sstream>
#include <chrono>

#include <gtest/gtest.h>

#include "aio/thread_pool_engine.hpp"
#include "core/error.hpp"
#include "swap/swap_store.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

using testing::aligned_bytes;
using testing::fill_random;
using testing::TempDir;

// "prefix<i>suffix" (fmt: GCC 12 warns falsely on string operator+ chains).
std::string named(std::string_view prefix, std::uint64_t i, std::string_view suffix = "") {
  return fmt::format("{}{}{}", prefix, i, suffix);
}

SwapStoreOptions options_for(std::vector<std::filesystem::path> directories) {
  SwapStoreOptions options;
  options.directories = std::move(directories);
  options.aio.block_size = 64 << 10;
  options.grow_bytes = 1 << 20;
  return options;
}

// A payload of `bytes` seeded bytes in a buffer padded for the store.
struct Payload {
  Payload(const SwapStore& store, std::uint64_t bytes, std::uint64_t seed)
      : size(bytes), capacity(store.padded_size(bytes)), data(aligned_bytes(capacity)) {
    fill_random({data.get(), size}, seed);
  }
  std::span<std::byte> span() { return {data.get(), capacity}; }
  std::uint64_t size;
  std::uint64_t capacity;
  testing::AlignedBytes data;
};

bool same_bytes(const Payload& a, const Payload& b) {
  return a.size == b.size && std::memcmp(a.data.get(), b.data.get(), a.size) == 0;
}

// Reads `key` into a fresh buffer and compares it with `expected`.
::testing::AssertionResult reads_back(SwapStore& store, const std::string& key,
                                      const Payload& expected) {
  const auto info = store.find(key);
  if (!info) return ::testing::AssertionFailure() << "no key " << key;
  Payload got(store, info->size_bytes, 0);
  const std::uint64_t bytes = store.read_sync(key, got.span());
  if (bytes != expected.size) {
    return ::testing::AssertionFailure() << key << ": read " << bytes << " bytes, wanted "
                                         << expected.size;
  }
  if (!same_bytes(got, expected)) return ::testing::AssertionFailure() << key << ": bytes differ";
  return ::testing::AssertionSuccess();
}

TEST(SwapStore, OddSizedTensorsRoundTripOnOneAndThreeStripedPaths) {
  for (const std::size_t paths : {1u, 3u}) {
    TempDir dir;
    std::vector<std::filesystem::path> directories;
    for (std::size_t i = 0; i < paths; ++i) directories.push_back(dir / (named("nvme", i)));
    SwapStore store(options_for(directories));
    const std::vector<std::uint64_t> sizes = {1, 3, 4095, 4096, 4097, 65536 + 5, 300001, 1 << 20};
    std::vector<Payload> payloads;
    std::vector<SwapTicket> tickets;
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      payloads.emplace_back(store, sizes[i], 100 + i);
    }
    // All writes in flight at once, then all reads.
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      tickets.push_back(store.write(named("layers.", i, ".weight"),
                                    payloads[i].span(), sizes[i], 7));
    }
    for (auto ticket : tickets) store.wait(ticket);
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const std::string key = named("layers.", i, ".weight");
      const auto info = store.find(key);
      ASSERT_TRUE(info);
      EXPECT_EQ(info->size_bytes, sizes[i]);
      EXPECT_EQ(info->padded_bytes % store.alignment(), 0u);
      EXPECT_EQ(info->offset_bytes % store.alignment(), 0u);
      EXPECT_EQ(info->version, 7);
      EXPECT_TRUE(reads_back(store, key, payloads[i])) << paths << " paths";
    }
    if (paths == 3) {
      // Striping really spread the bytes: every path's file holds data.
      for (std::size_t i = 0; i < paths; ++i) {
        EXPECT_GT(std::filesystem::file_size(directories[i] / "zinf.volume"), 0u);
      }
    }
  }
}

TEST(SwapStore, ReopenAfterCleanExitFindsEveryTensorAndAttribute) {
  TempDir dir;
  std::vector<Payload> payloads;
  {
    SwapStore store(options_for({dir.path()}));
    for (int i = 0; i < 5; ++i) {
      payloads.emplace_back(store, 10000 + 4096 * i, i);
      store.write_sync(named("k/", i), payloads.back().span(), payloads.back().size, i);
    }
    store.set_attribute("optimizer_step", "12");
    store.commit();
  }
  SwapStore store(options_for({dir.path()}));
  EXPECT_EQ(store.keys().size(), 5u);
  EXPECT_EQ(store.attribute("optimizer_step"), "12");
  for (int i = 0; i < 5; ++i) {
    EXPECT_TRUE(reads_back(store, named("k/", i), payloads[i]));
    EXPECT_EQ(store.find(named("k/", i))->version, i);
  }
}

TEST(SwapStore, ReadsAndWritesAreCountedAndTheWrittenTotalSurvivesAReopen) {
  TempDir a, b;
  std::uint64_t first_total = 0;
  {
    SwapStore store(options_for({a.path(), b.path()}));  // striped every 64 KiB
    Payload payload(store, 256 << 10, 1);
    store.write_sync("k", payload.span(), payload.size);
    const auto stats = store.stats();
    ASSERT_EQ(stats.written_bytes.size(), 2u);
    EXPECT_EQ(stats.written_bytes[0], 128u << 10);
    EXPECT_EQ(stats.written_bytes[1], 128u << 10);
    Payload read(store, payload.size, 0);
    EXPECT_EQ(store.stats().read_bytes, 0u);
    store.read_sync("k", read.span());  // counted apart from writes
    EXPECT_EQ(store.stats().written_bytes[0], 128u << 10);
    EXPECT_EQ(store.stats().read_bytes, 256u << 10);
    store.commit();
    first_total = store.stats().written_total;
    EXPECT_EQ(first_total, 256u << 10);
  }
  SwapStore store(options_for({a.path(), b.path()}));
  EXPECT_EQ(store.stats().written_total, first_total);  // from the manifest
  EXPECT_EQ(store.stats().written_bytes[0], 0u);       // this run's own
  Payload payload(store, 64 << 10, 2);
  store.write_sync("k", payload.span(), payload.size);
  EXPECT_EQ(store.stats().written_total, first_total + (64u << 10));
}

TEST(SwapStore, WritesAfterTheLastCommitAreNotInTheManifest) {
  TempDir dir;
  std::optional<Payload> first;
  {
    SwapStore store(options_for({dir.path()}));
    first.emplace(store, 5000, 1);
    store.write_sync("w", first->span(), first->size, 1);
    store.commit();
    Payload second(store, 5000, 2);
    store.write_sync("w", second.span(), second.size, 2);
    store.write_sync("only-uncommitted", second.span(), second.size, 2);
  }
  SwapStore store(options_for({dir.path()}));
  EXPECT_TRUE(reads_back(store, "w", *first));
  EXPECT_EQ(store.find("w")->version, 1);
  EXPECT_FALSE(store.find("only-uncommitted"));
}

class SwapStoreKill : public ::testing::TestWithParam<bool> {};

// With and without flushes at commit: a killed process loses nothing the
// kernel had (only a power loss needs the flushes).
TEST_P(SwapStoreKill, KilledMidWriteReopensToTheLastCommittedState) {
  TempDir dir;
  const auto directories = std::vector<std::filesystem::path>{dir / "a", dir / "b"};
  auto options = options_for(directories);
  options.sync = GetParam();
  const int status = testing::run_in_child([&] {
    SwapStore store(options);
    for (int i = 0; i < 4; ++i) {
      Payload payload(store, 200000 + i, 10 + i);
      store.write_sync(named("t", i), payload.span(), payload.size, 1);
    }
    store.commit();
    // Overwrite everything, commit half of it, then die with writes in
    // flight and nothing cleaned up.
    std::vector<Payload> next;
    for (int i = 0; i < 4; ++i) next.emplace_back(store, 200000 + i, 20 + i);
    store.write_sync("t0", next[0].span(), next[0].size, 2);
    store.commit();
    store.write_sync("t1", next[1].span(), next[1].size, 2);
    store.write("t2", next[2].span(), next[2].size, 2);
    store.write("t3", next[3].span(), next[3].size, 2);
    ::kill(::getpid(), SIGKILL);
    return 0;
  });
  ASSERT_EQ(status, 128 + SIGKILL);
  // The kill released the lock; the manifest is the second commit's.
  SwapStore store(options);
  Payload expected_t0(store, 200000, 20);
  EXPECT_TRUE(reads_back(store, "t0", expected_t0));
  EXPECT_EQ(store.find("t0")->version, 2);
  for (int i = 1; i < 4; ++i) {
    Payload expected(store, 200000 + i, 10 + i);
    EXPECT_TRUE(reads_back(store, named("t", i), expected)) << i;
    EXPECT_EQ(store.find(named("t", i))->version, 1);
  }
  // The extents the dead run wrote after its last commit are free again.
  Payload more(store, 300000, 99);
  store.write_sync("after", more.span(), more.size);
  EXPECT_TRUE(reads_back(store, "after", more));
  EXPECT_TRUE(reads_back(store, "t0", expected_t0));
}

INSTANTIATE_TEST_SUITE_P(SyncedAndUnsynced, SwapStoreKill, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "sync" : "no_sync"; });

TEST(SwapStore, ACorruptByteFailsTheReadNamingKeyAndFile) {
  TempDir dir;
  std::uint64_t offset = 0;
  {
    SwapStore store(options_for({dir.path()}));
    Payload filler(store, 8192, 1);
    store.write_sync("filler", filler.span(), filler.size);
    Payload payload(store, 10000, 2);
    store.write_sync("layers.3.mlp.weight/exp_avg", payload.span(), payload.size);
    offset = store.find("layers.3.mlp.weight/exp_avg")->offset_bytes;
    store.commit();
  }
  const std::string volume = (dir / "zinf.volume").string();
  {
    const int fd = ::open(volume.c_str(), O_RDWR);
    ASSERT_GE(fd, 0);
    unsigned char byte = 0;
    ASSERT_EQ(::pread(fd, &byte, 1, static_cast<off_t>(offset + 1234)), 1);
    byte ^= 0x10;
    ASSERT_EQ(::pwrite(fd, &byte, 1, static_cast<off_t>(offset + 1234)), 1);
    ::close(fd);
  }
  SwapStore store(options_for({dir.path()}));
  Payload got(store, 10000, 0);
  try {
    store.read_sync("layers.3.mlp.weight/exp_avg", got.span());
    FAIL() << "a corrupt extent was read without error";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find("layers.3.mlp.weight/exp_avg"), std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find(volume), std::string::npos) << error.what();
  }
  // The untouched key still reads.
  Payload filler(store, 8192, 1);
  EXPECT_TRUE(reads_back(store, "filler", filler));
}

// A store over in-memory engines whose writes fail once at offsets at or
// past `fail_from` with `error_number`.
struct FaultyStore {
  FaultyStore(const TempDir& dir, int error_number, std::uint64_t fail_from) {
    aio::FaultPlan plan;
    plan.errors.push_back(aio::InjectedError{aio::Op::write, fail_from, UINT64_MAX, error_number,
                                             "zinf.volume", 1});
    const auto options = options_for({dir.path()});
    store = std::make_unique<SwapStore>(options, [&](std::size_t) {
      return aio::make_memory_engine(options.aio, plan);
    });
  }
  std::unique_ptr<SwapStore> store;
};

TEST(SwapStore, InjectedEioAndEnospcDuringSwapOutLeaveThePreviousCopyReadable) {
  for (const int error_number : {EIO, ENOSPC}) {
    TempDir dir;
    FaultyStore faulty(dir, error_number, 8192);
    SwapStore& store = *faulty.store;
    Payload old_copy(store, 6000, 1);
    store.write_sync("param", old_copy.span(), old_copy.size, 1);  // lands at offset 0
    store.commit();
    Payload new_copy(store, 6000, 2);
    try {
      store.write_sync("param", new_copy.span(), new_copy.size, 2);
      FAIL() << "the injected error was lost";
    } catch (const Error& error) {
      EXPECT_EQ(error.kind(), error_number == EIO ? ErrorKind::io : ErrorKind::no_space);
      EXPECT_EQ(error.error_number(), error_number);
      EXPECT_NE(std::string(error.what()).find("'param'"), std::string::npos) << error.what();
      EXPECT_NE(std::string(error.what()).find("zinf.volume"), std::string::npos) << error.what();
    }
    EXPECT_TRUE(reads_back(store, "param", old_copy));
    EXPECT_EQ(store.find("param")->version, 1);
    // The fault was one-off: a retry succeeds and replaces the copy.
    store.write_sync("param", new_copy.span(), new_copy.size, 2);
    EXPECT_TRUE(reads_back(store, "param", new_copy));
  }
}

TEST(SwapStore, ARealFullDiskFailsTheWriteAndKeepsEveryCommittedKey) {
  testing::SmallFilesystem fs("tmpfs", 4);
  if (!fs.skip_reason().empty()) GTEST_SKIP() << fs.skip_reason();
  auto options = options_for({fs.path()});
  options.grow_bytes = 256 << 10;
  SwapStore store(options);
  std::vector<Payload> written;
  bool failed = false;
  for (int i = 0; i < 40 && !failed; ++i) {
    Payload payload(store, 300000, i);
    try {
      store.write_sync(named("k", i), payload.span(), payload.size);
      store.commit();
      written.push_back(std::move(payload));
    } catch (const Error& error) {
      failed = true;
      EXPECT_EQ(error.kind(), ErrorKind::no_space) << error.what();
      EXPECT_NE(std::string(error.what()).find(fs.path().string()), std::string::npos)
          << error.what();
      EXPECT_NE(std::string(error.what()).find(named("'k", i, "'")),
                std::string::npos)
          << error.what();
    }
  }
  ASSERT_TRUE(failed) << "a 4 MiB filesystem held 12 MB";
  ASSERT_FALSE(written.empty());
  for (std::size_t i = 0; i < written.size(); ++i) {
    EXPECT_TRUE(reads_back(store, named("k", i), written[i]));
  }
}

TEST(SwapStore, FreedSpaceIsReusedAfterCommit) {
  TempDir dir;
  SwapStore store(options_for({dir.path()}));
  Payload payload(store, 1 << 20, 1);
  for (int round = 0; round < 20; ++round) {
    store.write_sync("grad-sized", payload.span(), payload.size, round);
    store.commit();
  }
  // Copy-on-write needs two copies at most, never one per round.
  EXPECT_LE(store.stats().volume_bytes, 2u * payload.capacity);
  store.remove("grad-sized");
  EXPECT_EQ(store.stats().pending_free_bytes, payload.capacity);
  store.commit();
  const auto stats = store.stats();
  EXPECT_EQ(stats.pending_free_bytes, 0u);
  EXPECT_EQ(stats.live_bytes, 0u);
  EXPECT_EQ(stats.free_bytes, stats.volume_bytes);  // coalesced into one block
  Payload bigger(store, stats.volume_bytes, 3);
  store.write_sync("fits-in-the-hole", bigger.span(), bigger.size);
  EXPECT_EQ(store.stats().volume_bytes, stats.volume_bytes);
}

TEST(SwapStore, AnExtentBeingReadIsNotReusedBeforeTheReadEnds) {
  TempDir dir;
  aio::FaultPlan slow;
  slow.latency = std::chrono::milliseconds(30);
  const auto options = options_for({dir.path()});
  SwapStore store(options, [&](std::size_t) { return aio::make_memory_engine(options.aio, slow); });
  Payload first(store, 4096, 1);
  Payload second(store, 4096, 2);
  store.write_sync("a", first.span(), first.size);
  store.commit();
  Payload got(store, 4096, 0);
  const SwapTicket read = store.read("a", got.span());
  store.write_sync("a", second.span(), second.size);  // frees the extent being read
  store.commit();
  const std::uint64_t old_offset = 0;  // "a" was the first extent
  EXPECT_NE(store.find("a")->offset_bytes, old_offset);
  EXPECT_EQ(store.stats().pending_free_bytes, 4096u);  // held back for the read
  Payload third(store, 4096, 3);
  store.write_sync("b", third.span(), third.size);  // must not land on it
  EXPECT_NE(store.find("b")->offset_bytes, old_offset);
  EXPECT_EQ(store.wait(read), 4096u);  // checksum verified: the old copy, intact
  EXPECT_TRUE(same_bytes(got, first));
  EXPECT_TRUE(reads_back(store, "a", second));
  EXPECT_TRUE(reads_back(store, "b", third));
}

TEST(SwapStore, TwoLiveRunsCannotShareADirectory) {
  TempDir dir;
  auto first = std::make_unique<SwapStore>(options_for({dir / "x"}));
  try {
    SwapStore second(options_for({dir / "y", dir / "x"}));
    FAIL() << "a locked directory was opened twice";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::in_use);
    EXPECT_NE(std::string(error.what()).find((dir / "x").string()), std::string::npos);
    EXPECT_NE(std::string(error.what()).find(named("pid ", ::getpid())),
              std::string::npos)
        << error.what();
  }
  // Another process is refused too.
  EXPECT_EQ(testing::run_in_child([&] {
              try {
                SwapStore other(options_for({dir / "x"}));
              } catch (const Error& error) {
                return error.kind() == ErrorKind::in_use ? 0 : 1;
              }
              return 2;
            }),
            0);
  first.reset();
  EXPECT_NO_THROW(SwapStore again(options_for({dir / "x"})));
}

TEST(SwapStore, MissingDirectoryIsCreatedAndBadOnesAreRefusedByPath) {
  TempDir dir;
  {
    SwapStore store(options_for({dir / "deep" / "er"}));
    EXPECT_TRUE(std::filesystem::is_directory(dir / "deep" / "er"));
  }
  std::ofstream(dir / "a-file") << "x";
  try {
    SwapStore store(options_for({dir / "a-file"}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), ENOTDIR);
    EXPECT_NE(std::string(error.what()).find("a-file"), std::string::npos);
  }
  testing::SmallFilesystem read_only("tmpfs-ro", 1);
  if (!read_only.skip_reason().empty()) GTEST_SKIP() << read_only.skip_reason();
  try {
    SwapStore store(options_for({read_only.path()}));
    FAIL() << "a read-only nvme_path was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), EROFS) << error.what();
    EXPECT_NE(std::string(error.what()).find(read_only.path().string()), std::string::npos);
  }
}

TEST(SwapStore, BadBuffersAndUnknownKeysAreRefusedBeforeAnyIo) {
  TempDir dir;
  SwapStore store(options_for({dir.path()}));
  Payload payload(store, 5000, 1);
  try {
    store.write("small", std::span(payload.data.get(), 5000), 5000);
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::invalid);
    EXPECT_NE(std::string(error.what()).find("'small'"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("8192"), std::string::npos) << error.what();
  }
  try {
    store.write("odd", std::span(payload.data.get() + 8, 4096), 100);
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::alignment);
  }
  try {
    store.read("never-written", payload.span());
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::invalid);
    EXPECT_NE(std::string(error.what()).find("never-written"), std::string::npos);
  }
  store.write_sync("k", payload.span(), payload.size);
  try {
    store.read("k", std::span(payload.data.get(), 4096));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::invalid);
  }
  const SwapTicket pending = store.write("k", payload.span(), payload.size);
  EXPECT_THROW(store.write("k", payload.span(), payload.size), Error);
  store.wait(pending);
  EXPECT_EQ(store.in_flight(), 0u);
  EXPECT_EQ(store.stats().keys, 1u);
}

TEST(SwapStore, ABrokenManifestOrTruncatedVolumeIsReportedNotGuessed) {
  TempDir dir;
  {
    SwapStore store(options_for({dir.path()}));
    Payload payload(store, 100000, 1);
    store.write_sync("k", payload.span(), payload.size);
    store.commit();
  }
  std::filesystem::copy_file(dir / "zinf.manifest", dir / "good.manifest");
  std::ofstream(dir / "zinf.manifest", std::ios::trunc) << "{\"format\": \"zinf-swap-manif";
  try {
    SwapStore store(options_for({dir.path()}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find("zinf.manifest"), std::string::npos);
  }
  std::filesystem::copy_file(dir / "good.manifest", dir / "zinf.manifest",
                             std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(dir / "zinf.volume", 4096);
  try {
    SwapStore store(options_for({dir.path()}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find("zinf.volume"), std::string::npos) << error.what();
  }
  // Reopening with another nvme_path list would misread every stripe.
  try {
    SwapStore store(options_for({dir.path(), dir / "second"}));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_NE(std::string(error.what()).find("nvme_path"), std::string::npos);
  }
}

TEST(SwapStore, AReorderedNvmePathListIsRefusedNotOpenedEmpty) {
  TempDir dir;
  {
    SwapStore store(options_for({dir / "a", dir / "b"}));
    Payload payload(store, 300000, 1);
    store.write_sync("k", payload.span(), payload.size);
    store.commit();
  }
  try {
    SwapStore store(options_for({dir / "b", dir / "a"}));
    FAIL() << "a reordered nvme_path list opened";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_NE(std::string(error.what()).find("same order"), std::string::npos) << error.what();
  }
  SwapStore store(options_for({dir / "a", dir / "b"}));
  EXPECT_TRUE(store.find("k"));
}

TEST(SwapStore, ManifestsWithSharedOffsetsOrBadChecksumsAreCorrupt) {
  TempDir dir;
  {
    SwapStore store(options_for({dir.path()}));
    Payload payload(store, 5000, 1);
    store.write_sync("x", payload.span(), payload.size);
    store.write_sync("y", payload.span(), payload.size);
    store.commit();
  }
  const std::string good = [&] {
    std::ifstream in(dir / "zinf.manifest");
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }();
  auto manifest = nlohmann::json::parse(good);
  manifest["entries"]["y"]["offset"] = manifest["entries"]["x"]["offset"];
  std::ofstream(dir / "zinf.manifest", std::ios::trunc) << manifest.dump();
  try {
    SwapStore store(options_for({dir.path()}));
    FAIL() << "two keys on one extent were accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find("share offset"), std::string::npos) << error.what();
  }
  // A huge extent ("padded": 2^60, on the last entry so nothing overlaps
  // it) is refused at once as beyond the files, not walked stripe by stripe.
  manifest = nlohmann::json::parse(good);
  const std::string last = manifest["entries"]["x"]["offset"].get<std::uint64_t>() >
                                   manifest["entries"]["y"]["offset"].get<std::uint64_t>()
                               ? "x"
                               : "y";
  manifest["entries"][last]["padded"] = std::uint64_t{1} << 60;
  std::ofstream(dir / "zinf.manifest", std::ios::trunc) << manifest.dump();
  const auto started = std::chrono::steady_clock::now();
  try {
    SwapStore store(options_for({dir.path()}));
    FAIL() << "an extent of 2^60 bytes was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find("places data up to"), std::string::npos) << error.what();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
  manifest = nlohmann::json::parse(good);
  manifest["entries"]["x"]["xxh3"] = "12zz";
  std::ofstream(dir / "zinf.manifest", std::ios::trunc) << manifest.dump();
  try {
    SwapStore store(options_for({dir.path()}));
    FAIL() << "a malformed checksum was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::corrupt);
    EXPECT_NE(std::string(error.what()).find("'x'"), std::string::npos) << error.what();
  }
}

TEST(SwapStore, RevertUndoesUncommittedWritesAndRemoves) {
  TempDir dir;
  SwapStore store(options_for({dir.path()}));
  Payload first(store, 6000, 1);
  Payload second(store, 6000, 2);
  store.write_sync("kept", first.span(), first.size, 1);
  store.write_sync("removed", first.span(), first.size, 1);
  store.commit();
  store.write_sync("kept", second.span(), second.size, 2);
  store.write_sync("kept", second.span(), second.size, 3);  // twice before a commit
  store.remove("removed");
  store.write_sync("new", second.span(), second.size, 2);
  store.revert("kept");
  store.revert("removed");
  store.revert("new");
  EXPECT_TRUE(reads_back(store, "kept", first));
  EXPECT_EQ(store.find("kept")->version, 1);
  EXPECT_TRUE(reads_back(store, "removed", first));
  EXPECT_FALSE(store.find("new"));
  store.commit();
  // Nothing leaked: the two committed extents are live, the rest is free.
  const auto stats = store.stats();
  EXPECT_EQ(stats.live_bytes, 2u * 8192u);
  EXPECT_EQ(stats.pending_free_bytes, 0u);
  EXPECT_EQ(stats.free_bytes + stats.live_bytes, stats.volume_bytes);
}

TEST(SwapStore, CommitsAndRevertsRunConcurrentlyWithoutLosingAnExtent) {
  // commit() drops the store's lock while it flushes and writes the
  // manifest; a revert in that window once aborted the process.
  TempDir dir;
  auto options = options_for({dir.path()});
  options.sync = false;
  SwapStore store(options);
  Payload base(store, 6000, 1);
  Payload next(store, 6000, 2);
  constexpr int kKeys = 8;
  for (int k = 0; k < kKeys; ++k) store.write_sync(fmt::format("k{}", k), base.span(), base.size, 1);
  store.commit();
  std::atomic<bool> stop{false};
  std::thread committer([&] {
    while (!stop.load()) store.commit();
  });
  std::thread writer([&] {
    int round = 0;
    while (!stop.load()) {
      const std::string key = fmt::format("k{}", round++ % kKeys);
      store.write_sync(key, next.span(), next.size, 2);
      store.revert(key);
      store.write_sync(key, (round % 2 ? base : next).span(), base.size, round % 2 ? 1 : 2);
    }
  });
  std::this_thread::sleep_for(std::chrono::seconds(2));
  stop = true;
  committer.join();
  writer.join();
  store.commit();
  for (int k = 0; k < kKeys; ++k) {
    const auto info = store.find(fmt::format("k{}", k));
    ASSERT_TRUE(info);
    EXPECT_TRUE(reads_back(store, fmt::format("k{}", k), info->version == 1 ? base : next)) << k;
  }
  const auto stats = store.stats();
  EXPECT_EQ(stats.pending_free_bytes, 0u);
  EXPECT_EQ(stats.free_bytes + stats.live_bytes, stats.volume_bytes);
}

TEST(SwapStore, ConcurrentWritersAndReadersKeepEveryKeyIntact) {
  TempDir dir;
  SwapStore store(options_for({dir / "p0", dir / "p1"}));
  constexpr int kThreads = 4;
  constexpr int kRounds = 30;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < kRounds; ++round) {
        Payload payload(store, 5000 + 4096 * (round % 5), t * 1000 + round);
        const std::string key = named("thread", t);
        store.write_sync(key, payload.span(), payload.size, round);
        Payload got(store, payload.size, 0);
        store.read_sync(key, got.span());
        if (!same_bytes(got, payload)) ++failures;
        if (round % 7 == 0) store.commit();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(store.stats().keys, static_cast<std::uint64_t>(kThreads));
}

}  // namespace
}  // namespace zinf::swap

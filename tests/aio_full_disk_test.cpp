// A real full filesystem: a small ext4 image on a loop device (O_DIRECT, as
// on an NVMe drive) and a size-limited tmpfs (buffered). Writing past the
// end must fail with a no_space error naming the file, and data written
// before must read back intact. Needs root and a loop device; skips saying
// so otherwise.
#include <cstring>

#include <gtest/gtest.h>

#include "aio/engine.hpp"
#include "aio/file.hpp"
#include "core/error.hpp"
#include "test_util.hpp"

namespace zinf::aio {
namespace {

using zinf::testing::aligned_bytes;
using zinf::testing::fill_random;
using zinf::testing::SmallFilesystem;
using zinf::testing::TempDir;

void fill_until_full(const std::string& kind) {
  SmallFilesystem fs(kind, 24);
  if (!fs.skip_reason().empty()) GTEST_SKIP() << fs.skip_reason();
  AioOptions options;
  options.block_size = 1 << 20;
  options.queue_depth = 4;
  auto engine = make_engine(EngineKind::automatic, options);

  const std::uint64_t kept_size = 4 << 20;
  File kept = File::open(fs.path() / "kept.bin", OpenMode::create);
  engine->register_file(kept);
  auto kept_data = aligned_bytes(kept_size);
  fill_random({kept_data.get(), kept_size}, 21);
  engine->wait(engine->submit({Op::write, &kept, 0, kept_data.get(), kept_size}));
  kept.sync_data();

  File big = File::open(fs.path() / "big.bin", OpenMode::create);
  engine->register_file(big);
  const std::uint64_t big_size = 64 << 20;  // more than the filesystem holds
  auto big_data = aligned_bytes(big_size);
  std::memset(big_data.get(), 0x33, big_size);
  try {
    engine->wait(engine->submit({Op::write, &big, 0, big_data.get(), big_size}));
    FAIL() << "wrote 64 MiB into a 24 MiB " << kind;
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::no_space) << error.what();
    EXPECT_EQ(error.error_number(), ENOSPC) << error.what();
    EXPECT_EQ(error.context().path, big.path());
    EXPECT_NE(std::string(error.what()).find("ENOSPC"), std::string::npos);
  }

  auto back = aligned_bytes(kept_size);
  engine->wait(engine->submit({Op::read, &kept, 0, back.get(), kept_size}));
  EXPECT_EQ(std::memcmp(kept_data.get(), back.get(), kept_size), 0)
      << "data written before the disk filled was harmed";
  engine->unregister_file(big);
  engine->unregister_file(kept);
}

TEST(FullDisk, Ext4LoopImageReportsEnospcAndKeepsEarlierData) { fill_until_full("ext4"); }

TEST(FullDisk, SizeLimitedTmpfsReportsEnospcAndKeepsEarlierData) { fill_until_full("tmpfs"); }

}  // namespace
}  // namespace zinf::aio

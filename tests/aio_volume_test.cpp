// Striping over several directories: data round-trips for random extents,
// each stripe lands in the directory the layout says, and every directory
// gets its share.
#include <unistd.h>

#include <cstring>
#include <random>

#include <gtest/gtest.h>

#include "aio/thread_pool_engine.hpp"
#include "aio/volume.hpp"
#include "core/error.hpp"
#include "test_util.hpp"

namespace zinf::aio {
namespace {

using zinf::testing::aligned_bytes;
using zinf::testing::fill_random;
using zinf::testing::TempDir;

class VolumeTest : public ::testing::TestWithParam<std::size_t> {
 protected:
  VolumeOptions volume_options() {
    VolumeOptions options;
    for (std::size_t i = 0; i < GetParam(); ++i) {
      const auto sub = dir_ / ("nvme" + std::to_string(i));
      std::filesystem::create_directory(sub);
      options.directories.push_back(sub);
    }
    options.file_name = "stripe.bin";
    options.stripe_bytes = 2 * kBlock;
    return options;
  }
  static constexpr std::uint64_t kBlock = 64 << 10;
  TempDir dir_;
};

TEST_P(VolumeTest, RandomExtentsRoundTripAcrossPaths) {
  AioOptions aio;
  aio.block_size = kBlock;
  aio.queue_depth = 8;
  Volume volume(volume_options(), [&](std::size_t) { return make_engine(EngineKind::automatic, aio); });
  const std::uint64_t size = 8 << 20;
  volume.reserve(size);
  auto image = aligned_bytes(size);
  fill_random({image.get(), size}, 99);

  std::mt19937_64 random(99);
  std::vector<std::pair<std::uint64_t, std::uint64_t>> extents;
  for (std::uint64_t offset = 0; offset < size;) {
    const std::uint64_t length = std::min<std::uint64_t>((1 + random() % 100) * 4096, size - offset);
    extents.emplace_back(offset, length);
    offset += length;
  }
  std::vector<VolumeTicket> tickets;
  for (auto [offset, length] : extents) {
    tickets.push_back(volume.submit(Op::write, offset, image.get() + offset, length));
  }
  for (const auto& t : tickets) volume.wait(t);

  auto back = aligned_bytes(size);
  std::shuffle(extents.begin(), extents.end(), random);
  for (auto [offset, length] : extents) {
    volume.wait(volume.submit(Op::read, offset, back.get() + offset, length));
  }
  ASSERT_EQ(std::memcmp(image.get(), back.get(), size), 0);

  // The bytes of stripe k sit in path k mod n, found by a plain pread.
  auto raw = aligned_bytes(4096);
  for (std::uint64_t logical : {std::uint64_t{0}, 2 * kBlock, 4 * kBlock + 4096, size - 4096}) {
    const auto [path, physical] = volume.locate(logical);
    EXPECT_EQ(path, (logical / volume.stripe_bytes()) % GetParam());
    ASSERT_EQ(::pread(volume.file(path).fd(), raw.get(), 4096, static_cast<off_t>(physical)), 4096);
    EXPECT_EQ(std::memcmp(raw.get(), image.get() + logical, 4096), 0) << "logical " << logical;
  }
  for (std::size_t i = 0; i < volume.path_count(); ++i) {
    EXPECT_GE(volume.engine(i).stats().bytes_written, size / GetParam() - volume.stripe_bytes());
  }
}

INSTANTIATE_TEST_SUITE_P(Paths, VolumeTest, ::testing::Values(1, 2, 3));

TEST(Volume, StripeMustBeABlockMultiple) {
  TempDir dir;
  VolumeOptions options;
  options.directories = {dir.path()};
  options.stripe_bytes = 3 * 4096;
  AioOptions aio;
  aio.block_size = 8192;
  EXPECT_THROW(Volume(options, [&](std::size_t) { return make_posix_engine(aio); }), Error);
}

TEST(Volume, MissingDirectoryIsAClearError) {
  TempDir dir;
  VolumeOptions options;
  options.directories = {dir.path(), dir / "missing"};
  try {
    Volume volume(options, [](std::size_t) { return make_posix_engine(AioOptions{}); });
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_NE(std::string(error.what()).find("missing"), std::string::npos);
  }
}

}  // namespace
}  // namespace zinf::aio

// The DeepSpeed-style handle: any buffer, any length, any offset
// round-trips exactly; queued transfers finish at wait(); errors name path,
// offset and errno.
#include <cstring>
#include <fstream>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "aio/handle.hpp"
#include "core/error.hpp"
#include "test_util.hpp"

namespace zinf::aio {
namespace {

using testing::TempDir;

HandleOptions small_blocks() {
  HandleOptions options;
  options.aio.block_size = 64 << 10;
  options.aio.queue_depth = 4;
  options.aio.intra_op_parallelism = 2;
  return options;
}

std::vector<std::byte> pattern(std::size_t bytes, unsigned seed) {
  std::vector<std::byte> data(bytes);
  testing::fill_random(std::span(data), seed);
  return data;
}

TEST(AioHandle, AnySizeOffsetAndBufferAddressRoundTripsExactly) {
  TempDir dir;
  Handle handle(small_blocks());
  // Aligned, a tail under 4096, misaligned address, misaligned offset.
  const std::vector<std::pair<std::size_t, std::uint64_t>> cases = {
      {1 << 20, 0}, {(1 << 20) + 123, 0}, {4095, 0}, {10000, 4096}, {77777, 12345}, {1, 5}};
  int index = 0;
  for (const auto& [bytes, offset] : cases) {
    for (std::size_t shift : {0, 3}) {
      const auto path = dir / fmt::format("f{}", index++);
      auto storage = testing::aligned_bytes(bytes + 64);
      std::byte* out = storage.get() + shift;
      const auto data = pattern(bytes, static_cast<unsigned>(index));
      std::memcpy(out, data.data(), bytes);
      handle.pwrite(out, bytes, path, offset);
      EXPECT_EQ(std::filesystem::file_size(path), offset + bytes) << bytes << " at " << offset;
      auto back_storage = testing::aligned_bytes(bytes + 64);
      std::byte* back = back_storage.get() + shift;
      handle.pread(back, bytes, path, offset);
      EXPECT_EQ(std::memcmp(back, data.data(), bytes), 0) << bytes << " at " << offset << " shift " << shift;
    }
  }
}

TEST(AioHandle, QueuedTransfersFinishAtWaitAndAreCounted) {
  TempDir dir;
  Handle handle(small_blocks());
  constexpr int kFiles = 6;
  std::vector<std::vector<std::byte>> data;
  std::vector<testing::AlignedBytes> buffers;
  for (int i = 0; i < kFiles; ++i) {
    data.push_back(pattern(300000 + i * 1000, 40 + i));
    buffers.push_back(testing::aligned_bytes(data.back().size()));
    std::memcpy(buffers.back().get(), data.back().data(), data.back().size());
    handle.async_pwrite(buffers.back().get(), data.back().size(), dir / fmt::format("q{}", i));
  }
  EXPECT_EQ(handle.pending(), static_cast<std::size_t>(kFiles));
  EXPECT_EQ(handle.wait(), static_cast<std::uint64_t>(kFiles));
  EXPECT_EQ(handle.pending(), 0u);
  std::vector<testing::AlignedBytes> back;
  for (int i = 0; i < kFiles; ++i) {
    back.push_back(testing::aligned_bytes(data[i].size()));
    handle.async_pread(back.back().get(), data[i].size(), dir / fmt::format("q{}", i));
  }
  EXPECT_EQ(handle.wait(), static_cast<std::uint64_t>(kFiles));
  for (int i = 0; i < kFiles; ++i) EXPECT_EQ(std::memcmp(back[i].get(), data[i].data(), data[i].size()), 0);
  EXPECT_EQ(handle.wait(), 0u);
}

TEST(AioHandle, ErrorsNamePathOffsetAndErrno) {
  TempDir dir;
  Handle handle(small_blocks());
  auto buffer = testing::aligned_bytes(1 << 16);
  try {
    handle.pread(buffer.get(), 4096, dir / "missing");
    ADD_FAILURE() << "read of a missing file succeeded";
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_NE(std::string(error.what()).find("missing"), std::string::npos) << error.what();
  }
  // Reading past the end: the offset is named, and a queued read's error
  // comes out of wait().
  const auto path = dir / "short";
  handle.pwrite(buffer.get(), 5000, path);
  handle.async_pread(buffer.get(), 8192, path, 0);
  try {
    handle.wait();
    ADD_FAILURE() << "a read past the end of the file succeeded";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(path.string()), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("offset"), std::string::npos) << error.what();
  }
  try {
    handle.pwrite(buffer.get(), 4096, dir / "no-such-dir" / "f");
    ADD_FAILURE() << "a write into a missing directory succeeded";
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
  }
}

}  // namespace
}  // namespace zinf::aio

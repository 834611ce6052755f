#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "aio/file.hpp"
#include "core/error.hpp"
#include "test_util.hpp"

namespace zinf::aio {
namespace {

using zinf::testing::TempDir;

TEST(File, DiskFileUsesODirectAndReportsItsAlignment) {
  TempDir dir;
  File file = File::open(dir / "a.bin", OpenMode::create);
  if (!file.direct()) GTEST_SKIP() << "test directory " << dir.path() << " (" << file.filesystem() << ") has no O_DIRECT; set ZINF_TEST_DIR to a disk-backed directory";
  EXPECT_GE(file.offset_alignment(), 512u);
  EXPECT_LE(file.offset_alignment(), 4096u);
  EXPECT_GE(file.memory_alignment(), 1u);
  EXPECT_TRUE(file.writable());
}

TEST(File, CreatedWithMode0600) {
  TempDir dir;
  const mode_t old_mask = ::umask(0);
  File file = File::open(dir / "a.bin", OpenMode::create);
  ::umask(old_mask);
  struct stat info {};
  ASSERT_EQ(::stat(file.path().c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600u);
}

TEST(File, RefusesToFollowASymlink) {
  TempDir dir;
  File::open(dir / "target", OpenMode::create);
  std::filesystem::create_symlink(dir / "target", dir / "link");
  try {
    File::open(dir / "link", OpenMode::create);
    FAIL() << "opened through a symlink";
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), ELOOP);
    EXPECT_NE(std::string(error.what()).find("link"), std::string::npos);
  }
}

TEST(File, MissingFileErrorNamesPathAndErrno) {
  TempDir dir;
  try {
    File::open(dir / "nope", OpenMode::read_only);
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.error_number(), ENOENT);
    EXPECT_EQ(error.context().path, (dir / "nope").string());
    EXPECT_NE(std::string(error.what()).find("ENOENT"), std::string::npos);
  }
}

TEST(File, ExclusiveCreateRefusesAnExistingFile) {
  TempDir dir;
  File::open(dir / "a", OpenMode::create);
  EXPECT_THROW(File::open(dir / "a", OpenMode::create_exclusive), Error);
}

TEST(File, TmpfsFallsBackToBufferedWhenPreferred) {
  if (filesystem_name("/dev/shm") != "tmpfs") GTEST_SKIP() << "/dev/shm is not tmpfs here";
  TempDir dir("/dev/shm");
  File file = File::open(dir / "a.bin", OpenMode::create, DirectMode::prefer);
  EXPECT_FALSE(file.direct());
  EXPECT_EQ(file.offset_alignment(), 1u);
  EXPECT_EQ(file.filesystem(), "tmpfs");
}

TEST(File, TmpfsIsRefusedWhenDirectIsRequired) {
  if (filesystem_name("/dev/shm") != "tmpfs") GTEST_SKIP() << "/dev/shm is not tmpfs here";
  TempDir dir("/dev/shm");
  try {
    File::open(dir / "a.bin", OpenMode::create, DirectMode::require);
    FAIL() << "tmpfs accepted as direct";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::unsupported);
    EXPECT_NE(std::string(error.what()).find("O_DIRECT"), std::string::npos);
    EXPECT_NE(std::string(error.what()).find("tmpfs"), std::string::npos);
  }
}

TEST(File, PreallocateReservesBlocks) {
  TempDir dir;
  File file = File::open(dir / "a.bin", OpenMode::create);
  file.preallocate(8 << 20);
  EXPECT_EQ(file.size_bytes(), 8u << 20);
  struct stat info {};
  ASSERT_EQ(::fstat(file.fd(), &info), 0);
  EXPECT_GE(static_cast<std::uint64_t>(info.st_blocks) * 512, 8u << 20);
}

TEST(File, ReadOnlyFileIsNotWritable) {
  TempDir dir;
  File::open(dir / "a", OpenMode::create);
  EXPECT_FALSE(File::open(dir / "a", OpenMode::read_only).writable());
}

}  // namespace
}  // namespace zinf::aio

// A real full filesystem: a small ext4 image on a loop device (O_DIRECT, as
// on an NVMe drive) and a size-limited tmpfs (buffered). Writing past the
// end must fail with a no_space error naming the file, and data written
// before must read back intact. Needs root and a loop device; skips saying
// so otherwise.
#include <sys/mount.h>
#include <unistd.h>

#include <cstdlib>
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
using zinf::testing::TempDir;

class SmallFilesystem {
 public:
  // kind: "ext4" (loop image) or "tmpfs".
  SmallFilesystem(const std::string& kind, std::uint64_t megabytes) : kind_(kind) {
    mount_point_ = dir_.path() / "mnt";
    std::filesystem::create_directory(mount_point_);
    if (::geteuid() != 0) {
      skip_reason_ = "needs root to mount a small filesystem";
      return;
    }
    if (kind == "tmpfs") {
      const std::string options = "size=" + std::to_string(megabytes) + "m";
      if (::mount("tmpfs", mount_point_.c_str(), "tmpfs", 0, options.c_str()) != 0) {
        skip_reason_ = std::string("mount tmpfs failed: ") + std::strerror(errno);
        return;
      }
    } else {
      const std::string image = (dir_.path() / "fs.img").string();
      const std::string command = "truncate -s " + std::to_string(megabytes) + "M " + image +
                                  " && mkfs.ext4 -q -F -O ^has_journal " + image +
                                  " >/dev/null 2>&1 && mount -o loop " + image + " " +
                                  mount_point_.string() + " 2>/dev/null";
      if (std::system(command.c_str()) != 0) {
        skip_reason_ = "could not make and loop-mount an ext4 image (mkfs.ext4, loop devices)";
        return;
      }
    }
    mounted_ = true;
  }
  ~SmallFilesystem() {
    if (mounted_) ::umount2(mount_point_.c_str(), MNT_DETACH);
  }
  const std::string& skip_reason() const { return skip_reason_; }
  const std::filesystem::path& path() const { return mount_point_; }

 private:
  std::string kind_;
  TempDir dir_;
  std::filesystem::path mount_point_;
  bool mounted_ = false;
  std::string skip_reason_;
};

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

// A file opened for zinf's direct I/O. O_DIRECT is used where the filesystem
// really supports it, and the file reports the alignment that O_DIRECT needs
// (from statx STATX_DIOALIGN, 4096 when the kernel does not say). Where
// O_DIRECT is refused (EINVAL at open) or meaningless (tmpfs, ramfs: the data
// lives in the page cache anyway) the file falls back to buffered I/O with one
// warning, unless the caller requires direct I/O.
//
// Files are created 0600 with O_NOFOLLOW and O_CLOEXEC: swap files hold model
// state and must not be readable by others or redirected through a symlink.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace zinf::aio {

enum class DirectMode {
  prefer,   // O_DIRECT where possible, buffered fallback with one warning
  require,  // O_DIRECT or Error{unsupported}
  off,      // buffered I/O
};

enum class OpenMode {
  read_only,
  read_write,         // existing file
  create,             // create if missing, keep contents
  create_exclusive,   // must not exist (O_EXCL)
};

class File {
 public:
  static File open(const std::filesystem::path& path, OpenMode mode,
                   DirectMode direct = DirectMode::prefer);

  File(File&& other) noexcept;
  File& operator=(File&& other) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  int fd() const noexcept { return fd_; }
  const std::string& path() const noexcept { return path_; }
  // Process-unique identity: engines key registrations by it, never by fd.
  std::uint64_t id() const noexcept { return id_; }
  bool direct() const noexcept { return direct_; }
  bool writable() const noexcept { return writable_; }
  // Alignment O_DIRECT needs for file offsets and lengths, and for buffer
  // addresses; 1 for buffered files.
  std::uint32_t offset_alignment() const noexcept { return offset_alignment_; }
  std::uint32_t memory_alignment() const noexcept { return memory_alignment_; }
  // Name of the filesystem type ("ext4", "tmpfs", ...), for messages.
  const std::string& filesystem() const noexcept { return filesystem_; }

  // Allocates blocks for [0, bytes) so later writes do not pay for block
  // allocation (ext4 lays out new blocks at a third of the disk's speed).
  // Falls back to ftruncate, with one warning, where fallocate is refused.
  void preallocate(std::uint64_t bytes);
  void truncate(std::uint64_t bytes);
  std::uint64_t size_bytes() const;
  void sync_data();
  void close() noexcept;

 private:
  File() = default;

  int fd_ = -1;
  std::string path_;
  std::uint64_t id_ = 0;
  bool direct_ = false;
  bool writable_ = false;
  std::uint32_t offset_alignment_ = 1;
  std::uint32_t memory_alignment_ = 1;
  std::string filesystem_;
};

// The filesystem type name of the filesystem holding `path` ("ext4", "xfs",
// "tmpfs", "0x..." when unknown).
std::string filesystem_name(const std::filesystem::path& path);

// The block device holding `path` as the kernel names it ("nvme0n1p1",
// from /sys/dev/block), or "dev M:N" when it has no block device (tmpfs,
// overlay) or sysfs does not say: what write accounting groups bytes by.
std::string device_name(const std::filesystem::path& path);

}  // namespace zinf::aio

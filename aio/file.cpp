#include "aio/file.hpp"

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <fstream>
#include <string>
#include <utility>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"

namespace zinf::aio {
namespace {

std::atomic<std::uint64_t> next_file_id{1};

std::string name_for_magic(long magic) {
  switch (magic) {
    case EXT4_SUPER_MAGIC: return "ext4";  // also ext2/ext3
    case XFS_SUPER_MAGIC: return "xfs";
    case BTRFS_SUPER_MAGIC: return "btrfs";
    case TMPFS_MAGIC: return "tmpfs";
    case RAMFS_MAGIC: return "ramfs";
    case NFS_SUPER_MAGIC: return "nfs";
    case OVERLAYFS_SUPER_MAGIC: return "overlayfs";
    case 0x2fc12fc1: return "zfs";
    case 0x65735546: return "fuse";
    default: return fmt::format("0x{:x}", static_cast<unsigned long>(magic));
  }
}

bool memory_backed(long magic) { return magic == TMPFS_MAGIC || magic == RAMFS_MAGIC; }

int open_flags(OpenMode mode) {
  int flags = O_CLOEXEC | O_NOFOLLOW;
  switch (mode) {
    case OpenMode::read_only: flags |= O_RDONLY; break;
    case OpenMode::read_write: flags |= O_RDWR; break;
    case OpenMode::create: flags |= O_RDWR | O_CREAT; break;
    case OpenMode::create_exclusive: flags |= O_RDWR | O_CREAT | O_EXCL; break;
  }
  return flags;
}

}  // namespace

std::string filesystem_name(const std::filesystem::path& path) {
  struct statfs info {};
  if (::statfs(path.c_str(), &info) != 0) return "unknown";
  return name_for_magic(info.f_type);
}

std::string device_name(const std::filesystem::path& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) return "unknown";
  const unsigned major_number = major(info.st_dev);
  const unsigned minor_number = minor(info.st_dev);
  std::ifstream uevent(fmt::format("/sys/dev/block/{}:{}/uevent", major_number, minor_number));
  std::string line;
  while (std::getline(uevent, line)) {
    if (line.rfind("DEVNAME=", 0) == 0) return line.substr(8);
  }
  return fmt::format("dev {}:{}", major_number, minor_number);
}

File File::open(const std::filesystem::path& path, OpenMode mode, DirectMode direct) {
  File file;
  file.path_ = path.string();
  file.id_ = next_file_id.fetch_add(1, std::memory_order_relaxed);
  file.writable_ = mode != OpenMode::read_only;
  const int flags = open_flags(mode);

  int fd = -1;
  bool want_direct = direct != DirectMode::off;
  if (want_direct) {
    fd = ::open(file.path_.c_str(), flags | O_DIRECT, 0600);
    if (fd < 0 && errno != EINVAL) throw_path_error("open", file.path_, errno);
  }
  if (fd < 0) {
    // EINVAL from O_DIRECT: the filesystem refuses direct I/O. Some kernels
    // create the file before refusing, so O_EXCL cannot be asked again.
    const bool refused = want_direct;
    want_direct = false;
    fd = ::open(file.path_.c_str(), refused ? flags & ~O_EXCL : flags, 0600);
    if (fd < 0) throw_path_error("open", file.path_, errno);
  }
  file.fd_ = fd;

  struct statfs fs_info {};
  long magic = 0;
  if (::fstatfs(fd, &fs_info) == 0) magic = fs_info.f_type;
  file.filesystem_ = name_for_magic(magic);

  std::uint32_t offset_alignment = 4096;
  std::uint32_t memory_alignment = 4096;
  if (want_direct) {
    struct statx info {};
    if (::statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &info) == 0 &&
        (info.stx_mask & STATX_DIOALIGN) != 0) {
      if (info.stx_dio_offset_align == 0) {
        want_direct = false;  // the filesystem says: no direct I/O here
      } else {
        offset_alignment = info.stx_dio_offset_align;
        memory_alignment = info.stx_dio_mem_align;
      }
    } else if (memory_backed(magic)) {
      // Recent kernels accept O_DIRECT on tmpfs but it is the page cache by
      // another name: treat it as buffered so nobody mistakes it for a disk.
      want_direct = false;
    }
    if (!want_direct) {
      // Reopen without O_DIRECT so the flags match what we report.
      const int buffered = ::open(file.path_.c_str(), flags & ~(O_CREAT | O_EXCL), 0600);
      if (buffered < 0) throw_path_error("open", file.path_, errno);
      ::close(fd);
      file.fd_ = buffered;
    }
  }

  if (!want_direct && direct == DirectMode::require) {
    const std::string fs = file.filesystem_;
    const std::string shown = file.path_;
    file.close();
    ErrorContext ctx;
    ctx.path = shown;
    ctx.error_number = EINVAL;
    throw Error(ErrorKind::unsupported,
                fmt::format("{} has no O_DIRECT support (filesystem {}): use a "
                            "directory on a disk-backed filesystem such as ext4 or xfs",
                            shown, fs),
                std::move(ctx));
  }
  if (!want_direct && direct == DirectMode::prefer) {
    log_once(fmt::format("buffered:{}", file.filesystem_), spdlog::level::warn,
             fmt::format("O_DIRECT is not available on {} ({}); using buffered I/O "
                         "there: bandwidth will reflect the page cache, not the disk",
                         file.filesystem_, file.path_));
  }
  file.direct_ = want_direct;
  file.offset_alignment_ = want_direct ? offset_alignment : 1;
  file.memory_alignment_ = want_direct ? memory_alignment : 1;
  return file;
}

File::File(File&& other) noexcept { *this = std::move(other); }

File& File::operator=(File&& other) noexcept {
  if (this != &other) {
    close();
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
    id_ = other.id_;
    direct_ = other.direct_;
    writable_ = other.writable_;
    offset_alignment_ = other.offset_alignment_;
    memory_alignment_ = other.memory_alignment_;
    filesystem_ = std::move(other.filesystem_);
  }
  return *this;
}

File::~File() { close(); }

void File::close() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
}

void File::preallocate(std::uint64_t bytes) {
  if (bytes == 0) return;
  if (::fallocate(fd_, 0, 0, static_cast<off_t>(bytes)) == 0) return;
  const int error = errno;
  if (error != EOPNOTSUPP && error != ENOSYS) {
    throw_io_error("fallocate", path_, 0, bytes, error);
  }
  log_once(fmt::format("no-fallocate:{}", filesystem_), spdlog::level::warn,
           fmt::format("fallocate is not supported on {} ({}); extending with "
                       "ftruncate, so a full disk shows up at write time",
                       filesystem_, path_));
  if (size_bytes() < bytes) truncate(bytes);
}

void File::truncate(std::uint64_t bytes) {
  if (::ftruncate(fd_, static_cast<off_t>(bytes)) != 0) {
    throw_io_error("ftruncate", path_, 0, bytes, errno);
  }
}

std::uint64_t File::size_bytes() const {
  struct stat info {};
  if (::fstat(fd_, &info) != 0) throw_path_error("fstat", path_, errno);
  return static_cast<std::uint64_t>(info.st_size);
}

void File::sync_data() {
  if (::fdatasync(fd_) != 0) throw_path_error("fdatasync", path_, errno);
}

}  // namespace zinf::aio

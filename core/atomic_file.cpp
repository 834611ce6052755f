#include "core/atomic_file.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <random>
#include <string>

#include <fmt/format.h>

#include "core/error.hpp"

namespace zinf {

void sync_directory(const std::filesystem::path& directory) {
  const std::filesystem::path dir = directory.empty() ? "." : directory;
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw_path_error("open", dir.string(), errno);
  const int synced = ::fsync(fd);
  const int error = errno;
  ::close(fd);
  if (synced != 0) throw_path_error("fsync", dir.string(), error);
}

void replace_file(const std::filesystem::path& path, std::span<const std::span<const std::byte>> pieces,
                  bool sync) {
  // A fresh, unguessable name created exclusively and never through a
  // link: in a shared nvme_path a symlink planted at a fixed "<path>.tmp"
  // would otherwise make this truncate and overwrite its target.
  std::random_device random;
  const std::filesystem::path temporary =
      path.string() + fmt::format(".tmp.{}.{:08x}{:08x}", ::getpid(), random(), random());
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) throw_path_error("open", temporary.string(), errno);
  std::uint64_t offset = 0;
  for (const auto& piece : pieces) {
    std::size_t done = 0;
    while (done < piece.size()) {
      const ssize_t n = ::write(fd, piece.data() + done, piece.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        const int error = errno;
        ::close(fd);
        ::unlink(temporary.c_str());
        throw_io_error("write", temporary.string(), offset + done, piece.size() - done, error);
      }
      done += static_cast<std::size_t>(n);
    }
    offset += piece.size();
  }
  if (sync && ::fsync(fd) != 0) {
    const int error = errno;
    ::close(fd);
    ::unlink(temporary.c_str());
    throw_path_error("fsync", temporary.string(), error);
  }
  ::close(fd);
  if (::rename(temporary.c_str(), path.c_str()) != 0) {
    const int error = errno;
    ::unlink(temporary.c_str());
    throw_path_error("rename", temporary.string(), error);
  }
  // The rename itself must reach the disk too.
  if (sync) sync_directory(path.parent_path());
}

void replace_file(const std::filesystem::path& path, std::string_view text, bool sync) {
  const std::span<const std::byte> piece(reinterpret_cast<const std::byte*>(text.data()), text.size());
  replace_file(path, std::span(&piece, 1), sync);
}

}  // namespace zinf

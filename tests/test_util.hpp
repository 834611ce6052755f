// Helpers shared by the test suites: scratch directories on a disk-backed
// filesystem, aligned buffers, seeded random bytes.
#pragma once

#include <sys/mount.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <stdexcept>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>

namespace zinf::testing {

// A fresh directory (0700) removed with its contents at scope exit. Lives
// under $ZINF_TEST_DIR, else /var/tmp: /tmp may be tmpfs, which has no
// O_DIRECT.
class TempDir {
 public:
  explicit TempDir(const std::string& parent = "") {
    std::string base = parent;
    if (base.empty()) {
      const char* env = std::getenv("ZINF_TEST_DIR");
      base = env != nullptr ? env : "/var/tmp";
    }
    std::string pattern = base + "/zinf-test.XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp " + pattern);
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

struct FreeDeleter {
  void operator()(std::byte* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<std::byte[], FreeDeleter>;

inline AlignedBytes aligned_bytes(std::size_t bytes, std::size_t alignment = 4096) {
  const std::size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  return AlignedBytes(static_cast<std::byte*>(std::aligned_alloc(alignment, rounded == 0 ? alignment : rounded)));
}

inline void fill_random(std::span<std::byte> bytes, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::size_t i = 0;
  for (; i + 8 <= bytes.size(); i += 8) {
    const std::uint64_t word = random();
    std::memcpy(bytes.data() + i, &word, 8);
  }
  for (; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(random());
}

// Runs `body` in a forked child and returns its exit status (or 128 + the
// signal). For tests that change process-wide state: seccomp filters,
// capabilities, resource limits.
inline int run_in_child(const std::function<int()>& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    int code = 99;
    try {
      code = body();
    } catch (...) {
      code = 98;
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

// A small filesystem mounted for the test's lifetime: a real full disk or a
// read-only one. Needs root and loop devices; skip_reason() says why not.
class SmallFilesystem {
 public:
  // kind: "ext4" (loop image), "tmpfs" or "tmpfs-ro" (read-only).
  SmallFilesystem(const std::string& kind, std::uint64_t megabytes) : kind_(kind) {
    mount_point_ = dir_.path() / "mnt";
    std::filesystem::create_directory(mount_point_);
    if (::geteuid() != 0) {
      skip_reason_ = "needs root to mount a small filesystem";
      return;
    }
    if (kind == "tmpfs" || kind == "tmpfs-ro") {
      const std::string options = "size=" + std::to_string(megabytes) + "m";
      const unsigned long flags = kind == "tmpfs-ro" ? MS_RDONLY : 0;
      if (::mount("tmpfs", mount_point_.c_str(), "tmpfs", flags, options.c_str()) != 0) {
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

// A whole file as text ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A shell command's exit code and its stdout and stderr.
struct CommandOutcome {
  int exit_code = 0;  // 128 when it did not exit normally
  std::string out;
  std::string err;
};

inline CommandOutcome run_command(const std::string& command) {
  TempDir logs;
  const std::string redirected =
      command + " >" + (logs / "out").string() + " 2>" + (logs / "err").string();
  const int status = std::system(redirected.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, slurp(logs / "out"), slurp(logs / "err")};
}

}  // namespace zinf::testing

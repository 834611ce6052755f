#include "zero3/launch.hpp"

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <optional>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"

namespace zinf::zero3 {

std::uint16_t free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw_path_error("socket", "127.0.0.1", errno);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  socklen_t length = sizeof(address);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    const int error = errno;
    ::close(fd);
    throw_path_error("bind", "127.0.0.1:0", error);
  }
  ::close(fd);
  return ntohs(address.sin_port);
}

SpawnResult spawn_local_ranks(int world_size, std::span<const std::string> argv,
                              std::chrono::seconds grace) {
  if (world_size < 1 || argv.empty()) {
    throw Error(ErrorKind::invalid, fmt::format("spawn_local_ranks: world size {} with {} arguments",
                                                world_size, argv.size()));
  }
  const std::uint16_t port = free_local_port();
  std::vector<pid_t> pids;
  for (int rank = 0; rank < world_size; ++rank) {
    const pid_t pid = ::fork();
    if (pid < 0) throw_path_error("fork", argv[0], errno);
    if (pid == 0) {
      ::setenv("RANK", std::to_string(rank).c_str(), 1);
      ::setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      ::setenv("WORLD_SIZE", std::to_string(world_size).c_str(), 1);
      ::setenv("LOCAL_WORLD_SIZE", std::to_string(world_size).c_str(), 1);
      ::setenv("MASTER_ADDR", "127.0.0.1", 1);
      ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::vector<char*> args;
      for (const std::string& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      std::fprintf(stderr, "rank %d: exec %s failed: %s\n", rank, args[0], std::strerror(errno));
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  SpawnResult result;
  std::vector<bool> done(world_size, false);
  int remaining = world_size;
  bool killing = false;
  auto kill_at = std::chrono::steady_clock::time_point::max();
  while (remaining > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (int rank = 0; rank < world_size; ++rank) {
        if (pids[rank] != pid || done[rank]) continue;
        done[rank] = true;
        --remaining;
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (code != 0 && result.failed_rank < 0) {
          result.exit_code = code;
          result.failed_rank = rank;
          result.message = WIFEXITED(status)
                               ? fmt::format("rank {} exited with status {}", rank, code)
                               : fmt::format("rank {} was killed by signal {}", rank, WTERMSIG(status));
          killing = true;
          kill_at = std::chrono::steady_clock::now() + grace;
        }
      }
      continue;
    }
    if (killing && std::chrono::steady_clock::now() > kill_at) {
      for (int rank = 0; rank < world_size; ++rank) {
        if (!done[rank]) ::kill(pids[rank], SIGKILL);
      }
      killing = false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return result;
}

}  // namespace zinf::zero3

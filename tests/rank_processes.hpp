// Runs a test body in several real processes, one per rank, forked from the
// test: each child gets its LaunchEnv (loopback, a free port) and reports
// its outcome; the parent collects exit codes, error text and a hang (a
// rank still running at the deadline is killed and reported as hung).
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "zero3/communicator.hpp"
#include "zero3/launch.hpp"

namespace zinf::testing {

struct RankOutcome {
  int exit_code = -1;   // -1 when killed by a signal or hung
  int signal = 0;
  bool hung = false;
  std::string error;    // what the body threw, if anything
};

inline std::vector<RankOutcome> run_ranks(int world, const std::function<void(const zero3::LaunchEnv&)>& body,
                                          std::chrono::seconds deadline = std::chrono::seconds(120)) {
  std::fflush(nullptr);
  const std::uint16_t port = zero3::free_local_port();
  std::vector<pid_t> pids(world);
  std::vector<int> pipes(world);
  for (int rank = 0; rank < world; ++rank) {
    int fds[2];
    if (::pipe(fds) != 0) throw std::runtime_error("pipe");
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork");
    if (pid == 0) {
      ::close(fds[0]);
      zero3::LaunchEnv launch;
      launch.rank = rank;
      launch.world_size = world;
      launch.local_rank = rank;
      launch.master_addr = "127.0.0.1";
      launch.master_port = port;
      int code = 0;
      std::string error;
      try {
        body(launch);
      } catch (const std::exception& e) {
        error = e.what();
        code = 3;
      } catch (...) {
        error = "unknown exception";
        code = 3;
      }
      if (!error.empty()) (void)!::write(fds[1], error.data(), error.size());
      ::close(fds[1]);
      std::fflush(nullptr);
      ::_exit(code);
    }
    ::close(fds[1]);
    pids[rank] = pid;
    pipes[rank] = fds[0];
  }
  std::vector<RankOutcome> outcomes(world);
  std::vector<bool> done(world, false);
  const auto until = std::chrono::steady_clock::now() + deadline;
  int remaining = world;
  while (remaining > 0) {
    for (int rank = 0; rank < world; ++rank) {
      if (done[rank]) continue;
      int status = 0;
      if (::waitpid(pids[rank], &status, WNOHANG) == pids[rank]) {
        done[rank] = true;
        --remaining;
        if (WIFEXITED(status)) outcomes[rank].exit_code = WEXITSTATUS(status);
        if (WIFSIGNALED(status)) outcomes[rank].signal = WTERMSIG(status);
      }
    }
    if (remaining > 0 && std::chrono::steady_clock::now() > until) {
      for (int rank = 0; rank < world; ++rank) {
        if (done[rank]) continue;
        ::kill(pids[rank], SIGKILL);
        int status = 0;
        ::waitpid(pids[rank], &status, 0);
        outcomes[rank].hung = true;
        done[rank] = true;
        --remaining;
      }
    }
    if (remaining > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  for (int rank = 0; rank < world; ++rank) {
    char chunk[4096];
    ssize_t n = 0;
    while ((n = ::read(pipes[rank], chunk, sizeof chunk)) > 0) outcomes[rank].error.append(chunk, n);
    ::close(pipes[rank]);
  }
  return outcomes;
}

inline std::string describe(const std::vector<RankOutcome>& outcomes) {
  std::string text;
  for (std::size_t rank = 0; rank < outcomes.size(); ++rank) {
    const auto& o = outcomes[rank];
    text += "rank " + std::to_string(rank) + ": " +
            (o.hung ? std::string("hung") : o.signal ? "signal " + std::to_string(o.signal)
                                                     : "exit " + std::to_string(o.exit_code));
    if (!o.error.empty()) text += " (" + o.error + ")";
    text += "\n";
  }
  return text;
}

inline bool all_succeeded(const std::vector<RankOutcome>& outcomes) {
  for (const auto& o : outcomes) {
    if (o.hung || o.signal != 0 || o.exit_code != 0) return false;
  }
  return true;
}

}  // namespace zinf::testing

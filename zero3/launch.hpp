// Starting a job's local ranks the way torchrun does, for programs that may
// be run either under a launcher or on their own ("--world-size N"):
// a process that finds RANK in its environment is a rank; one that does not
// re-runs itself N times with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
// MASTER_PORT set, and waits for them.
#pragma once

#include <chrono>
#include <cstdint>
#include <span>
#include <string>

namespace zinf::zero3 {

// A TCP port free on the loopback interface now (the kernel picks it).
std::uint16_t free_local_port();

struct SpawnResult {
  int exit_code = 0;   // 0 when every rank exited 0; else the first failure's code
  int failed_rank = -1;
  std::string message; // which rank failed and how
};

// Runs `argv` (argv[0] a path to an executable) as ranks 0..world-1 on this
// machine, their output interleaved on ours. When a rank fails, the others
// get `grace` to notice (their collectives fail) before they are killed.
SpawnResult spawn_local_ranks(int world_size, std::span<const std::string> argv,
                              std::chrono::seconds grace = std::chrono::seconds(60));

}  // namespace zinf::zero3

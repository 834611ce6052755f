// Collectives between the data-parallel ranks, behind one interface so the
// partitioner does not know which library moves the bytes:
//
//   gloo  CPU tensors over TCP, from Debian's libgloo; ranks meet through a
//         c10d TCPStore at MASTER_ADDR:MASTER_PORT, exactly as torchrun's
//         workers do, so the launchers users already have work unchanged.
//   nccl  device tensors on GPUs (built when NCCL and CUDA are found); its
//         unique id travels over a gloo communicator.
//   local a world of one: every collective is a copy.
//
// All ranks must call the same collectives in the same order with the same
// sizes. A call blocks until its data is in place. When a peer dies or stops
// answering within the timeout, every later call on every surviving rank
// throws Error{comm} naming the collective; a communicator that failed once
// stays failed (a half-done collective leaves peers out of step).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace zinf::swap {
class StrictDevice;
}

namespace zinf::zero3 {

enum class ReduceOp { sum, max };

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string_view backend() const = 0;
  // True when the buffers of every collective must be device memory (NCCL,
  // and the strict stand-in's); false when they are host memory (Gloo,
  // local).
  virtual bool device_memory() const { return false; }

  // Every rank gives `bytes_per_rank` bytes; `recv` (world_size x that)
  // receives them in rank order. `send` may be recv + rank x bytes_per_rank
  // (in place).
  virtual void all_gather(const void* send, void* recv, std::size_t bytes_per_rank) = 0;
  // `send` holds world_size blocks of `count_per_rank` floats; `recv`
  // receives the element-wise sum over ranks of block `rank`.
  virtual void reduce_scatter(const float* send, float* recv, std::size_t count_per_rank) = 0;
  virtual void all_reduce(float* data, std::size_t count, ReduceOp op = ReduceOp::sum) = 0;
  virtual void broadcast(void* data, std::size_t bytes, int root) = 0;
  virtual void barrier() = 0;
};

// Where this process stands in the job, as torchrun (and most launchers:
// torch.distributed.launch, deepspeed, SLURM wrappers) describe it.
struct LaunchEnv {
  int rank = 0;                // RANK
  int world_size = 1;          // WORLD_SIZE
  int local_rank = 0;          // LOCAL_RANK (the GPU index on this node)
  std::string master_addr = "127.0.0.1";  // MASTER_ADDR
  std::uint16_t master_port = 29500;      // MASTER_PORT
  // TORCHELASTIC_USE_AGENT_STORE=True: torchrun's agent already serves the
  // store at MASTER_ADDR:MASTER_PORT, so rank 0 joins it instead of serving.
  bool agent_store = false;
};

// Reads the variables above; a process without RANK and WORLD_SIZE is a
// world of one. Throws Error{config} naming the variable when one is
// malformed or inconsistent (RANK >= WORLD_SIZE).
LaunchEnv launch_env_from_environment();

enum class Backend { automatic, local, gloo, nccl };
std::string_view to_string(Backend backend);

struct CommunicatorOptions {
  Backend backend = Backend::automatic;  // automatic: local for one rank, else gloo
  // How long a collective or the rendezvous waits for a peer before it
  // fails (ZINF_COMM_TIMEOUT_S overrides).
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};
};

// Joins the job described by `env`. Throws Error{unsupported} when the
// backend is not in this build, Error{comm} when the rendezvous fails.
std::unique_ptr<Communicator> make_communicator(const LaunchEnv& env,
                                                const CommunicatorOptions& options = {});

std::unique_ptr<Communicator> make_local_communicator();
// Null where the build has no Gloo.
std::unique_ptr<Communicator> make_gloo_communicator(const LaunchEnv& env,
                                                     std::chrono::milliseconds timeout);
// Collectives on device memory of GPU `env.local_rank`; the unique id is
// broadcast over `bootstrap`. `timeout` bounds the rendezvous (a
// non-blocking ncclCommInitRankConfig, aborted past it) and every
// collective. Null where the build has no NCCL.
std::unique_ptr<Communicator> make_nccl_communicator(const LaunchEnv& env, Communicator& bootstrap,
                                                     std::chrono::milliseconds timeout);

// The strict device stand-in's communicator: NCCL's contract over
// `device`'s memory. Every buffer must be device memory of `device` (a host
// pointer is Error{invalid} naming the collective, as NCCL would fault);
// the bytes move over `host`, a host-memory communicator of the same job.
std::unique_ptr<Communicator> make_strict_device_communicator(std::unique_ptr<Communicator> host,
                                                              std::shared_ptr<swap::StrictDevice> device);

bool gloo_available();
bool nccl_available();

}  // namespace zinf::zero3

// The GPU communicator: NCCL collectives on device memory, on a stream of
// its own. Each call waits for its collective, polling NCCL's asynchronous
// error and a deadline so a dead peer aborts the communicator instead of
// hanging the rank. Built when the build finds CUDA and NCCL.
#include <cuda_runtime.h>
#include <nccl.h>

#include <thread>

#include <fmt/format.h>

#include "core/error.hpp"
#include "zero3/communicator.hpp"

namespace zinf::zero3 {
namespace {

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const LaunchEnv& launch, Communicator& bootstrap, std::chrono::milliseconds timeout)
      : rank_(launch.rank), world_size_(launch.world_size), device_(launch.local_rank), timeout_(timeout) {
    check_cuda(cudaSetDevice(device_), "cudaSetDevice");
    ncclUniqueId id{};
    if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    bootstrap.broadcast(&id, sizeof(id), 0);
    // Non-blocking init, polled against the deadline: a peer that never
    // joins fails this rank with a message instead of hanging it.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t started = ncclCommInitRankConfig(&comm_, world_size_, id, rank_, &config);
    if (started != ncclSuccess && started != ncclInProgress) check_nccl(started, "ncclCommInitRankConfig");
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      ncclResult_t state = ncclInProgress;
      ncclCommGetAsyncError(comm_, &state);
      if (state == ncclSuccess) break;
      if (state != ncclInProgress) check_nccl(state, "ncclCommInitRankConfig");
      if (std::chrono::steady_clock::now() > deadline) {
        failed_ = true;
        throw Error(ErrorKind::comm,
                    fmt::format("rank {} of {}: NCCL rendezvous timed out after {} s (a peer never joined)",
                                rank_, world_size_,
                                std::chrono::duration_cast<std::chrono::seconds>(timeout_).count()));
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }

  ~NcclCommunicator() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
    if (comm_ != nullptr) {
      if (failed_) ncclCommAbort(comm_);
      else ncclCommDestroy(comm_);
    }
  }

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  std::string_view backend() const override { return "nccl"; }
  bool device_memory() const override { return true; }

  void all_gather(const void* send, void* recv, std::size_t bytes) override {
    run("all_gather", ncclAllGather(send, recv, bytes, ncclUint8, comm_, stream_));
  }
  void reduce_scatter(const float* send, float* recv, std::size_t count) override {
    run("reduce_scatter", ncclReduceScatter(send, recv, count, ncclFloat32, ncclSum, comm_, stream_));
  }
  void all_reduce(float* data, std::size_t count, ReduceOp op) override {
    run("all_reduce", ncclAllReduce(data, data, count, ncclFloat32,
                                    op == ReduceOp::sum ? ncclSum : ncclMax, comm_, stream_));
  }
  void broadcast(void* data, std::size_t bytes, int root) override {
    run("broadcast", ncclBroadcast(data, data, bytes, ncclUint8, root, comm_, stream_));
  }
  void barrier() override {
    // NCCL has no barrier: an all-reduce of one float is the usual stand-in.
    float* one = nullptr;
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&one), sizeof(float), stream_), "cudaMallocAsync");
    run("barrier", ncclAllReduce(one, one, 1, ncclFloat32, ncclSum, comm_, stream_));
    cudaFreeAsync(one, stream_);
  }

 private:
  void check_cuda(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
      throw Error(ErrorKind::comm, fmt::format("rank {} (GPU {}): {} failed: {}", rank_, device_,
                                               what, cudaGetErrorString(status)));
    }
  }
  void check_nccl(ncclResult_t status, const char* what) {
    if (status != ncclSuccess) {
      failed_ = true;
      throw Error(ErrorKind::comm, fmt::format("rank {} of {}: {} failed: {}", rank_, world_size_,
                                               what, ncclGetErrorString(status)));
    }
  }

  void run(const char* op, ncclResult_t queued) {
    if (failed_) {
      throw Error(ErrorKind::comm, fmt::format("rank {} of {}: {} refused: an earlier collective failed",
                                               rank_, world_size_, op));
    }
    check_nccl(queued, op);
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    for (;;) {
      const cudaError_t state = cudaStreamQuery(stream_);
      if (state == cudaSuccess) return;
      if (state != cudaErrorNotReady) check_cuda(state, op);
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess || std::chrono::steady_clock::now() > deadline) {
        failed_ = true;
        throw Error(ErrorKind::comm,
                    fmt::format("rank {} of {}: {} failed; a peer rank died or stopped answering: {}",
                                rank_, world_size_, op,
                                async != ncclSuccess ? ncclGetErrorString(async) : "timed out"));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  int rank_;
  int world_size_;
  int device_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool failed_ = false;
  std::chrono::milliseconds timeout_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const LaunchEnv& launch, Communicator& bootstrap,
                                                     std::chrono::milliseconds timeout) {
  return std::make_unique<NcclCommunicator>(launch, bootstrap, timeout);
}

bool nccl_available() { return true; }

}  // namespace zinf::zero3

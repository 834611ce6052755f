// GPU suite: the zero3 engine on a GPU — NCCL collectives on device memory,
// the CUDA copier moving shards — trains the tiny model to the parameters of
// plain training, like the host suite does over Gloo. Skips, saying so,
// where no CUDA device is visible (or, for two ranks, fewer than two).
#include <cuda_runtime.h>

#include <gtest/gtest.h>

#include "pinned_pool/cuda_host.hpp"
#include "rank_processes.hpp"
#include "swap/device_copy.hpp"
#include "test_util.hpp"
#include "zero3_training.hpp"

namespace zinf::zero3 {
namespace {

DeviceAccess cuda_access() {
  DeviceAccess access;
  access.bytes_to_host = [](void* out, const void* device, std::size_t bytes) {
    if (cudaMemcpy(out, device, bytes, cudaMemcpyDeviceToHost) != cudaSuccess) {
      throw std::runtime_error("cudaMemcpy to host failed");
    }
  };
  access.to_device = [](float* device, const std::vector<float>& in) {
    if (cudaMemcpy(device, in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) {
      throw std::runtime_error("cudaMemcpy to device failed");
    }
  };
  return access;
}

void train_on_gpu(const TrainingRun& run, const LaunchEnv& launch) {
  const config::Config config = config::load_config_string(config_json(run));
  CommunicatorOptions comm_options;
  comm_options.backend = Backend::nccl;
  comm_options.timeout = std::chrono::seconds(120);
  auto comm = make_communicator(launch, comm_options);
  EngineOptions options;
  options.copier = swap::make_cuda_copier(launch.local_rank);
  if (!options.copier) throw std::runtime_error("no CUDA copier for GPU " + std::to_string(launch.local_rank));
  options.optimizer_threads = 1;
  Engine engine(config, *comm, options);
  TinyOnEngine model(engine, run.shape, cuda_access());
  engine.finalize();
  for (int step = 0; step < run.steps; ++step) {
    for (int micro = 0; micro < run.accumulation; ++micro) {
      model.micro_step(engine, run.shape, batch_index(run, step, micro, comm->rank()));
      engine.step();
    }
  }
  expect_close(model.masters(engine), train_reference(run, config), fmt::format("GPU rank {}", comm->rank()));
}

class GpuZero3 : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (zinf::cuda_device_count() == 0) {
      GTEST_SKIP() << "no CUDA device visible (no GPU or no driver): the GPU suite runs only on a GPU machine";
    }
    if (!nccl_available()) GTEST_SKIP() << "this build has no NCCL communicator";
  }
};

TEST_P(GpuZero3, OneRankMatchesPlainTraining) {
  testing::TempDir dir;
  TrainingRun run;
  run.world = 1;
  run.offload_param = GetParam();
  run.offload_optimizer = GetParam() == "none" ? "cpu" : GetParam();
  run.accumulation = 2;
  run.clipping = 0.05;
  run.nvme_dir = dir.path().string();
  LaunchEnv launch;
  train_on_gpu(run, launch);
}

TEST_P(GpuZero3, TwoRanksMatchPlainTraining) {
  if (zinf::cuda_device_count() < 2) GTEST_SKIP() << "two ranks need two GPUs; this machine has one";
  testing::TempDir dir;
  TrainingRun run;
  run.world = 2;
  run.offload_param = GetParam();
  run.offload_optimizer = GetParam() == "none" ? "cpu" : GetParam();
  run.nvme_dir = dir.path().string();
  const auto outcomes = testing::run_ranks(2, [&](const LaunchEnv& launch) { train_on_gpu(run, launch); });
  EXPECT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
}

INSTANTIATE_TEST_SUITE_P(Offload, GpuZero3, ::testing::Values("none", "cpu", "nvme"));

}  // namespace
}  // namespace zinf::zero3

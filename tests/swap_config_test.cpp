// The swap layer from a DeepSpeed JSON: every key reaches the option it
// means, and an optimizer swapper built only from the config steps NVMe
// states to the same bits as the same config in host memory.
#include <cstring>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "swap/swap_config.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

std::string nvme_config(const std::string& path) {
  return R"({"train_batch_size": 16, "bf16": {"enabled": true},
    "optimizer": {"type": "Adam", "params": {"lr": 0.02, "betas": [0.8, 0.95], "eps": 1e-6,
                  "weight_decay": 0.1, "adam_w_mode": false, "bias_correction": false}},
    "aio": {"block_size": 262144, "queue_depth": 16, "intra_op_parallelism": 2},
    "zero_optimization": {"stage": 3, "sub_group_size": 3000,
      "offload_param": {"device": "nvme", "nvme_path": [")" + path + R"(/a", ")" + path + R"(/b"],
                        "buffer_count": 3, "buffer_size": 1e6, "max_in_cpu": 5e5},
      "offload_optimizer": {"device": "nvme", "nvme_path": ")" + path + R"("}}})";
}

TEST(SwapConfig, EveryKeyReachesTheOptionItMeans) {
  const auto config = config::load_config_string(nvme_config("/nvme"));
  const auto param_store = store_options(config, SwapRole::param, 3);
  ASSERT_EQ(param_store.directories.size(), 2u);
  EXPECT_EQ(param_store.directories[0], std::filesystem::path("/nvme/a/zinf/rank3/param"));
  EXPECT_EQ(param_store.directories[1], std::filesystem::path("/nvme/b/zinf/rank3/param"));
  EXPECT_EQ(param_store.aio.block_size, 262144u);
  EXPECT_EQ(param_store.aio.queue_depth, 16u);
  EXPECT_EQ(param_store.aio.intra_op_parallelism, 2u);
  const auto optimizer_store = store_options(config, SwapRole::optimizer);
  EXPECT_EQ(optimizer_store.directories, (std::vector<std::filesystem::path>{"/nvme/zinf/rank0/optimizer"}));

  const auto params = param_swapper_options(config);
  EXPECT_EQ(params.buffer_count, 3u);
  EXPECT_EQ(params.buffer_bytes, 2000000u);
  EXPECT_EQ(params.max_in_cpu_bytes, 1000000u);

  const auto optimizer = optimizer_swapper_options(config);
  EXPECT_TRUE(optimizer.overlap);
  EXPECT_EQ(optimizer.optimizer.kind, OptimizerKind::adam);
  EXPECT_FLOAT_EQ(optimizer.optimizer.adam.lr, 0.02f);
  EXPECT_FLOAT_EQ(optimizer.optimizer.adam.beta1, 0.8f);
  EXPECT_FLOAT_EQ(optimizer.optimizer.adam.beta2, 0.95f);
  EXPECT_FLOAT_EQ(optimizer.optimizer.adam.eps, 1e-6f);
  EXPECT_FLOAT_EQ(optimizer.optimizer.adam.weight_decay, 0.1f);
  EXPECT_FALSE(optimizer.optimizer.adam.adamw_mode);
  EXPECT_FALSE(optimizer.optimizer.adam.bias_correction);

  const auto groups = sub_groups(config, 10000, "g");
  ASSERT_EQ(groups.size(), 4u);
  EXPECT_EQ(groups[3].name, "g3");
  EXPECT_EQ(groups[3].elements, 1000u);
}

TEST(SwapConfig, AStoreIsRefusedWhereTheConfigDoesNotOffloadToNvme) {
  const auto config = config::load_config_string(
      R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})");
  try {
    store_options(config, SwapRole::optimizer);
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_EQ(error.context().key_path, "zero_optimization.offload_optimizer.device");
  }
  EXPECT_THROW(store_options(config, SwapRole::param), Error);
}

TEST(SwapConfig, ASizeThatOverflowsInBytesIsAConfigErrorNamingTheKey) {
  // 1e19 elements fit in 64 bits; x 2 bytes each they do not.
  const auto config = config::load_config_string(
      R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x",
          "max_in_cpu": 10000000000000000000}}})");
  try {
    param_swapper_options(config, 2);
    FAIL() << "an overflowing max_in_cpu was accepted";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_EQ(error.context().key_path, "zero_optimization.offload_param.max_in_cpu");
  }
}

TEST(SwapConfig, AnOptimizerSwapperBuiltFromTheConfigStepsLikeHostMemory) {
  testing::TempDir dir;
  const auto config = config::load_config_string(nvme_config(dir.path().string()));
  const auto groups = sub_groups(config, 10000);
  SwapStore store(store_options(config, SwapRole::optimizer));
  PinnedPoolOptions pool_options;
  pool_options.budget_bytes = 1 << 20;
  pool_options.allow_unpinned = true;
  PinnedPool pool(pool_options);
  cpu_adam::CpuOptimizer optimizer(2);
  OptimizerSwapper on_nvme(store, pool, optimizer, groups, optimizer_swapper_options(config));
  OptimizerSwapper in_memory(optimizer, groups, optimizer_swapper_options(config));
  for (std::size_t g = 0; g < groups.size(); ++g) {
    std::vector<float> params(groups[g].elements);
    for (std::size_t i = 0; i < params.size(); ++i) params[i] = 0.001f * static_cast<float>(i % 300) - 0.1f;
    on_nvme.initialize(g, params);
    in_memory.initialize(g, params);
  }
  std::vector<std::vector<float>> grads;
  std::vector<cpu_adam::Buffer> buffers;
  for (const auto& group : groups) grads.emplace_back(group.elements, 0.01f);
  for (auto& grad : grads) buffers.push_back({grad.data(), grad.size(), cpu_adam::DType::f32});
  for (int step = 0; step < 3; ++step) {
    on_nvme.step(buffers);
    in_memory.step(buffers);
  }
  for (std::size_t g = 0; g < groups.size(); ++g) {
    std::vector<float> a(groups[g].elements), b(groups[g].elements);
    on_nvme.read_params(g, a);
    in_memory.read_params(g, b);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << groups[g].name;
  }
  EXPECT_TRUE(std::filesystem::exists(dir / "zinf" / "rank0" / "optimizer" / "zinf.manifest"));
}

}  // namespace
}  // namespace zinf::swap

// The memory planner behind `zinf-config plan`: exact bytes per tier for
// known configurations, the swappers' own buffer plans, and the machine fit
// check against free disk space.
#include <gtest/gtest.h>

#include "core/config.hpp"
#include "core/error.hpp"
#include "swap/memory_plan.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

// bf16 training unless `precision` says otherwise: 2-byte params and grads.
config::Config stage3(const std::string& zero_extra, const std::string& top_extra = "",
                      const std::string& precision = R"(, "bf16": {"enabled": true})") {
  return config::load_config_string(R"({"zero_optimization": {"stage": 3)" + zero_extra + "}" +
                                    top_extra + precision + "}");
}

PlanInput billion_over_four() {
  PlanInput input;
  input.params = 1000000000;
  input.world_size = 4;
  input.largest_param = 100000000;
  return input;
}

TEST(MemoryPlan, WithoutOffloadEachStagePartitionsOneMoreStateOnTheGpu) {
  const MemoryPlan plan = plan_memory(stage3(""), billion_over_four());
  ASSERT_EQ(plan.stages.size(), 3u);
  // 2 B params + 2 B grads + 12 B Adam states, states partitioned over 4.
  EXPECT_EQ(plan.stages[0].per_rank.gpu, 2000000000ull + 2000000000ull + 3000000000ull);
  EXPECT_EQ(plan.stages[1].per_rank.gpu, 2000000000ull + 500000000ull + 3000000000ull);
  // Stage 3 adds the gathered layers: largest + prefetch bucket (5e7), 2 B each.
  EXPECT_EQ(plan.stages[2].per_rank.gpu, 500000000ull + 300000000ull + 500000000ull + 3000000000ull);
  EXPECT_EQ(plan.chosen_stage, 3);
  EXPECT_EQ(plan.chosen.gpu, plan.stages[2].per_rank.gpu);
  EXPECT_EQ(plan.chosen.pinned + plan.chosen.pageable + plan.chosen.nvme, 0u);
  EXPECT_TRUE(plan.buffers.empty());
}

TEST(MemoryPlan, CpuOffloadMovesTheOptimizerStatesAndAGradCopyToPinnedHost) {
  const MemoryPlan plan = plan_memory(
      stage3(R"(, "offload_optimizer": {"device": "cpu"})"), billion_over_four());
  EXPECT_EQ(plan.chosen.gpu, 500000000ull + 300000000ull + 500000000ull);
  EXPECT_EQ(plan.chosen.pinned, 500000000ull + 3000000000ull);
  EXPECT_EQ(plan.chosen.pageable, 0u);
  const MemoryPlan unpinned = plan_memory(
      stage3(R"(, "offload_optimizer": {"device": "cpu", "pin_memory": false})"),
      billion_over_four());
  EXPECT_EQ(unpinned.chosen.pinned, 0u);
  EXPECT_EQ(unpinned.chosen.pageable, 3500000000ull);
}

TEST(MemoryPlan, NvmeOffloadCountsSwapperBuffersAndCopyOnWriteHeadroom) {
  const MemoryPlan plan = plan_memory(
      stage3(R"(, "sub_group_size": 1e8,
              "offload_param": {"device": "nvme", "nvme_path": "/nvme"},
              "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"})",
             R"(, "optimizer": {"type": "Lion", "params": {"lr": 1e-4}})"),
      billion_over_four());
  // GPU: gathered layers and the grad partition only.
  EXPECT_EQ(plan.chosen.gpu, 300000000ull + 500000000ull);
  // Param swapper: in flight min(5 x 2e8 B buffers, all 5e8 B) + max_in_cpu
  // cache (all 5e8 B); host grads 5e8; optimizer swapper 3 slots x 2
  // tensors (Lion) x 4e8 B padded to 4 KiB.
  const std::uint64_t slots = 3ull * 2ull * 400003072ull;
  EXPECT_EQ(plan.chosen.pinned, 500000000ull + 500000000ull + 500000000ull + slots);
  // NVMe: params 5e8 + one shard headroom 5e7 + Lion states 8 B x 2.5e8 +
  // two sub-groups of headroom 2 x 8 B x 1e8.
  EXPECT_EQ(plan.chosen.nvme, 500000000ull + 50000000ull + 2000000000ull + 1600000000ull);
  ASSERT_EQ(plan.buffers.size(), 2u);
  EXPECT_EQ(plan.buffers[1].bytes, slots);
  // Stages 1 and 2 cannot put optimizer states on NVMe (`check` refuses
  // such a config): no numbers for them.
  EXPECT_EQ(plan.stages[0].not_possible, "offload_optimizer nvme needs stage 3");
  EXPECT_EQ(plan.stages[1].not_possible, "offload_optimizer nvme needs stage 3");
  EXPECT_EQ(plan.stages[0].per_rank.nvme, 0u);
  EXPECT_EQ(plan.stages[2].not_possible, "");
  EXPECT_EQ(plan.stages[2].offloads, "optimizer nvme, params nvme");
}

TEST(MemoryPlan, OneSubGroupNeedsOneSubGroupOfHeadroom) {
  // 7B over 8 ranks with the default sub_group_size (1e9): each rank's
  // 875M params are one sub-group, so the copy-on-write room is one
  // sub-group's Adam states (12 B x 875M), not two sub_group_size's.
  PlanInput input;
  input.params = 7000000000;
  input.world_size = 8;
  const MemoryPlan plan = plan_memory(
      stage3(R"(, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"})"), input);
  EXPECT_EQ(plan.chosen.nvme, 12ull * 875000000ull + 12ull * 875000000ull);
}

TEST(MemoryPlan, Fp32TrainingCountsFourBytesPerParamAndGrad) {
  const MemoryPlan fp32 = plan_memory(stage3("", "", ""), billion_over_four());
  const MemoryPlan bf16 = plan_memory(stage3(""), billion_over_four());
  // Stage 1: params and grads whole (1e9 each), 2 B more per element in fp32.
  EXPECT_EQ(fp32.stages[0].per_rank.gpu, bf16.stages[0].per_rank.gpu + 2ull * 1000000000ull * 2);
  EXPECT_EQ(fp32.stages[0].per_rank.gpu, 4000000000ull + 4000000000ull + 3000000000ull);
}

TEST(MemoryPlan, ZeroParamsAreRefused) {
  PlanInput none;
  EXPECT_THROW(plan_memory(stage3(""), none), zinf::Error);
}

TEST(MemoryPlan, TheFitCheckComparesNvmeNeedsWithFreeSpace) {
  testing::TempDir dir;
  const std::string json = R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": ")" +
                           (dir / "not-yet-made").string() + R"(", "pin_memory": false}}})";
  const auto config = config::load_config_string(json);
  PlanInput small;
  small.params = 1000;
  FitCheck fit = check_fit(config, plan_memory(config, small));
  EXPECT_TRUE(fit.fits);
  ASSERT_FALSE(fit.lines.empty());
  PlanInput huge;
  huge.params = 1000000000000000ull;  // 12 PB of optimizer states
  huge.largest_param = 1000;
  fit = check_fit(config, plan_memory(config, huge));
  EXPECT_FALSE(fit.fits);
  bool named = false;
  for (const auto& line : fit.lines) {
    if (line.find("NVMe") != std::string::npos && line.find("does not fit") != std::string::npos) named = true;
  }
  EXPECT_TRUE(named);
}

}  // namespace
}  // namespace zinf::swap

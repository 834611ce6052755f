// The memory planner behind `zinf-config plan`: exact bytes per tier for
// known configurations, the swappers' own buffer plans, and the machine fit
// check against free disk space.
#include <malloc.h>

#include <fstream>
#include <sstream>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "core/config.hpp"
#include "core/error.hpp"
#include "rank_processes.hpp"
#include "swap/memory_plan.hpp"
#include "test_util.hpp"
#include "zero3/communicator.hpp"
#include "zero3/engine.hpp"

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

// 1e9 params over 4 ranks, largest 1e8, bf16, the DeepSpeed defaults: the
// device holds the gathered layers (kept for reuse: min(1e9, 1e9/2 + 1e8)
// = 6e8, plus the 5e7 prefetch bucket; 2 B each), the fp32 gradients in
// backward and awaiting reduction (1e8 + reduce_bucket_size 5e8; 4 B
// each) and one reduced block (4 B x 2.5e7).
constexpr std::uint64_t kDefaultDevice = 2ull * 650000000ull + 4ull * 600000000ull + 4ull * 25000000ull;
constexpr std::uint64_t kGlooScratch = 4ull * 100000000ull;

TEST(MemoryPlan, WithoutOffloadTheStatesLiveInHostMemoryAndTheShardsOnTheDevice) {
  const MemoryPlan plan = plan_memory(stage3(""), billion_over_four());
  ASSERT_EQ(plan.stages.size(), 3u);
  // zinf runs the optimizer on the CPU: per rank (2.5e8 elements) the fp32
  // gradient partition (1e9 B) and the Adam states (12 B each) are host
  // memory, pageable; the bf16 working copy is the device shards only.
  // Gloo's reduce-scatter copy of one gradient: 4 B x 1e8.
  EXPECT_EQ(plan.chosen.pageable, 1000000000ull + 3000000000ull + kGlooScratch);
  EXPECT_EQ(plan.chosen.pinned + plan.chosen.nvme, 0u);
  // While finalize() builds the masters: one sub-group (all 2.5e8) of fp32,
  // and its bf16 working copy on its way to the device shards (a step
  // passes it through host memory too).
  EXPECT_EQ(plan.transient_host, 1000000000ull + 500000000ull);
  // Device: the bf16 shard (5e8 B), the gathered layers and the fp32
  // gradients (see kDefaultDevice).
  EXPECT_EQ(plan.chosen.gpu, 500000000ull + kDefaultDevice);
  EXPECT_EQ(plan.chosen_stage, 3);
  EXPECT_EQ(plan.stages[2].per_rank.gpu, plan.chosen.gpu);
  EXPECT_EQ(plan.stages[2].offloads, "optimizer states on host, param shards on device");
  // Every byte counted is listed, by what holds it.
  std::uint64_t listed = 0;
  for (const auto& buffer : plan.buffers) listed += buffer.transient ? 0 : buffer.bytes;
  EXPECT_EQ(listed, plan.chosen.gpu + plan.chosen.pageable);
}

TEST(MemoryPlan, AFp32BillionOnOneRankNeedsTwentyFourGigabytesOfHostMemory) {
  // What `zinf-config plan` once got wrong (DeepSpeed's model: 0 B host):
  // fp32 gradients and Adam's master and moments, and while finalize()
  // builds them one sub-group of masters and its working copy on the way
  // to the device shards.
  PlanInput input;
  input.params = 1000000000;
  const MemoryPlan plan = plan_memory(stage3("", "", ""), input);
  EXPECT_EQ(plan.chosen.pageable, 4000000000ull + 12000000000ull + kGlooScratch);
  EXPECT_EQ(plan.transient_host, 4000000000ull + 4000000000ull);
}

TEST(MemoryPlan, BelowStageThreeTheParamsAreWholeOnTheDevice) {
  const MemoryPlan plan = plan_memory(stage3(""), billion_over_four());
  const MemoryPlan stage3_plan = plan;
  // Stages 1 and 2 (zinf reduce-scatters at both): 2 B x 1e9 whole params
  // instead of the shard and the gathered layers; the host part is stage 3's.
  const std::uint64_t grads = 4ull * 600000000ull + 4ull * 25000000ull;
  for (int s : {0, 1}) {
    EXPECT_EQ(plan.stages[s].per_rank.gpu, 2000000000ull + grads);
    EXPECT_EQ(plan.stages[s].per_rank.pageable, stage3_plan.chosen.pageable);
    EXPECT_EQ(plan.stages[s].offloads, "optimizer states on host, params whole on device");
  }
  // The optimizer on NVMe below stage 3: the same NVMe and pinned bytes as
  // at stage 3 (the partition is the same), the params whole on the device.
  const MemoryPlan nvme = plan_memory(
      stage3(R"(, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"})"), billion_over_four());
  for (int s : {0, 1}) {
    EXPECT_EQ(nvme.stages[s].per_rank.nvme, nvme.stages[2].per_rank.nvme);
    EXPECT_GT(nvme.stages[s].per_rank.nvme, 0u);
    EXPECT_EQ(nvme.stages[s].per_rank.pinned, nvme.stages[2].per_rank.pinned);
    EXPECT_EQ(nvme.stages[s].per_rank.gpu, 2000000000ull + grads);
    EXPECT_EQ(nvme.stages[s].offloads, "optimizer states and gradients on NVMe, params whole on device");
  }
  // offload_param means nothing below stage 3 (DeepSpeed ignores it there):
  // those rows are the plain config's.
  const MemoryPlan params = plan_memory(
      stage3(R"(, "offload_param": {"device": "cpu"})"), billion_over_four());
  for (int s : {0, 1}) {
    EXPECT_EQ(params.stages[s].per_rank.gpu, plan.stages[s].per_rank.gpu);
    EXPECT_EQ(params.stages[s].per_rank.pageable, plan.stages[s].per_rank.pageable);
  }
  EXPECT_LT(params.stages[2].per_rank.gpu, plan.stages[2].per_rank.gpu);
  // A stage 0 config is planned as stage 1, which is what the engine runs.
  const auto zero = config::load_config_string(R"({"bf16": {"enabled": true}, "zero_optimization": {"stage": 0}})");
  const MemoryPlan stage0 = plan_memory(zero, billion_over_four());
  EXPECT_EQ(stage0.chosen_stage, 0);
  EXPECT_EQ(stage0.chosen.gpu, plan.stages[0].per_rank.gpu);
}

TEST(MemoryPlan, OptimizerNoneAndCpuAreTheSameAndParamsOnCpuLeaveTheDevice) {
  const MemoryPlan none = plan_memory(stage3(""), billion_over_four());
  const MemoryPlan cpu = plan_memory(stage3(R"(, "offload_optimizer": {"device": "cpu"})"), billion_over_four());
  EXPECT_EQ(cpu.chosen.pageable, none.chosen.pageable);
  EXPECT_EQ(cpu.chosen.gpu, none.chosen.gpu);
  EXPECT_EQ(cpu.chosen.pinned, 0u);  // the in-memory states are not page-locked
  const MemoryPlan params = plan_memory(
      stage3(R"(, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"})"),
      billion_over_four());
  // The working copy moves from the device shards to a host partition,
  // which gathers read.
  EXPECT_EQ(params.chosen.gpu, none.chosen.gpu - 500000000ull);
  EXPECT_EQ(params.chosen.pageable, none.chosen.pageable + 500000000ull);
}

TEST(MemoryPlan, WhereDeviceMemoryIsHostMemoryTheWorkingCopyIsAHostPartition) {
  // zinf.initialize's engine (the host stand-in): offload_param none keeps
  // the working copy as a host partition, gathered from, with no shards.
  PlanInput input = billion_over_four();
  input.device_is_host = true;
  const MemoryPlan on_host = plan_memory(stage3(""), input);
  const MemoryPlan on_gpu = plan_memory(stage3(""), billion_over_four());
  EXPECT_EQ(on_host.chosen.pageable, on_gpu.chosen.pageable + 500000000ull);
  EXPECT_EQ(on_host.chosen.gpu, on_gpu.chosen.gpu - 500000000ull);
  EXPECT_EQ(on_host.transient_host, on_gpu.transient_host - 500000000ull);  // no sub-group on its way over
  // There none costs what cpu costs.
  const MemoryPlan cpu = plan_memory(stage3(R"(, "offload_param": {"device": "cpu"})"), input);
  EXPECT_EQ(cpu.chosen.pageable, on_host.chosen.pageable);
  EXPECT_EQ(cpu.chosen.gpu, on_host.chosen.gpu);
  // Below stage 3 too: the partition is host memory, the whole params the device's.
  EXPECT_EQ(on_host.stages[1].per_rank.pageable, on_host.chosen.pageable);
  EXPECT_EQ(on_gpu.stages[1].per_rank.pageable, on_gpu.chosen.pageable);
}

TEST(MemoryPlan, NvmeOffloadCountsSwapperBuffersAndCopyOnWriteHeadroom) {
  const auto plan_for = [](const std::string& gradients) {
    return plan_memory(
        stage3(R"(, "sub_group_size": 1e8,
                "offload_param": {"device": "nvme", "nvme_path": "/nvme"},
                "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme")" + gradients + "}",
               R"(, "optimizer": {"type": "Lion", "params": {"lr": 1e-4}})"),
        billion_over_four());
  };
  const MemoryPlan plan = plan_for("");
  // Device: gathered layers and gradients only.
  EXPECT_EQ(plan.chosen.gpu, kDefaultDevice);
  // Host, pageable: Gloo's copy only (the fp32 grads and the bf16 working
  // copy are on NVMe); one sub-group of masters at finalize (4 B x 1e8)
  // and of its working copy on the way to the store (2 B x 1e8).
  EXPECT_EQ(plan.chosen.pageable, kGlooScratch);
  EXPECT_EQ(plan.transient_host, 400000000ull + 200000000ull);
  // The pinned pool: the param swapper in flight min(5 x 2e8 B buffers, all
  // 5e8 B) + max_in_cpu cache (all 5e8 B), the optimizer swapper's 3
  // slots x 2 tensors (Lion) x 4e8 B padded to 4 KiB, and the gradient
  // swapper's 2 buffers of one sub-group (fp32, 4e8 B padded).
  const std::uint64_t slots = 3ull * 2ull * 400003072ull;
  const std::uint64_t gradient_buffers = 2ull * 400003072ull;
  EXPECT_EQ(plan.chosen.pinned, 500000000ull + 500000000ull + slots + gradient_buffers);
  // NVMe: params 5e8 + one shard headroom 5e7 + Lion states 8 B x 2.5e8 +
  // two sub-groups of headroom 2 x 8 B x 1e8 + fp32 grads 4 B x 2.5e8 and
  // their two sub-groups of headroom 2 x 4 B x 1e8.
  EXPECT_EQ(plan.chosen.nvme,
            500000000ull + 50000000ull + 2000000000ull + 1600000000ull + 1000000000ull + 800000000ull);
  bool slots_listed = false;
  for (const auto& buffer : plan.buffers) {
    if (buffer.what.rfind("optimizer swapper", 0) == 0) {
      slots_listed = true;
      EXPECT_EQ(buffer.bytes, slots);
      EXPECT_EQ(buffer.tier, Tier::pinned);
    }
  }
  EXPECT_TRUE(slots_listed);
  EXPECT_EQ(plan.stages[2].offloads, "optimizer states and gradients on NVMe, param shards on NVMe");

  // "gradients": "cpu" keeps the fp32 grads in host memory (1e9 B) and
  // takes them off NVMe and out of the pool.
  const MemoryPlan in_memory = plan_for(R"(, "gradients": "cpu")");
  EXPECT_EQ(in_memory.chosen.pageable, 1000000000ull + kGlooScratch);
  EXPECT_EQ(in_memory.chosen.pinned, plan.chosen.pinned - gradient_buffers);
  EXPECT_EQ(in_memory.chosen.nvme, plan.chosen.nvme - 1800000000ull);
  EXPECT_EQ(in_memory.stages[2].offloads, "optimizer states on NVMe, param shards on NVMe");
}

// state_format: the moments in bf16 (2 B each) or int8 codes (1 B + a 4 B
// scale per 256) on NVMe and in the slots; the fp32 master stays 4 B.
TEST(MemoryPlan, CompressedStateFormatsShrinkTheStatesOnNvmeAndTheSlots) {
  const auto plan_for = [](const std::string& format) {
    return plan_memory(stage3(R"(, "sub_group_size": 1e8, "offload_optimizer": {"device": "nvme",
                                 "nvme_path": "/nvme", "gradients": "cpu", "state_format": ")" + format + R"("})"),
                       billion_over_four());
  };
  const MemoryPlan fp32 = plan_for("fp32"), bf16 = plan_for("bf16"), int8 = plan_for("int8");
  // 2.5e8 params per rank plus two sub-groups (1e8) of headroom.
  const std::uint64_t elements = 250000000ull + 2ull * 100000000ull;
  EXPECT_EQ(fp32.chosen.nvme, 12ull * elements);
  EXPECT_EQ(bf16.chosen.nvme, 8ull * elements);
  const auto int8_bytes = [](std::uint64_t n) { return 4 * n + 2 * (((n + 3) & ~3ull) + (n + 255) / 256 * 4); };
  EXPECT_EQ(int8.chosen.nvme, int8_bytes(250000000ull) + 2 * int8_bytes(100000000ull));
  // Three slots of param + two moments for a 1e8 sub-group, each padded.
  const auto padded = [](std::uint64_t bytes) { return (bytes + 4095) / 4096 * 4096; };
  EXPECT_EQ(bf16.chosen.pinned, 3 * (padded(400000000ull) + 2 * padded(200000000ull)));
  bool listed = false;
  for (const auto& buffer : int8.buffers) {
    if (buffer.tier == Tier::nvme && buffer.what.find("fp32 param + int8 moments") != std::string::npos) listed = true;
  }
  EXPECT_TRUE(listed) << "the plan does not name the format";
}

// sub_group_size 0 (DeepSpeed: a param per sub-group) plans sub-groups of
// the largest param's shard, as the engine runs them: the same plan as an
// explicit sub_group_size of largest / world.
TEST(MemoryPlan, SubGroupSizeZeroIsPlannedAsTheLargestParamsShard) {
  const std::string nvme = R"(, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"})";
  const MemoryPlan zero = plan_memory(stage3(R"(, "sub_group_size": 0)" + nvme), billion_over_four());
  const MemoryPlan shard = plan_memory(stage3(R"(, "sub_group_size": 25000000)" + nvme), billion_over_four());
  EXPECT_EQ(zero.chosen.pinned, shard.chosen.pinned);
  EXPECT_EQ(zero.chosen.nvme, shard.chosen.nvme);
  EXPECT_GT(zero.chosen.pinned, 0u);
}

TEST(MemoryPlan, PinMemoryFalseLeavesThePoolPageable) {
  const MemoryPlan plan = plan_memory(
      stage3(R"(, "offload_param": {"device": "nvme", "nvme_path": "/nvme", "pin_memory": false},
              "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme", "pin_memory": false})"),
      billion_over_four());
  EXPECT_EQ(plan.chosen.pinned, 0u);
  // One block asking for pinning locks the whole pool (as the engine does).
  const MemoryPlan half = plan_memory(
      stage3(R"(, "offload_param": {"device": "nvme", "nvme_path": "/nvme", "pin_memory": false},
              "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"})"),
      billion_over_four());
  EXPECT_EQ(half.chosen.pinned + half.chosen.pageable, plan.chosen.pinned + plan.chosen.pageable);
  EXPECT_EQ(half.chosen.pageable, kGlooScratch);  // the grads' buffers are in the (locked) pool
}

TEST(MemoryPlan, OneSubGroupNeedsOneSubGroupOfHeadroom) {
  // 7B over 8 ranks with the default sub_group_size (1e9): each rank's
  // 875M params are one sub-group, so the copy-on-write room is one
  // sub-group's Adam states (12 B x 875M) and grads (4 B x 875M), not two
  // sub_group_size's.
  PlanInput input;
  input.params = 7000000000;
  input.world_size = 8;
  const MemoryPlan plan = plan_memory(
      stage3(R"(, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"})"), input);
  EXPECT_EQ(plan.chosen.nvme, 16ull * 875000000ull + 16ull * 875000000ull);
}

TEST(MemoryPlan, SubGroupsUnderMinSwapBytesAreCountedInHostMemory) {
  // 1e6 params on one rank in sub-groups of 100 (400 B of fp32 each, under
  // DeepSpeed's 1 MiB): Adam's states (12 B) and the grads (4 B) stay in
  // host memory, none on NVMe or in the pool's slots. min_swap_bytes 0
  // swaps them all again; with sub-groups of 300000 (1.2 MB) only the last,
  // 100000 elements (400 KB), stays.
  PlanInput input;
  input.params = 1000000;
  input.world_size = 1;
  const auto plan_for = [&](const std::string& sub_group_size, const std::string& min_swap) {
    return plan_memory(stage3(R"(, "sub_group_size": )" + sub_group_size +
                              R"(, "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme")" + min_swap + "}"),
                       input);
  };
  const std::uint64_t kGloo = 4ull * 1000000;  // Gloo's fp32 copy of the largest param (all of it here)
  const MemoryPlan resident = plan_for("100", "");
  EXPECT_EQ(resident.chosen.nvme, 0u);
  EXPECT_EQ(resident.chosen.pinned, 0u);
  EXPECT_EQ(resident.chosen.pageable, 16ull * 1000000 + kGloo);
  const MemoryPlan swapped = plan_for("100", R"(, "min_swap_bytes": 0)");
  EXPECT_EQ(swapped.chosen.nvme, 16ull * 1000000 + 2 * 16ull * 100);
  EXPECT_EQ(swapped.chosen.pageable, kGloo);
  const MemoryPlan last_only = plan_for("300000", "");
  EXPECT_EQ(last_only.chosen.nvme, 16ull * 900000 + 2 * 16ull * 300000);
  EXPECT_EQ(last_only.chosen.pageable, 16ull * 100000 + kGloo);
}

TEST(MemoryPlan, Fp32TrainingCountsFourBytesPerWorkingElement) {
  const MemoryPlan fp32 = plan_memory(stage3("", "", ""), billion_over_four());
  const MemoryPlan bf16 = plan_memory(stage3(""), billion_over_four());
  // 2 B more per element on the device: the shard (2.5e8, the working
  // copy) and the gathered layers (6.5e8); the host holds no working copy.
  EXPECT_EQ(fp32.chosen.pageable, bf16.chosen.pageable);
  EXPECT_EQ(fp32.chosen.gpu, bf16.chosen.gpu + 2ull * 250000000ull + 2ull * 650000000ull);
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


// ---- the plan against a real engine run ------------------------------------

std::uint64_t status_kib(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoull(line.substr(field.size() + 1));
  }
  throw std::runtime_error("no " + field + " in /proc/self/status");
}

// Trains a model of 8 layers of 2048 x 2048 (33.5M params) for two
// optimizer steps on this rank, measuring the peak RSS the engine added,
// and throws unless it is the plan's host + device bytes (the host stand-in
// keeps device memory in RAM) within 10% + 24 MiB, and the pinned pool is
// the plan's (to the page).
void compare_with_plan(const std::string& json, const zero3::LaunchEnv& launch) {
  constexpr int kLayers = 8;
  constexpr std::int64_t kWidth = 2048;
  const config::Config config = config::load_config_string(json);
  // Every large block from mmap, returned at free: RSS then follows what is
  // allocated, not what malloc's arenas keep of what was freed.
  ::mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  zero3::CommunicatorOptions comm_options;
  comm_options.timeout = std::chrono::seconds(60);
  auto comm = zero3::make_communicator(launch, comm_options);
  std::ofstream("/proc/self/clear_refs") << "5";  // the peak RSS starts again from here
  const std::uint64_t before = status_kib("VmRSS") * 1024;
  std::uint64_t pool_bytes = 0;
  {
    zero3::EngineOptions options;
    options.optimizer_threads = 1;
    zero3::Engine engine(config, *comm, options);
    std::vector<zero3::ParamIndex> params;
    for (int l = 0; l < kLayers; ++l) {
      const auto module = engine.add_module(fmt::format("layer{}", l));
      params.push_back(engine.add_param(module, "weight", {kWidth, kWidth},
                                        [l](std::uint64_t offset, std::span<float> out) {
                                          for (std::size_t i = 0; i < out.size(); ++i) {
                                            out[i] = 1e-3f * static_cast<float>((offset + i + l) % 97);
                                          }
                                        }));
    }
    engine.finalize();
    for (int step = 0; step < 2; ++step) {
      for (int l = 0; l < kLayers; ++l) {
        engine.pre_forward(static_cast<zero3::ModuleIndex>(l));
        engine.post_forward(static_cast<zero3::ModuleIndex>(l));
      }
      for (int l = kLayers - 1; l >= 0; --l) {
        engine.pre_backward(static_cast<zero3::ModuleIndex>(l));
        float* grad = engine.grad(params[l]);
        std::fill(grad, grad + kWidth * kWidth, 1e-3f * static_cast<float>(l + 1));
        engine.post_backward(static_cast<zero3::ModuleIndex>(l));
      }
      if (!engine.step()) throw std::runtime_error("the optimizer did not step");
    }
    pool_bytes = engine.pool_bytes();
  }
  const std::uint64_t peak = status_kib("VmHWM") * 1024 - before;

  PlanInput input;
  input.params = kLayers * kWidth * kWidth;
  input.world_size = static_cast<std::uint32_t>(launch.world_size);
  input.largest_param = kWidth * kWidth;
  input.device_is_host = true;  // the host stand-in: offload_param none's working copy is a host partition
  const MemoryPlan plan = plan_memory(config, input);
  const TierBytes& t = plan.chosen;
  // Host and device share RAM here: the host peak (at finalize) and the
  // training peak (device buffers on top of the host's) are both in VmHWM.
  const std::uint64_t host = t.pinned + t.pageable;
  const std::uint64_t planned = host + std::max(plan.transient_host, t.gpu);
  const double slack = 0.10 * static_cast<double>(planned) + 24.0 * 1024 * 1024;
  const double off = static_cast<double>(peak) - static_cast<double>(planned);
  std::uint64_t planned_pool = 0;
  for (const auto& buffer : plan.buffers) {
    if (buffer.what.find("swapper") != std::string::npos) planned_pool += buffer.bytes;
  }
  // The pool rounds its budget up to whole pages.
  const bool pool_ok = pool_bytes >= planned_pool && pool_bytes - planned_pool < (2u << 20);
  if (std::fabs(off) > slack || !pool_ok) {
    throw std::runtime_error(fmt::format(
        "rank {}: peak RSS {} B, planned {} B (host {}, device {}, transient {}); pool {} B, planned {} B",
        launch.rank, peak, planned, host, t.gpu, plan.transient_host, pool_bytes, planned_pool));
  }
}

class MemoryPlanAgainstARun : public ::testing::TestWithParam<const char*> {};

TEST_P(MemoryPlanAgainstARun, PeakRssAndPinnedPoolMatchThePlan) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer's shadow memory and quarantine are part of RSS: the plan is compared "
                  "with real runs in the release build";
#endif
  testing::TempDir dir;
  std::string json = GetParam();
  for (std::size_t at; (at = json.find("$DIR")) != std::string::npos;) json.replace(at, 4, dir.path().string());
  const auto outcomes = testing::run_ranks(2, [&](const zero3::LaunchEnv& launch) { compare_with_plan(json, launch); },
                                           std::chrono::seconds(240));
  EXPECT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
}

// Prefetch of one layer ahead keeps the device part small and exact.
INSTANTIATE_TEST_SUITE_P(
    Configs, MemoryPlanAgainstARun,
    ::testing::Values(
        R"({"bf16": {"enabled": true}, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 4194304, "reduce_bucket_size": 4194304}})",
        R"({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 4194304, "reduce_bucket_size": 4194304,
            "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}})",
        R"({"bf16": {"enabled": true}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 4194304,
            "offload_optimizer": {"device": "cpu"}}})",
        R"({"bf16": {"enabled": true}, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 4194304, "reduce_bucket_size": 4194304,
            "sub_group_size": 4e6,
            "offload_optimizer": {"device": "nvme", "nvme_path": "$DIR"},
            "offload_param": {"device": "nvme", "nvme_path": "$DIR", "max_in_cpu": 4e6}}})",
        // fp32 with params on NVMe: the working copy is in the param store
        // only (a host image of it, 67 MB here, is past the slack).
        R"({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 4194304, "reduce_bucket_size": 4194304,
            "sub_group_size": 1e6,
            "offload_optimizer": {"device": "nvme", "nvme_path": "$DIR"},
            "offload_param": {"device": "nvme", "nvme_path": "$DIR", "max_in_cpu": 1e6}}})"));

}  // namespace
}  // namespace zinf::swap

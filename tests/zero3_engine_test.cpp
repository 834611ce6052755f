// The zero3 engine against plain training: a small model trained K steps
// by real processes (world sizes 1, 2 and 4, Gloo) with ZeRO-3 and every
// offload combination ends with the parameters of the same model trained in
// one process without ZeRO, on the same samples, within fp32 tolerance.
#include <cmath>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <thread>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/config.hpp"
#include "core/error.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "rank_processes.hpp"
#include "swap/swap_config.hpp"
#include "test_util.hpp"
#include "tiny_model.hpp"
#include "zero3_training.hpp"
#include "zero3/checkpoint.hpp"
#include "zero3/engine.hpp"
#include "zero3/safetensors.hpp"

namespace zinf::zero3 {
namespace {

using testing::RankOutcome;

// Trains steps [from, to) on this rank, after loading `load` if given, and
// saves to `save` at the end if given; `after_step(step, engine)` runs after
// each optimizer step. Returns the masters.
std::vector<std::vector<float>> train_span(const TrainingRun& run, const LaunchEnv& launch, int from, int to,
                                           const std::string& load, const std::string& save,
                                           const std::function<void(int, Engine&)>& after_step = {}) {
  const config::Config config = config::load_config_string(config_json(run));
  CommunicatorOptions comm_options;
  comm_options.timeout = std::chrono::seconds(60);
  auto comm = make_communicator(launch, comm_options);
  EngineOptions options;
  options.optimizer_threads = 1;
  DeviceAccess access;
  std::shared_ptr<swap::StrictDevice> strict;
  if (run.device != "host") {
    strict = swap::make_strict_device();
    options.copier = strict;
    access = copier_access(strict);
    if (run.device == "strict") comm = make_strict_device_communicator(std::move(comm), strict);
  }
  Engine engine(config, *comm, options);
  TinyOnEngine model(engine, run.shape, access);
  engine.finalize();
  if (!load.empty()) engine.load_checkpoint(load);
  if (engine.optimizer_step() != from) throw std::runtime_error("resumed at the wrong step");
  for (int step = from; step < to; ++step) {
    for (int micro = 0; micro < run.accumulation; ++micro) {
      model.micro_step(engine, run.shape, batch_index(run, step, micro, comm->rank()));
      const bool stepped = engine.step();
      if (stepped != (micro == run.accumulation - 1)) throw std::runtime_error("step() at the wrong micro-step");
    }
    if (after_step) after_step(step, engine);
  }
  if (!save.empty()) engine.save_checkpoint(save);
  return model.masters(engine);
}

void train_and_compare(const TrainingRun& run, const LaunchEnv& launch) {
  std::vector<double> norms;
  const auto reference = train_reference(run, config::load_config_string(config_json(run)), &norms);
  const auto masters = train_span(run, launch, 0, run.steps, "", "", [&](int step, Engine& engine) {
    // The gradient norm (before clipping) is the mean gradient's: Adam
    // alone would not notice a wrongly scaled average.
    const double norm = engine.stats().last_grad_norm;
    if (!(std::fabs(norm - norms[step]) <= 1e-5 * norms[step])) {
      throw std::runtime_error(fmt::format("step {}: gradient norm {} vs reference {}", step, norm, norms[step]));
    }
  });
  expect_close(masters, reference, fmt::format("rank {}", launch.rank));
}

void run_world(const TrainingRun& run) {
  const auto outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) { train_and_compare(run, launch); });
  EXPECT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
}

class EngineEquality : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (GetParam() > 1 && !gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  }
};

TEST_P(EngineEquality, NoOffloadMatchesPlainTraining) {
  TrainingRun run;
  run.world = GetParam();
  run_world(run);
}

TEST_P(EngineEquality, NvmeParamsAndOptimizerMatchPlainTraining) {
  testing::TempDir dir;
  TrainingRun run;
  run.world = GetParam();
  run.offload_param = "nvme";
  run.offload_optimizer = "nvme";
  run.nvme_dir = dir.path().string();
  run_world(run);
}

// Params and optimizer on NVMe in `dir`, `accumulation` micro-steps a
// step, clipping below the gradient norm (so it acts).
TrainingRun all_on_nvme(int world, const testing::TempDir& dir, int accumulation) {
  TrainingRun run;
  run.world = world;
  run.offload_param = "nvme";
  run.offload_optimizer = "nvme";
  run.accumulation = accumulation;
  run.clipping = 0.05;
  run.nvme_dir = dir.path().string();
  return run;
}

// The default min_swap_bytes (DeepSpeed's rule): this model's sub-groups
// (500 elements) are each under 1 MiB, so their optimizer states and
// gradients stay in host memory with offload_optimizer nvme, accumulation
// and clipping included; training is unchanged and the optimizer moves no
// NVMe bytes (the params, on NVMe, still do).
TEST_P(EngineEquality, SubGroupsUnderMinSwapBytesStayInHostMemoryAndTrainTheSame) {
  testing::TempDir dir;
  TrainingRun run = all_on_nvme(GetParam(), dir, 2);
  run.min_swap_bytes.reset();
  run_world(run);
  run.offload_param = "cpu";
  const auto outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) {
    train_span(run, launch, 0, 2, "", "", [](int, Engine& engine) {
      if (engine.stats().nvme_written_bytes + engine.stats().nvme_read_bytes != 0) {
        throw std::runtime_error(fmt::format("the optimizer moved {} NVMe bytes",
                                             engine.stats().nvme_written_bytes + engine.stats().nvme_read_bytes));
      }
    });
  });
  EXPECT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
}

TEST_P(EngineEquality, CpuOffloadWithAccumulationAndClippingMatchesPlainTraining) {
  TrainingRun run;
  run.world = GetParam();
  run.offload_param = "cpu";
  run.offload_optimizer = "cpu";
  run.accumulation = 2;
  run.clipping = 0.05;  // below the gradient norm, so clipping acts
  run_world(run);
}

TEST_P(EngineEquality, NvmeWithAccumulationClippingAndNothingPersistentMatches) {
  testing::TempDir dir;
  TrainingRun run = all_on_nvme(GetParam(), dir, 3);
  run.persistence = 0;
  run_world(run);
}

// Stages 0, 1 and 2: every param whole on every rank, optimizer states and
// gradients partitioned; the same training as stage 3's.
TEST_P(EngineEquality, StagesZeroOneAndTwoMatchPlainTraining) {
  for (int stage : {0, 1, 2}) {
    SCOPED_TRACE(fmt::format("stage {}", stage));
    TrainingRun run;
    run.world = GetParam();
    run.stage = stage;
    // The optimizer offloads at every stage (stage 0 runs as stage 1).
    run.offload_optimizer = stage == 1 ? "nvme" : stage == 2 ? "cpu" : "none";
    const testing::TempDir dir;
    run.nvme_dir = dir.path().string();
    run.accumulation = 2;
    run.clipping = 0.05;
    run_world(run);
  }
}

// offload_optimizer.gradients: with the optimizer on NVMe the fp32
// gradient partition accumulates on NVMe (the default) and the training is
// the same, bit for bit, as with it in host memory ("cpu"): the same sums,
// the same norm, the same clipping, over micro-steps, sub-groups that cut
// shards, and ranks.
TEST(EngineGradients, OnNvmeTheyTrainBitForBitAsInHostMemory) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  testing::TempDir dir;
  // Each launch's ranks leave their masters, gradient norms and NVMe bytes
  // written in a file per rank, compared here.
  const auto result_file = [&](const std::string& gradients, int rank) {
    return dir.path() / fmt::format("{}.rank{}.bin", gradients, rank);
  };
  const auto launch_with = [&](const std::string& gradients) {
    const auto outcomes = testing::run_ranks(2, [&](const LaunchEnv& launch) {
      TrainingRun run;
      run.world = 2;
      run.steps = 3;
      run.accumulation = 3;
      run.clipping = 0.05;
      run.persistence = 0;
      run.offload_param = "nvme";
      run.offload_optimizer = "nvme";
      run.gradients = gradients;
      run.sub_group_size = 100;  // ten sub-groups per rank: more than the swapper's two buffers hold
      run.nvme_dir = (dir.path() / gradients).string();
      std::vector<double> norms;
      std::uint64_t written = 0;
      const auto masters = train_span(run, launch, 0, run.steps, "", "", [&](int, Engine& engine) {
        norms.push_back(engine.stats().last_grad_norm);
        written = engine.stats().nvme_written_bytes;
      });
      std::ofstream out(result_file(gradients, launch.rank), std::ios::binary);
      out.write(reinterpret_cast<const char*>(&written), sizeof(written));
      out.write(reinterpret_cast<const char*>(norms.data()), static_cast<std::streamsize>(norms.size() * sizeof(double)));
      for (const auto& tensor : masters) {
        out.write(reinterpret_cast<const char*>(tensor.data()),
                  static_cast<std::streamsize>(tensor.size() * sizeof(float)));
      }
    });
    EXPECT_TRUE(testing::all_succeeded(outcomes)) << gradients << ": " << testing::describe(outcomes);
  };
  launch_with("nvme");
  launch_with("cpu");
  const auto contents = [](const std::filesystem::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  // The tiny model's trainable partition per rank: every param's shard.
  const TinyModelShape shape;
  const std::uint64_t n = shape.width;
  const std::uint64_t partition = shape.layers * ((n * n + 1) / 2 + (n + 1) / 2) + (n + 1) / 2;
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE(fmt::format("rank {}", rank));
    const std::string on_nvme = contents(result_file("nvme", rank));
    const std::string in_memory = contents(result_file("cpu", rank));
    ASSERT_GT(on_nvme.size(), sizeof(std::uint64_t));
    // The same norms and masters, bit for bit.
    EXPECT_TRUE(on_nvme.substr(sizeof(std::uint64_t)) == in_memory.substr(sizeof(std::uint64_t)));
    std::uint64_t written_nvme = 0, written_memory = 0;
    std::memcpy(&written_nvme, on_nvme.data(), sizeof(written_nvme));
    std::memcpy(&written_memory, in_memory.data(), sizeof(written_memory));
    // Every micro-step (3 steps x 3) wrote the fp32 gradient partition but
    // the two sub-groups (100 elements) its buffers kept.
    EXPECT_GE(written_nvme, written_memory + 4 * (partition - 200) * 9);
    const auto store = [&](const std::string& gradients) {
      return dir.path() / gradients / "zinf" / fmt::format("rank{}", rank) / "gradients";
    };
    EXPECT_TRUE(std::filesystem::exists(store("nvme") / "zinf.volume"));
    EXPECT_FALSE(std::filesystem::exists(store("cpu")));  // "cpu": no gradient store
  }
}

TEST(EngineStages, BelowStageThreeEveryParamIsGatheredForGoodAndHasNoDeviceShard) {
  const auto config = config::load_config_string(R"({"zero_optimization": {"stage": 2}})");
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  const ParamIndex big = engine.add_param(module, "w", {1000, 1000}, std::vector<float>(1000000, 0.5f));
  engine.finalize();
  EXPECT_TRUE(engine.describe(big).persistent);  // above the 1e5 threshold, persistent all the same
  EXPECT_EQ(engine.param_f32(big)[999999], 0.5f);  // readable with no hook
  EXPECT_EQ(engine.stats().gathers, 0u);
  // And stage 2 with params offloaded is refused, naming the key.
  const auto offloaded = config::load_config_string(
      R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})");
  config::Config wrong = offloaded;
  wrong.zero.stage = 2;
  try {
    Engine refused(wrong, *comm);
    FAIL() << "stage 2 with offload_param accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("zero_optimization.offload_param.device"), std::string::npos)
        << error.what();
  }
}

// stage3_model_persistence_threshold caps the elements that persist in all:
// in registration order, a param that would pass the cap stays partitioned,
// a later smaller one may still persist (DeepSpeed's rule).
TEST(EngineStages, TheModelPersistenceThresholdCapsWhatPersistsInAll) {
  const auto config = config::load_config_string(R"({"zero_optimization": {"stage": 3,
      "stage3_param_persistence_threshold": 100, "stage3_model_persistence_threshold": 80}})");
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  std::vector<ParamIndex> params;
  for (const std::int64_t n : {10, 50, 30, 20, 200}) {
    params.push_back(engine.add_param(module, fmt::format("p{}", n), {n}, std::vector<float>(n, 1.0f)));
  }
  engine.finalize();
  std::vector<bool> persistent;
  for (const ParamIndex p : params) persistent.push_back(engine.describe(p).persistent);
  EXPECT_EQ(persistent, (std::vector<bool>{true, true, false, true, false}));
}

TEST(EngineStages, TheLearningRateCanBeSetBetweenSteps) {
  const auto config = config::load_config_string(
      R"({"optimizer": {"type": "Adam", "params": {"lr": 0.5}}, "zero_optimization": {"stage": 1}})");
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  const ParamIndex p = engine.add_param(module, "w", {4}, std::vector<float>(4, 1.0f));
  EXPECT_THROW(engine.set_learning_rate(0.1), Error);  // before finalize
  engine.finalize();
  EXPECT_FLOAT_EQ(engine.learning_rate(), 0.5);
  const auto step_with_lr = [&](double lr) {
    engine.set_learning_rate(lr);
    engine.pre_backward(module);
    std::fill(engine.grad(p), engine.grad(p) + 4, 1.0f);
    engine.post_backward(module);
    EXPECT_TRUE(engine.step());
    return engine.gather_master(p)[0];
  };
  // Adam's first step moves each param by lr (m / sqrt(v) = 1).
  EXPECT_NEAR(step_with_lr(0.25), 0.75f, 1e-5);
  EXPECT_NEAR(step_with_lr(0.0), 0.75f, 1e-6);
  EXPECT_THROW(engine.set_learning_rate(-1.0), Error);
}

TEST(EngineStages, EachParamGroupStepsWithItsOwnSettingsAndTheyCanChangeBetweenSteps) {
  // Three params in three groups over two sub-groups of a rank's partition:
  // Adam's first step moves each param by its group's lr (m / sqrt(v) = 1),
  // its decay by lr * wd; a group's lr set between steps applies next.
  const auto config = config::load_config_string(
      R"({"optimizer": {"type": "AdamW", "params": {"lr": 0.5, "weight_decay": 0.1}},
          "zero_optimization": {"stage": 1, "sub_group_size": 6}})");
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  const ParamIndex a = engine.add_param(module, "a", {4}, std::vector<float>(4, 1.0f));
  const ParamIndex b = engine.add_param(module, "b", {4}, std::vector<float>(4, 1.0f));
  const ParamIndex c = engine.add_param(module, "c", {4}, std::vector<float>(4, 1.0f));
  swap::ParamGroupSettings slow;
  slow.lr = 0.25f;
  slow.weight_decay = 0.0f;
  swap::ParamGroupSettings frozen;
  frozen.lr = 0.0f;
  const std::size_t slow_group = engine.add_param_group(slow);
  const std::size_t frozen_group = engine.add_param_group(frozen);
  engine.set_param_group(b, slow_group);
  engine.set_param_group(c, frozen_group);
  EXPECT_THROW(engine.set_param_group(a, 3), Error);  // never added
  swap::ParamGroupSettings bad;
  bad.beta1 = 1.5f;
  EXPECT_THROW(engine.add_param_group(bad), Error);
  engine.finalize();
  EXPECT_THROW(engine.set_param_group(a, 0), Error);  // after finalize
  const auto step = [&] {
    engine.pre_backward(module);
    for (ParamIndex p : {a, b, c}) std::fill(engine.grad(p), engine.grad(p) + 4, 1.0f);
    engine.post_backward(module);
    EXPECT_TRUE(engine.step());
  };
  step();
  EXPECT_NEAR(engine.gather_master(a)[3], 1.0f * (1.0f - 0.5f * 0.1f) - 0.5f, 1e-5);
  EXPECT_NEAR(engine.gather_master(b)[3], 0.75f, 1e-5);
  EXPECT_EQ(engine.gather_master(c)[3], 1.0f);  // lr 0 (its decay too)
  slow.lr = 0.0f;
  engine.set_param_group_settings(slow_group, slow);
  engine.set_learning_rate(0.0);  // group 0 has no lr of its own: it follows
  step();
  EXPECT_NEAR(engine.gather_master(a)[3], 1.0f * (1.0f - 0.5f * 0.1f) - 0.5f, 1e-5);
  EXPECT_NEAR(engine.gather_master(b)[3], 0.75f, 1e-5);
  EXPECT_EQ(engine.param_group_settings(slow_group).lr, 0.0f);
  EXPECT_THROW(engine.set_param_group_settings(7, slow), Error);
}

// Frozen params (set_trainable false) keep their working copy only: the
// optimizer's state, I/O and results are those of the trainable params
// alone, the frozen values never change, and checkpoints keep them.
TEST(EngineFrozen, FrozenParamsCostTheOptimizerNothingAndStayAsTheyAre) {
  for (const std::string params_on : {"none", "nvme"}) {
    SCOPED_TRACE("offload_param " + params_on);
    testing::TempDir dir;
    const auto config_in = [&](const std::string& sub) {
      const std::string nvme = (dir.path() / sub).string();
      return config::load_config_string(R"({"optimizer": {"type": "AdamW", "params": {"lr": 0.1, "weight_decay": 0.1}},
          "bf16": {"enabled": true},
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": 5,
            "offload_param": {"device": ")" + params_on + R"(", "nvme_path": ")" + nvme + R"("},
            "offload_optimizer": {"device": "nvme", "nvme_path": ")" + nvme + R"(", "min_swap_bytes": 0}}})");
    };
    std::vector<float> start_b(6);
    for (std::size_t i = 0; i < start_b.size(); ++i) start_b[i] = 0.25f * static_cast<float>(i) - 0.5f;
    // `with_frozen`: b registered frozen between a and c; else a and c only.
    const auto train = [&](bool with_frozen, const std::string& sub) {
      auto comm = make_local_communicator();
      Engine engine(config_in(sub), *comm);
      const auto module = engine.add_module("m");
      const ParamIndex a = engine.add_param(module, "a", {3, 3}, std::vector<float>(9, 1.0f));
      std::optional<ParamIndex> b;
      if (with_frozen) {
        b = engine.add_param(module, "b", {6}, start_b);
        engine.set_trainable(*b, false);
      }
      const ParamIndex c = engine.add_param(module, "c", {4}, std::vector<float>(4, -1.0f));
      engine.finalize();
      std::uint64_t written_before = engine.stats().nvme_written_bytes;
      for (int step = 0; step < 3; ++step) {
        engine.pre_forward(module);
        engine.post_forward(module);
        engine.pre_backward(module);
        if (b) {
          EXPECT_THROW(engine.grad(*b), Error);  // frozen: no gradient
        }
        for (ParamIndex p : {a, c}) {
          const std::uint64_t n = engine.describe(p).elements;
          for (std::uint64_t i = 0; i < n; ++i) engine.grad(p)[i] = 0.1f * static_cast<float>(i + step) - 0.3f;
        }
        engine.post_backward(module);
        EXPECT_TRUE(engine.step());
      }
      const std::uint64_t written = engine.stats().nvme_written_bytes - written_before;
      std::vector<std::vector<float>> out = {engine.gather_master(a), engine.gather_master(c)};
      if (b) {
        out.push_back(engine.gather_master(*b));
        EXPECT_FALSE(engine.describe(*b).trainable);
      }
      return std::make_pair(out, written);
    };
    const auto [frozen, frozen_written] = train(true, "f");
    const auto [alone, alone_written] = train(false, "a");
    EXPECT_EQ(frozen[0], alone[0]);  // the trainable params step exactly as without b
    EXPECT_EQ(frozen[1], alone[1]);
    EXPECT_EQ(frozen_written, alone_written);  // and b takes no optimizer I/O
    EXPECT_GT(alone_written, 0u);
    std::vector<float> b_in_bf16(start_b.size());
    for (std::size_t i = 0; i < start_b.size(); ++i) b_in_bf16[i] = cpu_adam::bf16_to_float(cpu_adam::float_to_bf16(start_b[i]));
    EXPECT_EQ(frozen[2], b_in_bf16);  // its working copy (bf16) is all it has
  }
}

TEST(EngineFrozen, CheckpointsKeepFrozenValuesAndRefuseAnotherChoiceOfFrozenParams) {
  // On NVMe the frozen shard is in the param store only (no host image).
  for (const std::string params_on : {"none", "nvme"}) {
    SCOPED_TRACE(params_on);
    testing::TempDir dir;
    const auto config = config::load_config_string(
        R"({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 3,
            "stage3_param_persistence_threshold": 0, "sub_group_size": 5,
            "offload_param": {"device": ")" + params_on + R"(", "nvme_path": ")" + (dir.path() / "nvme").string() + R"("}}})");
    const auto build = [&](Engine& engine, bool b_frozen) {
      const auto module = engine.add_module("m");
      engine.add_param(module, "a", {4}, std::vector<float>(4, 1.0f));
      const ParamIndex b = engine.add_param(module, "b", {3}, std::vector<float>(3, 2.0f));
      engine.set_trainable(b, !b_frozen);
      engine.finalize();
      return b;
    };
    auto comm = make_local_communicator();
    {
      Engine engine(config, *comm);
      const ParamIndex b = build(engine, true);
      engine.set_master(b, std::vector<float>{7.0f, 8.0f, 9.0f});  // GatheredParameters' write-back
      EXPECT_EQ(engine.gather_master(b), (std::vector<float>{7.0f, 8.0f, 9.0f}));
      engine.save_checkpoint(dir.path() / "ckpt");
    }
    {
      Engine engine(config, *comm);
      const ParamIndex b = build(engine, true);
      EXPECT_EQ(engine.gather_master(b), (std::vector<float>{2.0f, 2.0f, 2.0f}));
      engine.load_checkpoint(dir.path() / "ckpt");
      EXPECT_EQ(engine.gather_master(b), (std::vector<float>{7.0f, 8.0f, 9.0f}));
      engine.pre_forward(0);
      EXPECT_EQ(engine.param_f32(b)[2], 9.0f);  // the gathered param too
      engine.post_forward(0);
    }
    const auto consolidated = consolidate_checkpoint(dir.path() / "ckpt");
    ASSERT_EQ(consolidated.size(), 2u);
    EXPECT_TRUE(consolidated[0].trainable);
    EXPECT_EQ(consolidated[0].values, std::vector<float>(4, 1.0f));
    EXPECT_FALSE(consolidated[1].trainable);
    EXPECT_EQ(consolidated[1].values, (std::vector<float>{7.0f, 8.0f, 9.0f}));
    {
      Engine engine(config, *comm);
      build(engine, false);
      try {
        engine.load_checkpoint(dir.path() / "ckpt");
        FAIL() << "a checkpoint with b frozen loaded into an engine training it";
      } catch (const Error& error) {
        EXPECT_NE(std::string(error.what()).find("'b' is frozen in the checkpoint and trainable here"),
                  std::string::npos) << error.what();
      }
    }
  }
}

TEST(EngineFrozen, AModelWithEveryParamFrozenRunsForwardWithNoOptimizer) {
  // ZeRO-Inference: a model served with its params sharded, nothing trained.
  const auto config = config::load_config_string(
      R"({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})");
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  const ParamIndex w = engine.add_param(module, "w", {5}, std::vector<float>{1, 2, 3, 4, 5});
  engine.set_trainable(w, false);
  engine.finalize();
  engine.pre_forward(module);
  EXPECT_EQ(engine.param_f32(w)[4], 5.0f);
  engine.post_forward(module);
  EXPECT_TRUE(engine.step());
  engine.set_learning_rate(0.5);
  EXPECT_EQ(engine.learning_rate(), 0.5);
  EXPECT_EQ(engine.gather_master(w), (std::vector<float>{1, 2, 3, 4, 5}));
}

// Adam (lr 0.5) at stage 3 with params, optimizer states and gradients on
// NVMe under `dir`, in sub-groups of 7 elements, nothing persistent.
config::Config adam_all_on_nvme(const std::filesystem::path& dir, int accumulation = 1) {
  return config::load_config_string(R"({"optimizer": {"type": "Adam", "params": {"lr": 0.5}},
      "gradient_accumulation_steps": )" + std::to_string(accumulation) + R"(,
      "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "sub_group_size": 7,
        "offload_param": {"device": "nvme", "nvme_path": ")" + dir.string() + R"("},
        "offload_optimizer": {"device": "nvme", "nvme_path": ")" + dir.string() + R"("}}})");
}

TEST(EngineStages, SetMasterReplacesTheValuesEverywhereAndKeepsTheMoments) {
  testing::TempDir dir;
  const auto config = adam_all_on_nvme(dir.path());
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  const ParamIndex p = engine.add_param(module, "w", {4, 5}, std::vector<float>(20, 1.0f));
  // Its neighbour shares the sub-group [14, 21) with w's tail: w's new
  // values must not touch it (the param store rewrites its shard from what
  // it holds).
  const ParamIndex neighbour = engine.add_param(module, "b", {3}, std::vector<float>{3.0f, 4.0f, 5.0f});
  engine.finalize();
  const auto train_once = [&] {
    engine.pre_forward(module);
    engine.post_forward(module);
    engine.pre_backward(module);
    std::fill(engine.grad(p), engine.grad(p) + 20, 1.0f);
    std::fill(engine.grad(neighbour), engine.grad(neighbour) + 3, 1.0f);
    engine.post_backward(module);
    EXPECT_TRUE(engine.step());
  };
  train_once();  // moments are non-zero now
  const std::vector<float> neighbour_before = engine.gather_master(neighbour);
  std::vector<float> values(20);
  for (int i = 0; i < 20; ++i) values[i] = static_cast<float>(i);
  engine.set_master(p, values);
  EXPECT_EQ(engine.gather_master(p), values);
  EXPECT_EQ(engine.gather_master(neighbour), neighbour_before);
  engine.pre_forward(module);  // the gathered copy is the new value too (from NVMe)
  EXPECT_EQ(engine.param_f32(p)[19], 19.0f);
  EXPECT_EQ(std::vector<float>(engine.param_f32(neighbour), engine.param_f32(neighbour) + 3), neighbour_before);
  engine.post_forward(module);
  // Adam's second step with the same gradient again moves each value by
  // the same lr-sized step (m / sqrt(v) stays 1): the moments were kept.
  train_once();
  const auto after = engine.gather_master(p);
  for (int i = 0; i < 20; ++i) EXPECT_NEAR(after[i], values[i] - 0.5f, 1e-4) << i;
  const auto neighbour_after = engine.gather_master(neighbour);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(neighbour_after[i], neighbour_before[i] - 0.5f, 1e-4) << i;
  EXPECT_THROW(engine.set_master(p, std::vector<float>(3)), Error);
}

// DeepSpeed's safe_get_full_grad / _optimizer_state / set_full_optimizer_state
// and set_gradient_accumulation_boundary, with everything on NVMe and
// sub-groups that cut the params: a param's accumulated gradient read whole
// between micro-steps (from the open buffer, the other one and the store),
// windows the trainer closes itself, and moments read and replaced.
TEST(EngineStages, OneParamsGradientAndMomentsReadWholeAndWindowsTheTrainerCloses) {
  testing::TempDir dir;
  const auto config = adam_all_on_nvme(dir.path(), 2);
  auto comm = make_local_communicator();
  Engine engine(config, *comm);
  const auto module = engine.add_module("m");
  const ParamIndex w = engine.add_param(module, "w", {4, 5}, std::vector<float>(20, 1.0f));
  const ParamIndex b = engine.add_param(module, "b", {3}, std::vector<float>{3.0f, 4.0f, 5.0f});
  engine.finalize();
  const auto backward = [&] {
    engine.pre_forward(module);
    engine.post_forward(module);
    engine.pre_backward(module);
    for (int i = 0; i < 20; ++i) engine.grad(w)[i] = static_cast<float>(i);
    std::fill(engine.grad(b), engine.grad(b) + 3, 1.0f);
    engine.post_backward(module);
  };
  const auto expect_gradient = [&](float micro_steps) {
    // Each micro-step's gradient divided by gradient_accumulation_steps.
    const auto gw = engine.gather_values(w, "grad");
    ASSERT_EQ(gw.size(), 20u);
    for (int i = 0; i < 20; ++i) EXPECT_EQ(gw[i], micro_steps * static_cast<float>(i) / 2) << i;
    EXPECT_EQ(engine.gather_values(b, "grad"), std::vector<float>(3, micro_steps / 2));
  };
  backward();
  expect_gradient(1);  // before step(): the last sub-group is still open
  EXPECT_FALSE(engine.step(false));
  expect_gradient(1);
  EXPECT_THROW(engine.save_checkpoint(dir.path() / "inside"), Error);  // a window is open
  backward();
  expect_gradient(2);
  EXPECT_FALSE(engine.step(false));  // the count says boundary; the trainer says not yet
  backward();
  expect_gradient(3);
  EXPECT_TRUE(engine.step(true));
  EXPECT_EQ(engine.gather_values(w, "grad"), std::vector<float>(20, 0.0f));
  // Adam's first step: m = (1 - beta1) g, v = (1 - beta2) g^2, g = 1.5 i.
  const auto m = engine.gather_values(w, "exp_avg");
  const auto v = engine.gather_values(w, "exp_avg_sq");
  for (int i = 0; i < 20; ++i) {
    const float g = 1.5f * static_cast<float>(i);
    EXPECT_NEAR(m[i], 0.1f * g, 1e-5f) << i;
    EXPECT_NEAR(v[i], 0.001f * g * g, 1e-5f * (1 + g * g)) << i;  // 1 - beta2 in float
  }
  engine.save_checkpoint(dir.path() / "after");  // three micro-steps, none pending
  const auto master = engine.gather_master(w);
  const auto b_moment = engine.gather_values(b, "exp_avg");
  engine.set_values(w, "exp_avg", std::vector<float>(20, 0.25f));
  EXPECT_EQ(engine.gather_values(w, "exp_avg"), std::vector<float>(20, 0.25f));
  EXPECT_EQ(engine.gather_values(w, "exp_avg_sq"), v);
  EXPECT_EQ(engine.gather_master(w), master);
  EXPECT_EQ(engine.gather_values(b, "exp_avg"), b_moment);  // shares a sub-group with w
  EXPECT_THROW(engine.gather_values(w, "momentum_buffer"), Error);
  EXPECT_THROW(engine.set_values(w, "exp_avg", std::vector<float>(3)), Error);
  // One rank: its shard is the whole param (the local forms), and a
  // gradient written between micro-steps is what the step takes.
  EXPECT_EQ(engine.local_values(w, "exp_avg_sq"), v);
  engine.set_local_values(b, "param", std::vector<float>{-1.0f, -2.0f, -3.0f});
  EXPECT_EQ(engine.gather_master(b), (std::vector<float>{-1.0f, -2.0f, -3.0f}));
  EXPECT_EQ(engine.gather_master(w), master);  // shares a sub-group with b
  // The working copies (fp32 here) follow the master, read from NVMe.
  EXPECT_EQ(engine.local_values(b, "working"), (std::vector<float>{-1.0f, -2.0f, -3.0f}));
  EXPECT_EQ(engine.local_values(w, "working"), master);
  backward();
  std::vector<float> g(20);
  for (int i = 0; i < 20; ++i) g[i] = (i % 2 == 0 ? 1.0f : -1.0f) * 1e-3f;
  engine.set_values(w, "grad", g);
  EXPECT_EQ(engine.gather_values(w, "grad"), g);
  EXPECT_EQ(engine.gather_values(b, "grad"), std::vector<float>(3, 0.5f));  // untouched
  backward();  // the window goes on from the written values
  EXPECT_TRUE(engine.step());
  const auto m2 = engine.gather_values(w, "exp_avg");
  for (int i = 0; i < 20; ++i) {
    EXPECT_NEAR(m2[i], 0.9f * 0.25f + 0.1f * (g[i] + static_cast<float>(i) / 2), 1e-5f) << i;
  }
}

// EngineOptions::loss_divided_by_accumulation: a trainer that divides the
// loss by gradient_accumulation_steps before backward (zinf.initialize, as
// DeepSpeed) hands in gradients already divided; the engine must not divide
// them again. The same window with undivided gradients in an engine without
// the option accumulates and steps to the same values.
TEST(EngineGradients, ALossTheTrainerDividedIsNotDividedAgain) {
  const auto adam = config::load_config_string(R"({"optimizer": {"type": "Adam", "params": {"lr": 0.1}},
      "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}})");
  const auto train = [&](bool divided) {
    auto comm = make_local_communicator();
    EngineOptions options;
    options.loss_divided_by_accumulation = divided;
    Engine engine(adam, *comm, options);
    const auto module = engine.add_module("m");
    const ParamIndex w = engine.add_param(module, "w", {6}, std::vector<float>{1, 2, 3, 4, 5, 6});
    engine.finalize();
    std::vector<float> accumulated;
    for (int micro = 0; micro < 4; ++micro) {
      engine.pre_forward(module);
      engine.post_forward(module);
      engine.pre_backward(module);
      for (int i = 0; i < 6; ++i) {
        const float g = static_cast<float>((i + 1) * (micro + 1));
        engine.grad(w)[i] = divided ? g / 4 : g;
      }
      engine.post_backward(module);
      if (micro == 3) accumulated = engine.gather_values(w, "grad");
      EXPECT_EQ(engine.step(), micro == 3);
    }
    return std::pair(accumulated, engine.gather_master(w));
  };
  const auto [divided_grad, divided_master] = train(true);
  const auto [plain_grad, plain_master] = train(false);
  // Sum over micro-steps of (i + 1)(micro + 1) / 4 = 2.5 (i + 1).
  for (int i = 0; i < 6; ++i) EXPECT_EQ(divided_grad[i], 2.5f * static_cast<float>(i + 1)) << i;
  EXPECT_EQ(divided_grad, plain_grad);
  EXPECT_EQ(divided_master, plain_master);
  EXPECT_NE(divided_master, (std::vector<float>{1, 2, 3, 4, 5, 6}));
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, EngineEquality, ::testing::Values(1, 2, 4));

// The same training on the strict device stand-in (device memory the CPU
// cannot touch, copies that land late with poison before, collectives that
// refuse host pointers): what would break on a GPU breaks here.
class StrictDeviceEquality : public ::testing::TestWithParam<std::tuple<int, std::string>> {
 protected:
  void SetUp() override {
    if (std::get<0>(GetParam()) > 1 && !gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  }
  TrainingRun run_for_param() const {
    TrainingRun run;
    run.world = std::get<0>(GetParam());
    run.device = std::get<1>(GetParam());
    return run;
  }
};

TEST_P(StrictDeviceEquality, NoOffloadWithAccumulationAndClippingMatchesPlainTraining) {
  TrainingRun run = run_for_param();
  run.accumulation = 2;
  run.clipping = 0.05;
  run_world(run);
}

TEST_P(StrictDeviceEquality, NvmeParamsAndOptimizerMatchPlainTraining) {
  testing::TempDir dir;
  TrainingRun run = run_for_param();
  run.offload_param = "nvme";
  run.offload_optimizer = "nvme";
  run.persistence = 0;
  run.nvme_dir = dir.path().string();
  run_world(run);
}

// Below stage 3 every param is persistent: its working shard is its own
// place in the whole param, rewritten by each step and gathered in place.
TEST_P(StrictDeviceEquality, StagesOneAndTwoMatchPlainTraining) {
  for (int stage : {1, 2}) {
    SCOPED_TRACE(fmt::format("stage {}", stage));
    TrainingRun run = run_for_param();
    run.stage = stage;
    run.offload_optimizer = "cpu";
    run.accumulation = 2;
    run.clipping = 0.05;
    run_world(run);
  }
}

// The optimizer's pipeline on NVMe hands each sub-group's working copy
// (sub-groups cutting shards) to the device shards as it finishes.
TEST_P(StrictDeviceEquality, NvmeOptimizerWithTheShardsOnTheDeviceMatchesPlainTraining) {
  testing::TempDir dir;
  TrainingRun run = run_for_param();
  run.offload_optimizer = "nvme";
  run.nvme_dir = dir.path().string();
  run.accumulation = 2;
  run_world(run);
}

TEST_P(StrictDeviceEquality, CpuOffloadMatchesPlainTraining) {
  TrainingRun run = run_for_param();
  run.offload_param = "cpu";
  run.offload_optimizer = "cpu";
  run_world(run);
}

INSTANTIATE_TEST_SUITE_P(WorldsAndCommunicators, StrictDeviceEquality,
                         ::testing::Combine(::testing::Values(1, 2, 4), ::testing::Values("strict", "strict-gloo")),
                         [](const auto& info) {
                           std::string name = std::to_string(std::get<0>(info.param)) + "_" + std::get<1>(info.param);
                           for (char& c : name) c = c == '-' ? '_' : c;
                           return name;
                         });

// bf16 training: the trainer computes with bf16 params, the optimizer keeps
// fp32 masters, and after every step each gathered param is its master
// rounded to bf16 (nearest even) on every rank.
TEST(EngineBf16, GatheredParamsAreTheMastersRoundedToBf16) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  testing::TempDir dir;
  TrainingRun run;
  run.world = 2;
  run.offload_param = "nvme";
  run.offload_optimizer = "nvme";
  run.nvme_dir = dir.path().string();
  const auto outcomes = testing::run_ranks(2, [&](const LaunchEnv& launch) {
    std::string json = config_json(run);
    json.insert(1, "\"bf16\": {\"enabled\": true},");
    auto comm = make_communicator(launch);
    Engine engine(config::load_config_string(json), *comm);
    if (engine.working_dtype() != cpu_adam::DType::bf16) throw std::runtime_error("not bf16");
    TinyOnEngine model(engine, run.shape);
    engine.finalize();
    for (int step = 0; step < 6; ++step) {
      model.micro_step(engine, run.shape, batch_index(run, step, 0, launch.rank));
      engine.step();
    }
    if (engine.optimizer_step() != 6) throw std::runtime_error("not 6 optimizer steps");
    for (std::size_t l = 0; l < model.W.size(); ++l) {
      const auto master = engine.gather_master(model.W[l]);
      engine.pre_forward(model.layer_modules[l]);
      const auto* half = static_cast<const std::uint16_t*>(engine.param(model.W[l]));
      for (std::size_t i = 0; i < master.size(); ++i) {
        if (half[i] != cpu_adam::float_to_bf16(master[i])) {
          throw std::runtime_error(fmt::format("layer {} element {}: bf16 {:#06x} vs master {}", l, i, half[i], master[i]));
        }
      }
      engine.post_forward(model.layer_modules[l]);
    }
  });
  EXPECT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
}

void write_floats(const std::string& path, const std::vector<std::vector<float>>& tensors) {
  std::ofstream out(path, std::ios::binary);
  for (const auto& t : tensors) out.write(reinterpret_cast<const char*>(t.data()), t.size() * sizeof(float));
}

std::vector<char> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

// What the hooks gather and when: nothing ahead while the first micro-step
// is recorded, ahead of use afterwards; persistent params never; a changed
// module order is counted and training goes on, fetching on demand.
TEST(EnginePrefetch, GathersAheadAfterTheFirstMicroStepAndNeverForPersistentParams) {
  TrainingRun run;
  run.world = 1;
  auto comm = make_local_communicator();
  std::string json = config_json(run);
  Engine engine(config::load_config_string(json), *comm);
  TinyOnEngine model(engine, run.shape);
  engine.finalize();
  // b and v (24 elements) persist: gathered from the start, outside hooks.
  EXPECT_TRUE(engine.describe(model.b[0]).persistent);
  EXPECT_FALSE(engine.describe(model.W[0]).persistent);
  EXPECT_NE(engine.param(model.v), nullptr);
  try {
    engine.param(model.W[0]);
    ADD_FAILURE() << "a sharded param is readable outside its module's hooks";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::invalid);
    EXPECT_NE(std::string(error.what()).find("layer0.W"), std::string::npos);
  }

  model.micro_step(engine, run.shape, 0);
  engine.step();
  EngineStats first = engine.stats();
  // Recording: each W gathered at its forward and again at its backward
  // (reuse distance aside), nothing ahead.
  EXPECT_EQ(first.prefetched, 0u);
  EXPECT_GE(first.gathers, 3u);
  EXPECT_EQ(engine.coordinator().mode(), Coordinator::Mode::following);

  model.micro_step(engine, run.shape, 1);
  engine.step();
  const EngineStats second = engine.stats();
  EXPECT_GT(second.prefetched, 0u);
  EXPECT_EQ(second.order_changes, 0u);
  // Every gather of the second step but the first layer's was started ahead
  // (the bucket of 1000 elements holds one 576-element W).
  EXPECT_EQ(second.gathers - first.gathers - (second.prefetched - first.prefetched), 1u);
}

TEST(EnginePrefetch, AChangedModuleOrderIsCountedAndTrainingGoesOn) {
  TrainingRun run;
  run.world = 1;
  auto comm = make_local_communicator();
  Engine engine(config::load_config_string(config_json(run)), *comm);
  TinyOnEngine model(engine, run.shape);
  engine.finalize();
  model.micro_step(engine, run.shape, 0);
  engine.step();
  // A forward-only pass over the layers in reverse: not the recorded order.
  for (int l = run.shape.layers - 1; l >= 0; --l) {
    engine.pre_forward(model.layer_modules[l]);
    EXPECT_NE(engine.param(model.W[l]), nullptr);
    engine.post_forward(model.layer_modules[l]);
  }
  engine.step();
  EXPECT_EQ(engine.stats().order_changes, 1u);
  EXPECT_EQ(engine.coordinator().mode(), Coordinator::Mode::recording);
  model.micro_step(engine, run.shape, 1);
  engine.step();
  EXPECT_EQ(engine.coordinator().mode(), Coordinator::Mode::following);
}

TEST(EngineFailure, ARankThatDiesMidTrainingMakesTheOthersFailClearly) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  testing::TempDir dir;
  TrainingRun run;
  run.world = 3;
  run.offload_param = "nvme";
  run.offload_optimizer = "nvme";
  run.nvme_dir = dir.path().string();
  const auto outcomes = testing::run_ranks(3, [&](const LaunchEnv& launch) {
    CommunicatorOptions comm_options;
    comm_options.timeout = std::chrono::seconds(60);
    auto comm = make_communicator(launch, comm_options);
    Engine engine(config::load_config_string(config_json(run)), *comm);
    TinyOnEngine model(engine, run.shape);
    engine.finalize();
    for (int step = 0; step < 4; ++step) {
      if (step == 2 && launch.rank == 1) ::_exit(7);  // a crash between steps
      model.micro_step(engine, run.shape, batch_index(run, step, 0, launch.rank));
      engine.step();
    }
  }, std::chrono::seconds(50));
  ASSERT_EQ(outcomes[1].exit_code, 7) << testing::describe(outcomes);
  for (int rank : {0, 2}) {
    EXPECT_FALSE(outcomes[rank].hung) << testing::describe(outcomes);
    EXPECT_EQ(outcomes[rank].exit_code, 3) << testing::describe(outcomes);
    EXPECT_NE(outcomes[rank].error.find("peer rank died"), std::string::npos) << outcomes[rank].error;
  }
}

class EngineCheckpoint : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (GetParam() > 1 && !gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  }
};

// Rewrites a checkpoint into the layout of checkpoints written before
// sub-groups shared files: one file per sub-group, its tensors named
// "param", "exp_avg", ..., and no "group_file_elements" in the description.
// Returns the number of files it split.
int split_into_one_file_per_sub_group(const std::filesystem::path& checkpoint) {
  int split = 0;
  for (const auto& entry : std::filesystem::directory_iterator(checkpoint)) {
    const std::string name = entry.path().filename().string();
    if (name.find("_group") == std::string::npos) continue;
    const SafetensorsFile file = read_safetensors(entry.path());
    if (file.metadata.at("groups") == "1") continue;
    std::map<std::string, std::vector<TensorToWrite>> groups;  // by sub-group
    for (const auto& [key, tensor] : file.tensors) {
      const auto slash = key.find('/');
      groups[key.substr(0, slash)].push_back(
          {key.substr(slash + 1), tensor.dtype, tensor.shape,
           std::span(file.data).subspan(tensor.begin, tensor.end - tensor.begin)});
    }
    for (const auto& [group, tensors] : groups) {
      write_safetensors(checkpoint / fmt::format("zero3_rank{:05}_group{:05}.safetensors",
                                                 std::stoi(file.metadata.at("rank")), std::stoi(group)),
                        tensors,
                        {{"format", file.metadata.at("format")}, {"rank", file.metadata.at("rank")},
                         {"group", group}, {"optimizer_step", file.metadata.at("optimizer_step")}});
    }
    ++split;
  }
  std::ifstream in(checkpoint / "zinf_checkpoint.json");
  auto description = nlohmann::json::parse(in);
  description.erase("group_file_elements");
  std::ofstream(checkpoint / "zinf_checkpoint.json") << description.dump(2);
  return split;
}

void expect_resume_continues_exactly(int world, const std::string& device,
                                     const std::function<void(const std::filesystem::path&)>& between = {}) {
  testing::TempDir dir;
  TrainingRun run;
  run.world = world;
  run.device = device;
  run.offload_param = "nvme";
  run.offload_optimizer = "nvme";
  run.accumulation = 2;
  run.clipping = 0.05;
  run.steps = 5;
  run.nvme_dir = (dir.path() / "nvme").string();
  const std::string checkpoint = (dir.path() / "ckpt").string();
  const std::string straight = (dir.path() / "straight.bin").string();
  const std::string resumed = (dir.path() / "resumed.bin").string();
  auto outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) {
    const auto masters = train_span(run, launch, 0, 5, "", "");
    if (launch.rank == 0) write_floats(straight, masters);
  });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
  // Steps 0-1, checkpoint, and the processes end; new ones resume for 2-4.
  outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) {
    train_span(run, launch, 0, 2, "", checkpoint);
  });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(checkpoint) / "zinf_checkpoint.json"));
  if (between) between(checkpoint);
  outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) {
    const auto masters = train_span(run, launch, 2, 5, checkpoint, "");
    if (launch.rank == 0) write_floats(resumed, masters);
  });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
  const auto a = read_all(straight);
  const auto b = read_all(resumed);
  ASSERT_FALSE(a.empty());
  EXPECT_TRUE(a == b) << "the resumed run's parameters differ from the uninterrupted run's";
}

TEST_P(EngineCheckpoint, ResumeContinuesExactlyLikeTheUninterruptedRun) {
  expect_resume_continues_exactly(GetParam(), "host");
}

// Checkpoints saved before sub-groups shared files (one file each) load and
// resume exactly as they did.
TEST(EngineCheckpointLayout, AOneFilePerSubGroupCheckpointResumesExactly) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  expect_resume_continues_exactly(2, "host", [](const std::filesystem::path& checkpoint) {
    EXPECT_EQ(split_into_one_file_per_sub_group(checkpoint), 2);  // a file per rank held them all
  });
}

// zero_to_fp32: every param whole from every rank's sub-group files, with no
// engine, equal to the masters the ranks gathered at the save.
TEST_P(EngineCheckpoint, ConsolidatingTheCheckpointGivesTheMastersWhole) {
  testing::TempDir dir;
  TrainingRun run;
  run.world = GetParam();
  run.offload_optimizer = "nvme";
  run.steps = 2;
  run.nvme_dir = (dir.path() / "nvme").string();
  const std::string checkpoint = (dir.path() / "ckpt").string();
  const std::string gathered = (dir.path() / "masters.bin").string();
  const auto outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) {
    const auto masters = train_span(run, launch, 0, 2, "", checkpoint);
    if (launch.rank == 0) write_floats(gathered, masters);
  });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
  const auto params = consolidate_checkpoint(checkpoint);
  std::vector<std::vector<float>> consolidated;
  for (const auto& p : params) {
    EXPECT_TRUE(p.trainable) << p.name;
    consolidated.push_back(p.values);
  }
  ASSERT_EQ(params.size(), 2u * static_cast<std::size_t>(run.shape.layers) + 1);
  EXPECT_EQ(params[0].name, "layer0.W");
  EXPECT_EQ(params[0].shape, (std::vector<std::int64_t>{run.shape.width, run.shape.width}));
  write_floats((dir.path() / "consolidated.bin").string(), consolidated);
  EXPECT_TRUE(read_all(gathered) == read_all((dir.path() / "consolidated.bin").string()));
  // The rank's sub-groups (of 500 elements) share one file: a save of many
  // small sub-groups writes a few files, not one each.
  int group_files = 0;
  for (const auto& entry : std::filesystem::directory_iterator(checkpoint)) {
    group_files += entry.path().filename().string().find("_group") != std::string::npos;
  }
  EXPECT_EQ(group_files, run.world);
  // And in the layout of before (one file each) it consolidates the same
  // (at world 4 a rank's partition is one sub-group: nothing to split).
  EXPECT_EQ(split_into_one_file_per_sub_group(checkpoint), run.world == 4 ? 0 : run.world);
  consolidated.clear();
  for (const auto& p : consolidate_checkpoint(checkpoint)) consolidated.push_back(p.values);
  write_floats((dir.path() / "split.bin").string(), consolidated);
  EXPECT_TRUE(read_all(gathered) == read_all((dir.path() / "split.bin").string()));
  std::filesystem::remove(std::filesystem::path(checkpoint) / "zero3_rank00000_group00000.safetensors");
  EXPECT_THROW(consolidate_checkpoint(checkpoint), Error);  // a missing shard names its file
}

TEST(StrictDeviceCheckpoint, ResumeContinuesExactlyOverTheDeviceCommunicator) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  expect_resume_continues_exactly(2, "strict");
}

// sub_group_size 0, as axolotl's stage-3 configs write it: DeepSpeed makes
// each param a sub-group; zinf's sub-groups are then the largest trainable
// shard. Training is unchanged, the checkpoint records the size that ran
// and consolidates.
TEST(EngineSubGroups, SizeZeroMeansTheLargestTrainableShard) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  testing::TempDir dir;
  TrainingRun run;
  run.world = 2;
  run.offload_optimizer = "nvme";
  run.sub_group_size = 0;
  run.accumulation = 2;
  run.nvme_dir = (dir.path() / "nvme").string();
  const std::string checkpoint = (dir.path() / "ckpt").string();
  const auto outcomes = testing::run_ranks(run.world, [&](const LaunchEnv& launch) {
    const auto reference = train_reference(run, config::load_config_string(config_json(run)));
    expect_close(train_span(run, launch, 0, run.steps, "", checkpoint), reference,
                 fmt::format("rank {}", launch.rank));
  });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
  std::ifstream in(std::filesystem::path(checkpoint) / "zinf_checkpoint.json");
  const auto description = nlohmann::json::parse(in);
  const std::uint64_t largest_shard = static_cast<std::uint64_t>(run.shape.width * run.shape.width) / 2;
  EXPECT_EQ(description.at("sub_group_size").get<std::uint64_t>(), largest_shard);
  EXPECT_EQ(consolidate_checkpoint(checkpoint).size(), 2u * static_cast<std::size_t>(run.shape.layers) + 1);
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, EngineCheckpoint, ::testing::Values(1, 2, 4));

TEST(EngineCheckpointErrors, AnotherWorldSizeACorruptShardAndAMissingDescriptionAreRefused) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  testing::TempDir dir;
  TrainingRun run;
  run.world = 2;
  run.steps = 1;
  const std::string checkpoint = (dir.path() / "ckpt").string();
  auto outcomes = testing::run_ranks(2, [&](const LaunchEnv& launch) { train_span(run, launch, 0, 1, "", checkpoint); });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);

  const auto load_error = [&](const std::string& from) {
    const config::Config config = config::load_config_string(config_json(run));
    auto comm = make_local_communicator();
    Engine engine(config, *comm);
    TinyOnEngine model(engine, run.shape);
    engine.finalize();
    try {
      engine.load_checkpoint(from);
    } catch (const Error& error) {
      return std::string(to_string(error.kind())) + ": " + error.what();
    }
    return std::string("loaded");
  };
  const std::string other_world = load_error(checkpoint);
  EXPECT_NE(other_world.find("saved by 2 ranks, loaded by 1"), std::string::npos) << other_world;
  EXPECT_NE(other_world.find("zinf_checkpoint.json"), std::string::npos) << other_world;
  EXPECT_NE(load_error((dir.path() / "nowhere").string()).find("holds no complete checkpoint"), std::string::npos);

  // A flipped byte in rank 1's shard: rank 1 refuses naming the file (and
  // rank 0, waiting in the barrier, fails when rank 1 leaves).
  const auto shard = std::filesystem::path(checkpoint) / "zero3_rank00001_group00000.safetensors";
  {
    std::fstream file(shard, std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(-5, std::ios::end);
    char c = 0;
    file.read(&c, 1);
    c ^= 0x20;
    file.seekp(-5, std::ios::end);
    file.write(&c, 1);
  }
  outcomes = testing::run_ranks(2, [&](const LaunchEnv& launch) { train_span(run, launch, 1, 1, checkpoint, ""); });
  EXPECT_FALSE(outcomes[1].hung) << testing::describe(outcomes);
  EXPECT_NE(outcomes[1].error.find("zero3_rank00001_group00000.safetensors"), std::string::npos) << outcomes[1].error;
  EXPECT_NE(outcomes[1].error.find("checksum"), std::string::npos) << outcomes[1].error;
  EXPECT_FALSE(outcomes[0].hung) << testing::describe(outcomes);
}

// The trainer's kernels run late on its own stream: gradients written by
// kernels still queued at post_backward, a gathered buffer read by a kernel
// still queued at post_forward. The engine orders itself after that stream.
TEST(StrictDeviceStreams, GradientsWrittenByLateKernelsAreReducedAfterThem) {
  for (int world : {1, 2}) {
    if (world > 1 && !gloo_available()) continue;
    TrainingRun run;
    run.world = world;
    run.accumulation = 2;
    const auto outcomes = testing::run_ranks(world, [&](const LaunchEnv& launch) {
      const config::Config config = config::load_config_string(config_json(run));
      swap::StrictDeviceOptions device_options;
      device_options.max_delay = std::chrono::milliseconds(2);
      auto device = swap::make_strict_device(device_options);
      auto comm = make_strict_device_communicator(make_communicator(launch), device);
      EngineOptions options;
      options.copier = device;
      options.compute_stream = device->create_stream();
      options.optimizer_threads = 1;
      Engine engine(config, *comm, options);
      TinyOnEngine model(engine, run.shape, stream_access(device, options.compute_stream));
      engine.finalize();
      for (int step = 0; step < run.steps; ++step) {
        for (int micro = 0; micro < run.accumulation; ++micro) {
          model.micro_step(engine, run.shape, batch_index(run, step, micro, launch.rank));
          engine.step();
        }
      }
      expect_close(model.masters(engine), train_reference(run, config), fmt::format("rank {}", launch.rank));
    });
    EXPECT_TRUE(testing::all_succeeded(outcomes)) << "world " << world << ": " << testing::describe(outcomes);
  }
}

// offload_param none on a device the CPU cannot read (a GPU): the device
// shards are the working copy's only home, with no image of the partition
// in host memory; a persistent param's shard is its place in the whole
// param. Frozen values, set values, steps and checkpoints go through them.
TEST(StrictDeviceMemory, TheWorkingCopyLivesOnTheDeviceWithNoHostImage) {
  testing::TempDir dir;
  const auto config = config::load_config_string(
      R"({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}, "zero_optimization": {"stage": 3,
          "stage3_param_persistence_threshold": 4, "sub_group_size": 5}})");
  const std::vector<float> a_start = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  const std::vector<float> b_start = {-1, -2, -3, -4, -5, -6};
  const std::vector<float> c_start = {0.5f, 1.5f, 2.5f, 3.5f};
  struct Built {
    ParamIndex a, b, c;
    ModuleIndex module;
  };
  const auto build = [&](Engine& engine) {
    Built m{};
    m.module = engine.add_module("m");
    m.a = engine.add_param(m.module, "a", {3, 3}, a_start);
    m.b = engine.add_param(m.module, "b", {6}, b_start);
    engine.set_trainable(m.b, false);
    m.c = engine.add_param(m.module, "c", {4}, c_start);  // at the threshold: persistent
    engine.finalize();
    return m;
  };
  const auto gathered = [](Engine& engine, const DeviceAccess& access, ParamIndex p) {
    std::vector<float> out;
    access.to_host(out, engine.param_f32(p), engine.describe(p).elements);
    return out;
  };
  // An engine on a strict device of its own, over its communicator.
  struct OnStrictDevice {
    std::shared_ptr<swap::StrictDevice> strict = swap::make_strict_device();
    std::unique_ptr<Communicator> comm = make_strict_device_communicator(make_local_communicator(), strict);
    DeviceAccess access = copier_access(strict);
    Engine engine;
    explicit OnStrictDevice(const config::Config& config)
        : engine(config, *comm, [this] {
            EngineOptions options;
            options.copier = strict;
            return options;
          }()) {}
  };
  const std::vector<float> b_set = {7, 8, 9, 10, 11, 12};
  std::vector<float> a_trained, c_trained;
  {
    OnStrictDevice on(config);
    Engine& engine = on.engine;
    const DeviceAccess& access = on.access;
    const Built m = build(engine);
    EXPECT_TRUE(engine.describe(m.c).persistent);
    EXPECT_FALSE(engine.describe(m.a).persistent);
    EXPECT_EQ(engine.stats().host_working_bytes, 0u);
    // On the device: a's and b's shards and c whole, its shard inside it (fp32).
    EXPECT_EQ(on.strict->bytes_in_use(), 4 * (engine.describe(m.a).shard_elements +
                                              engine.describe(m.b).shard_elements + engine.describe(m.c).elements));
    EXPECT_EQ(gathered(engine, access, m.c), c_start);  // gathered in place from its shard
    engine.set_master(m.b, b_set);                     // a frozen param's only copy is on the device
    EXPECT_EQ(engine.gather_master(m.b), b_set);
    for (int step = 0; step < 2; ++step) {
      engine.pre_forward(m.module);
      EXPECT_EQ(gathered(engine, access, m.b), b_set);
      engine.post_forward(m.module);
      engine.pre_backward(m.module);
      access.to_device(engine.grad(m.a), std::vector<float>(9, 0.5f));
      access.to_device(engine.grad(m.c), std::vector<float>(4, -0.5f));
      engine.post_backward(m.module);
      EXPECT_TRUE(engine.step());
    }
    a_trained = engine.gather_master(m.a);
    EXPECT_NE(a_trained, a_start);
    // What the trainer computes with after the steps is the masters' copy.
    engine.pre_forward(m.module);
    EXPECT_EQ(gathered(engine, access, m.a), a_trained);
    EXPECT_EQ(gathered(engine, access, m.c), engine.gather_master(m.c));
    EXPECT_NE(engine.gather_master(m.c), c_start);
    c_trained = engine.gather_master(m.c);
    engine.post_forward(m.module);
    engine.save_checkpoint(dir.path() / "ckpt");
  }
  {
    // The host stand-in (CPU trainers) keeps the partition in host memory
    // and loads the same checkpoint.
    auto comm = make_local_communicator();
    Engine engine(config, *comm);
    const Built m = build(engine);
    EXPECT_EQ(engine.stats().host_working_bytes, engine.describe(m.a).shard_elements * 4 +
                                                     engine.describe(m.b).shard_elements * 4 +
                                                     engine.describe(m.c).shard_elements * 4);
    engine.load_checkpoint(dir.path() / "ckpt");
    EXPECT_EQ(engine.gather_master(m.a), a_trained);
    EXPECT_EQ(engine.gather_master(m.b), b_set);
    EXPECT_EQ(engine.gather_master(m.c), c_trained);
  }
  {
    OnStrictDevice on(config);
    Engine& engine = on.engine;
    const DeviceAccess& access = on.access;
    const Built m = build(engine);
    engine.load_checkpoint(dir.path() / "ckpt");
    EXPECT_EQ(engine.gather_master(m.b), b_set);  // the frozen values, back into the device shard
    engine.pre_forward(m.module);
    EXPECT_EQ(gathered(engine, access, m.a), a_trained);
    EXPECT_EQ(gathered(engine, access, m.b), b_set);
    EXPECT_EQ(gathered(engine, access, m.c), c_trained);  // rewritten in place and gathered again
    engine.post_forward(m.module);
  }
}

TEST(StrictDeviceStreams, AGatheredBufferIsNotReusedWhileAKernelStillReadsIt) {
  TrainingRun run;
  run.world = 1;
  run.persistence = 0;
  const config::Config config = config::load_config_string(config_json(run));
  swap::StrictDeviceOptions device_options;
  device_options.max_delay = std::chrono::microseconds(0);
  auto device = swap::make_strict_device(device_options);
  auto comm = make_strict_device_communicator(make_local_communicator(), device);
  EngineOptions options;
  options.copier = device;
  options.compute_stream = device->create_stream();
  Engine engine(config, *comm, options);
  TinyOnEngine model(engine, run.shape, copier_access(device));
  engine.finalize();
  const std::size_t n = engine.describe(model.W[0]).elements;
  // Layer 0's W, read by a slow kernel queued before post_forward; layer
  // 1's W (the same size, so the same cached buffer) is gathered right
  // after. The kernel must still see layer 0's values.
  std::vector<float> seen(n, 0.0f);
  engine.pre_forward(model.layer_modules[0]);
  const void* w0 = engine.param(model.W[0]);
  device->launch(options.compute_stream, [&, w0] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    std::memcpy(seen.data(), device->access(w0, n * sizeof(float), "slow kernel"), n * sizeof(float));
  });
  engine.post_forward(model.layer_modules[0]);
  engine.pre_forward(model.layer_modules[1]);
  engine.post_forward(model.layer_modules[1]);
  device->synchronize(options.compute_stream);
  EXPECT_EQ(seen, testing::tiny_initial(run.shape, 0, 0));
  engine.step();
}

// Idle device buffers are kept for reuse only up to what
// stage3_max_live_parameters allows (working precision + fp32 gradients),
// and training within that cap still matches plain training.
TEST(EngineDeviceMemory, IdleBuffersStayUnderTheLiveParameterCap) {
  TrainingRun run;
  run.world = 1;
  run.persistence = 0;
  std::string json = config_json(run);
  json.replace(json.find("\"stage\": 3,"), 11, "\"stage\": 3, \"stage3_max_live_parameters\": 600,");
  const config::Config config = config::load_config_string(json);
  auto device = swap::make_strict_device();
  auto comm = make_strict_device_communicator(make_local_communicator(), device);
  EngineOptions options;
  options.copier = device;
  options.optimizer_threads = 1;
  Engine engine(config, *comm, options);
  TinyOnEngine model(engine, run.shape, copier_access(device));
  engine.finalize();
  const std::uint64_t cap = 600 * (4 + 4);
  for (int step = 0; step < run.steps; ++step) {
    model.micro_step(engine, run.shape, batch_index(run, step, 0, 0));
    engine.step();
    EXPECT_LE(engine.cached_device_bytes(), cap) << "step " << step;
  }
  expect_close(model.masters(engine), train_reference(run, config), "capped cache");
  // What is allocated is the shards (offload none) plus at most the cap.
  std::uint64_t shards = 0;
  for (std::size_t p = 0; p < engine.param_count(); ++p) shards += engine.describe(p).shard_elements * 4;
  EXPECT_LE(device->bytes_in_use(), shards + cap);
}

// fp16 training with DeepSpeed's dynamic loss scale: the trainer scales its
// gradients by loss_scale(); an overflow skips the step (the masters stay
// finite and unchanged) and halves the scale after `hysteresis` overflows;
// loss_scale_window good steps double it.
TEST(EngineFp16, AnOverflowSkipsTheStepAndLowersTheLossScale) {
  TrainingRun run;
  run.world = 1;
  std::string json = config_json(run);
  json.insert(1, R"("fp16": {"enabled": true, "initial_scale_power": 8, "loss_scale_window": 3, "hysteresis": 1},)");
  const config::Config config = config::load_config_string(json);
  auto comm = make_local_communicator();
  EngineOptions options;
  options.optimizer_threads = 1;
  Engine engine(config, *comm, options);
  ASSERT_EQ(engine.working_dtype(), cpu_adam::DType::f16);
  TinyOnEngine model(engine, run.shape);
  engine.finalize();
  EXPECT_EQ(engine.loss_scale(), 256.0);
  const auto step_with = [&](float multiplier, int batch) {
    model.grad_multiplier = multiplier;
    model.micro_step(engine, run.shape, static_cast<std::uint64_t>(batch));
    return engine.step();
  };
  EXPECT_TRUE(step_with(static_cast<float>(engine.loss_scale()), 0));
  const auto before = model.masters(engine);
  EXPECT_FALSE(step_with(std::numeric_limits<float>::infinity(), 1));
  EXPECT_EQ(engine.stats().skipped_steps, 1u);
  EXPECT_FALSE(std::isfinite(engine.stats().last_grad_norm));
  EXPECT_EQ(engine.loss_scale(), 128.0);
  EXPECT_EQ(engine.optimizer_step(), 1);
  const auto after = model.masters(engine);
  EXPECT_EQ(after, before);  // untouched, finite
  for (const auto& tensor : after) {
    for (float value : tensor) ASSERT_TRUE(std::isfinite(value));
  }
  // The skipped step's gradients are gone: the next step is a plain one,
  // and three good steps double the scale.
  for (int batch = 2; batch < 5; ++batch) EXPECT_TRUE(step_with(static_cast<float>(engine.loss_scale()), batch));
  EXPECT_EQ(engine.loss_scale(), 256.0);
  EXPECT_EQ(engine.optimizer_step(), 4);
  EXPECT_GT(engine.stats().last_grad_norm, 0.0);
  EXPECT_LT(engine.stats().last_grad_norm, 1e3);  // unscaled: the loss scale is taken out
}

class EngineCheckpoint16Bit : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineCheckpoint16Bit, WholeWeightsAreSavedInTheWorkingPrecision) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  const std::string device = GetParam();
  testing::TempDir dir;
  TrainingRun run;
  run.world = 2;
  const std::string checkpoint = (dir.path() / "ckpt").string();
  // bf16 training, saved before any step: the file holds the initial values
  // rounded to bf16, whole, under the registered names and shapes.
  const auto outcomes = testing::run_ranks(2, [&](const LaunchEnv& launch) {
    std::string json = config_json(run);
    json.replace(json.find("\"stage\": 3,"), 11, "\"stage\": 3, \"stage3_gather_16bit_weights_on_model_save\": true,");
    json.insert(1, "\"bf16\": {\"enabled\": true},");
    auto comm = make_communicator(launch);
    EngineOptions options;
    DeviceAccess access;
    if (device == "strict") {
      auto strict = swap::make_strict_device();
      options.copier = strict;
      access = copier_access(strict);
      comm = make_strict_device_communicator(std::move(comm), strict);
    }
    Engine engine(config::load_config_string(json), *comm, options);
    TinyOnEngine model(engine, run.shape, access);
    engine.finalize();
    engine.save_checkpoint(checkpoint);
  });
  ASSERT_TRUE(testing::all_succeeded(outcomes)) << testing::describe(outcomes);
  const auto file = read_safetensors(std::filesystem::path(checkpoint) / "zinf_model_weights.safetensors");
  ASSERT_EQ(file.tensors.size(), 7u);
  const auto& w1 = file.tensors.at("layer1.W");
  EXPECT_EQ(w1.dtype, "BF16");
  EXPECT_EQ(w1.shape, (std::vector<std::int64_t>{24, 24}));
  const auto initial = testing::tiny_initial(run.shape, 0, 1);
  const auto bytes = file.bytes("layer1.W", "BF16", initial.size() * 2);
  for (std::size_t i = 0; i < initial.size(); ++i) {
    std::uint16_t half = 0;
    std::memcpy(&half, bytes.data() + 2 * i, 2);
    ASSERT_EQ(half, cpu_adam::float_to_bf16(initial[i])) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, EngineCheckpoint16Bit, ::testing::Values("host", "strict"));

}  // namespace
}  // namespace zinf::zero3

// The optimizer swapper: pipelined, unpipelined, host-memory and plain
// in-memory stepping give the same bits; states survive a clean exit; a
// process killed mid-step reopens to a detectably incomplete step with every
// sub-group intact; an I/O error mid-step surfaces and keeps old copies; the
// pinned budget is checked before step 0.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "aio/thread_pool_engine.hpp"
#include "core/error.hpp"
#include "swap/optimizer_swapper.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

using cpu_adam::Buffer;
using cpu_adam::DType;
using testing::TempDir;

const std::vector<SubGroup> kGroups = {
    {"layers.0", 1000}, {"layers.1", 4097}, {"layers.2", 30001}, {"layers.3", 7},
    {"layers.4", 65536}};

std::vector<float> initial_params(std::size_t group) {
  std::mt19937 random(static_cast<unsigned>(group) + 1);
  std::normal_distribution<float> normal(0.0f, 0.5f);
  std::vector<float> values(kGroups[group].elements);
  for (auto& v : values) v = normal(random);
  return values;
}

// bf16 gradients that differ by group and step.
std::vector<std::uint16_t> grads_bf16(std::size_t group, std::int64_t step) {
  std::mt19937 random(static_cast<unsigned>(1000 * step + group));
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::vector<std::uint16_t> values(kGroups[group].elements);
  for (auto& v : values) v = cpu_adam::float_to_bf16(normal(random));
  return values;
}

struct Grads {
  explicit Grads(std::int64_t step) {
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      bf16.push_back(grads_bf16(g, step));
      copies.emplace_back(kGroups[g].elements, 0);
    }
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      grad_buffers.push_back(Buffer{bf16[g].data(), bf16[g].size(), DType::bf16});
      copy_buffers.push_back(Buffer{copies[g].data(), copies[g].size(), DType::bf16});
    }
  }
  std::vector<std::vector<std::uint16_t>> bf16;
  std::vector<std::vector<std::uint16_t>> copies;
  std::vector<Buffer> grad_buffers;
  std::vector<Buffer> copy_buffers;
};

OptimizerSwapperOptions adamw(bool overlap) {
  OptimizerSwapperOptions options;
  options.optimizer.adam.lr = 1e-2f;
  options.optimizer.adam.weight_decay = 0.01f;
  options.overlap = overlap;
  return options;
}

// Pipelined AdamW committing once `bytes` were written (0: each sub-group).
OptimizerSwapperOptions adamw_committing_after(std::uint64_t bytes) {
  OptimizerSwapperOptions options = adamw(true);
  options.commit_bytes = bytes;
  return options;
}

// The expected states after `steps` steps: CpuOptimizer on plain vectors.
struct Reference {
  explicit Reference(std::int64_t steps, const OptimizerSettings& settings = {}) {
    cpu_adam::CpuOptimizer optimizer(2);
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      params.push_back(initial_params(g));
      exp_avg.emplace_back(kGroups[g].elements, 0.0f);
      exp_avg_sq.emplace_back(kGroups[g].elements, 0.0f);
    }
    for (std::int64_t step = 1; step <= steps; ++step) {
      Grads grads(step);
      for (std::size_t g = 0; g < kGroups.size(); ++g) {
        cpu_adam::TensorState state;
        const std::size_t n = kGroups[g].elements;
        state.param = {params[g].data(), n, DType::f32};
        state.grad = grads.grad_buffers[g];
        state.param_copy = grads.copy_buffers[g];
        state.exp_avg = {exp_avg[g].data(), n, DType::f32};
        state.exp_avg_sq = {exp_avg_sq[g].data(), n, DType::f32};
        OptimizerSwapperOptions options = adamw(true);
        options.optimizer = settings.kind == OptimizerKind::adam ? adamw(true).optimizer : settings;
        switch (options.optimizer.kind) {
          case OptimizerKind::adam:
            optimizer.adam_step(options.optimizer.adam, step, std::span(&state, 1));
            break;
          case OptimizerKind::adagrad:
            state.exp_avg = {};
            optimizer.adagrad_step(options.optimizer.adagrad, step, std::span(&state, 1));
            break;
          case OptimizerKind::lion:
            state.exp_avg_sq = {};
            optimizer.lion_step(options.optimizer.lion, step, std::span(&state, 1));
            break;
        }
      }
      last_copies = grads.copies;
    }
  }
  std::vector<std::vector<float>> params, exp_avg, exp_avg_sq;
  std::vector<std::vector<std::uint16_t>> last_copies;
};

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

SwapStoreOptions store_options(const std::filesystem::path& dir) {
  SwapStoreOptions options;
  options.directories = {dir / "nvme0", dir / "nvme1"};
  options.aio.block_size = 64 << 10;
  options.grow_bytes = 1 << 20;
  return options;
}

PinnedPoolOptions pool_options(std::uint64_t bytes = 8 << 20) {
  PinnedPoolOptions options;
  options.budget_bytes = bytes;
  options.allow_unpinned = true;
  return options;
}

// Checks every group's param (and Adam's moments) against the reference
// after `reference` steps.
void expect_state(OptimizerSwapper& swapper, std::size_t group, const Reference& reference) {
  std::vector<float> got(kGroups[group].elements);
  swapper.read_params(group, got);
  EXPECT_TRUE(same_bits(got, reference.params[group])) << kGroups[group].name << " param";
  swapper.read_state(group, "exp_avg", got);
  EXPECT_TRUE(same_bits(got, reference.exp_avg[group])) << kGroups[group].name << " exp_avg";
  swapper.read_state(group, "exp_avg_sq", got);
  EXPECT_TRUE(same_bits(got, reference.exp_avg_sq[group])) << kGroups[group].name;
}

TEST(OptimizerSwapper, PipelinedUnpipelinedAndHostMemoryGiveTheSameBits) {
  constexpr std::int64_t kSteps = 4;
  const Reference reference(kSteps);
  for (const std::string mode : {"pipelined", "unpipelined", "host"}) {
    SCOPED_TRACE(mode);
    TempDir dir;
    cpu_adam::CpuOptimizer optimizer(2);
    std::unique_ptr<SwapStore> store;
    std::unique_ptr<PinnedPool> pool;
    std::unique_ptr<OptimizerSwapper> swapper;
    if (mode == "host") {
      swapper = std::make_unique<OptimizerSwapper>(optimizer, kGroups, adamw(true));
    } else {
      store = std::make_unique<SwapStore>(store_options(dir.path()));
      pool = std::make_unique<PinnedPool>(pool_options());
      swapper = std::make_unique<OptimizerSwapper>(*store, *pool, optimizer, kGroups,
                                                   adamw(mode == "pipelined"));
    }
    for (std::size_t g = 0; g < kGroups.size(); ++g) swapper->initialize(g, initial_params(g));
    std::vector<std::vector<std::uint16_t>> copies;
    for (std::int64_t step = 1; step <= kSteps; ++step) {
      Grads grads(step);
      swapper->step(grads.grad_buffers, grads.copy_buffers);
      copies = grads.copies;
    }
    EXPECT_EQ(swapper->step_count(), kSteps);
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      expect_state(*swapper, g, reference);
      EXPECT_EQ(copies[g], reference.last_copies[g]) << "bf16 copy of " << kGroups[g].name;
    }
    if (store) {
      const auto& stats = swapper->last_step_stats();
      std::uint64_t elements = 0;
      for (const auto& group : kGroups) elements += group.elements;
      EXPECT_EQ(stats.bytes_read, 3 * 4 * elements);
      EXPECT_EQ(stats.bytes_written, 3 * 4 * elements);
      EXPECT_EQ(store->find("layers.2/exp_avg")->version, kSteps);
    }
  }
}

TEST(OptimizerSwapper, AdagradAndLionStepThroughTheStoreAsInMemory) {
  for (const OptimizerKind kind : {OptimizerKind::adagrad, OptimizerKind::lion}) {
    TempDir dir;
    OptimizerSwapperOptions options;
    options.optimizer.kind = kind;
    cpu_adam::CpuOptimizer optimizer(2);
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, options);
    OptimizerSwapper in_memory(optimizer, kGroups, options);
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      swapper.initialize(g, initial_params(g));
      in_memory.initialize(g, initial_params(g));
    }
    for (std::int64_t step = 1; step <= 3; ++step) {
      Grads grads(step);
      swapper.step(grads.grad_buffers);
      in_memory.step(grads.grad_buffers);
    }
    const Reference reference(3, options.optimizer);
    const std::string state = kind == OptimizerKind::lion ? "exp_avg" : "exp_avg_sq";
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      std::vector<float> a(kGroups[g].elements), b(kGroups[g].elements);
      swapper.read_params(g, a);
      in_memory.read_params(g, b);
      EXPECT_TRUE(same_bits(a, b));
      EXPECT_TRUE(same_bits(a, reference.params[g]));
      swapper.read_state(g, state, a);
      in_memory.read_state(g, state, b);
      EXPECT_TRUE(same_bits(a, b)) << state;
    }
    std::vector<float> out(kGroups[0].elements);
    EXPECT_THROW(swapper.read_state(0, kind == OptimizerKind::lion ? "exp_avg_sq" : "exp_avg", out),
                 Error);
  }
}

TEST(OptimizerSwapper, StatesSurviveACleanExitAndTheRunContinuesExactly) {
  TempDir dir;
  cpu_adam::CpuOptimizer optimizer(2);
  {
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw(true));
    for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, initial_params(g));
    for (std::int64_t step = 1; step <= 2; ++step) {
      Grads grads(step);
      swapper.step(grads.grad_buffers, grads.copy_buffers);
    }
  }
  SwapStore store(store_options(dir.path()));
  PinnedPool pool(pool_options());
  OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw(true));
  EXPECT_EQ(swapper.step_count(), 2);
  EXPECT_FALSE(swapper.recovery().interrupted);
  for (std::int64_t step = 3; step <= 4; ++step) {
    Grads grads(step);
    swapper.step(grads.grad_buffers, grads.copy_buffers);
  }
  const Reference reference(4);
  for (std::size_t g = 0; g < kGroups.size(); ++g) expect_state(swapper, g, reference);
}

// commit_bytes 0 commits each sub-group; 300 KiB commits sub-groups 0-2
// together (layers.2 alone passes it), then 3-4 with the step's end: the
// kill after sub-group 2's commit finds the same state either way.
class OptimizerSwapperKilled : public ::testing::TestWithParam<std::uint64_t> {};

TEST_P(OptimizerSwapperKilled, AProcessKilledMidStepReopensDetectablyIncompleteAndIntact) {
  TempDir dir;
  const int status = testing::run_in_child([&] {
    cpu_adam::CpuOptimizer optimizer(2);
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    OptimizerSwapperOptions options = adamw_committing_after(GetParam());
    std::int64_t* current_step = nullptr;
    options.after_group_committed = [&](std::size_t group) {
      // Die in step 3 once sub-groups 0..2 are durable, with the writes of
      // sub-groups 3 and 4 in flight.
      if (current_step != nullptr && *current_step == 3 && group == 2) {
        ::kill(::getpid(), SIGKILL);
      }
    };
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, options);
    for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, initial_params(g));
    std::int64_t step = 1;
    current_step = &step;
    for (; step <= 4; ++step) {
      Grads grads(step);
      swapper.step(grads.grad_buffers, grads.copy_buffers);
    }
    return 0;
  });
  ASSERT_EQ(status, 128 + SIGKILL);

  cpu_adam::CpuOptimizer optimizer(2);
  SwapStore store(store_options(dir.path()));
  PinnedPool pool(pool_options());
  OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw(true));
  const auto& recovery = swapper.recovery();
  EXPECT_EQ(recovery.finished_step, 2);
  ASSERT_TRUE(recovery.interrupted);
  EXPECT_EQ(*recovery.interrupted, 3);
  EXPECT_EQ(recovery.group_steps, (std::vector<std::int64_t>{3, 3, 3, 2, 2}));
  const Reference at_two(2);
  const Reference at_three(3);
  for (std::size_t g = 0; g < kGroups.size(); ++g) {
    expect_state(swapper, g, g <= 2 ? at_three : at_two);  // every checksum verified too
  }
  Grads grads(3);
  try {
    swapper.step(grads.grad_buffers);
    FAIL() << "an interrupted step was stepped over";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::invalid);
    EXPECT_NE(std::string(error.what()).find("interrupted"), std::string::npos) << error.what();
  }
  // Restored from the trainer's checkpoint (here: the reference at step 2,
  // params and moments), the run goes on and matches the uninterrupted one.
  for (std::size_t g = 0; g < kGroups.size(); ++g) {
    const std::vector<std::span<const float>> moments = {at_two.exp_avg[g], at_two.exp_avg_sq[g]};
    swapper.initialize(g, at_two.params[g], 2, moments);
  }
  EXPECT_EQ(swapper.step_count(), 2);
  EXPECT_FALSE(swapper.recovery().interrupted);
  for (std::int64_t step = 3; step <= 4; ++step) {
    Grads next(step);
    swapper.step(next.grad_buffers, next.copy_buffers);
  }
  const Reference at_four(4);
  for (std::size_t g = 0; g < kGroups.size(); ++g) expect_state(swapper, g, at_four);
}

INSTANTIATE_TEST_SUITE_P(CommitBytes, OptimizerSwapperKilled, ::testing::Values(0u, 300u << 10));

// Once armed, the write transfer numbered `fail_at` (counting from 1)
// fails with EIO; everything else goes to the disk.
class ArmableDevice final : public aio::SyncDevice {
 public:
  ArmableDevice(std::atomic<bool>& armed, std::atomic<int>& fail_at) : armed_(armed), fail_at_(fail_at) {}
  std::int64_t transfer(aio::Op op, const aio::File& file, std::uint64_t offset,
                        std::byte* buffer, std::uint64_t length) override {
    if (op == aio::Op::write && armed_.load() && --fail_at_ == 0) return -EIO;
    return inner_.transfer(op, file, offset, buffer, length);
  }
  std::string_view name() const override { return "armable"; }

 private:
  std::atomic<bool>& armed_;
  std::atomic<int>& fail_at_;
  aio::PosixDevice inner_;
};

TEST(OptimizerSwapper, AnIoErrorMidStepLeavesNoTornSubGroupAndBlocksTheNextStep) {
  // Fail one write piece at several points of step 2: in every case each
  // sub-group is wholly at step 1 or wholly at step 2, as recovery() says,
  // before and after a reopen, and step() refuses to run over it.
  for (const auto& [fail_at, commit_bytes] : std::vector<std::pair<int, std::uint64_t>>{
           {1, 0}, {8, 0}, {10, 0}, {20, 0}, {1, 300 << 10}, {10, 300 << 10}, {20, 300 << 10}}) {
    SCOPED_TRACE(fmt::format("fail_at {}, commit_bytes {}", fail_at, commit_bytes));
    TempDir dir;
    std::atomic<bool> armed{false};
    std::atomic<int> countdown{fail_at};
    const auto options = store_options(dir.path());
    const auto engine = [&](std::size_t) {
      return std::make_unique<aio::ThreadPoolEngine>(
          options.aio, std::make_unique<ArmableDevice>(armed, countdown), 1, "armable");
    };
    const Reference at_one(1);
    const Reference at_two(2);
    std::vector<std::int64_t> group_steps;
    {
      SwapStore store(options, engine);
      cpu_adam::CpuOptimizer optimizer(2);
      PinnedPool pool(pool_options());
      OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw_committing_after(commit_bytes));
      for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, initial_params(g));
      Grads first(1);
      swapper.step(first.grad_buffers, first.copy_buffers);
      armed = true;
      Grads second(2);
      try {
        swapper.step(second.grad_buffers, second.copy_buffers);
        FAIL() << "the write error was lost";
      } catch (const Error& error) {
        EXPECT_EQ(error.kind(), ErrorKind::io);
        EXPECT_EQ(error.error_number(), EIO);
        EXPECT_NE(std::string(error.what()).find("layers."), std::string::npos) << error.what();
        EXPECT_NE(std::string(error.what()).find("zinf.volume"), std::string::npos) << error.what();
      }
      armed = false;
      EXPECT_EQ(swapper.step_count(), 1);
      ASSERT_TRUE(swapper.recovery().interrupted);
      group_steps = swapper.recovery().group_steps;
      for (std::size_t g = 0; g < kGroups.size(); ++g) {
        ASSERT_TRUE(group_steps[g] == 1 || group_steps[g] == 2) << group_steps[g];
        expect_state(swapper, g, group_steps[g] == 2 ? at_two : at_one);
      }
      EXPECT_THROW(swapper.step(second.grad_buffers), Error);  // refuses: interrupted
      EXPECT_EQ(store.in_flight(), 0u);
    }
    SwapStore store(options);
    cpu_adam::CpuOptimizer optimizer(2);
    PinnedPool pool(pool_options());
    OptimizerSwapper reopened(store, pool, optimizer, kGroups, adamw(true));
    EXPECT_EQ(reopened.recovery().group_steps, group_steps);
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      expect_state(reopened, g, group_steps[g] == 2 ? at_two : at_one);
    }
  }
}

TEST(OptimizerSwapper, SmallSubGroupsCommitTogetherAndStepAsWhenEachCommits) {
  // A small sub_group_size makes thousands of sub-groups; a commit per
  // sub-group (manifest, flushes) then costs more than the step. With
  // commit_bytes the sub-groups commit in batches: the same bits, a few
  // commits a step, and every state readable after a reopen.
  const Reference reference(3);
  std::vector<std::uint64_t> commits;
  for (const std::uint64_t commit_bytes : {std::uint64_t{0}, std::uint64_t{300} << 10, std::uint64_t{256} << 20}) {
    SCOPED_TRACE(commit_bytes);
    TempDir dir;
    {
      SwapStore store(store_options(dir.path()));
      cpu_adam::CpuOptimizer optimizer(2);
      PinnedPool pool(pool_options());
      OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw_committing_after(commit_bytes));
      for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, initial_params(g));
      const std::uint64_t before = store.stats().commits;
      for (std::int64_t step = 1; step <= 3; ++step) {
        Grads grads(step);
        swapper.step(grads.grad_buffers, grads.copy_buffers);
      }
      commits.push_back(store.stats().commits - before);
      for (std::size_t g = 0; g < kGroups.size(); ++g) expect_state(swapper, g, reference);
    }
    SwapStore store(store_options(dir.path()));
    cpu_adam::CpuOptimizer optimizer(2);
    PinnedPool pool(pool_options());
    OptimizerSwapper reopened(store, pool, optimizer, kGroups, adamw(true));
    EXPECT_EQ(reopened.step_count(), 3);
    EXPECT_EQ(reopened.recovery().group_steps, std::vector<std::int64_t>(kGroups.size(), 3));
    for (std::size_t g = 0; g < kGroups.size(); ++g) expect_state(reopened, g, reference);
  }
  // Per step: the marker, one commit per sub-group (or per batch, or
  // none), and the step's end.
  EXPECT_EQ(commits[0], 3 * (2 + kGroups.size()));
  EXPECT_LT(commits[1], commits[0]);
  EXPECT_GT(commits[1], commits[2]);
  EXPECT_EQ(commits[2], 3 * 2u);
}

// A swapper of kGroups over the store in `dir`.
struct OnStore {
  OnStore(const std::filesystem::path& dir, const OptimizerSwapperOptions& options)
      : store(store_options(dir)), swapper(store, pool, optimizer, kGroups, options) {}
  SwapStore store;
  cpu_adam::CpuOptimizer optimizer{2};
  PinnedPool pool{pool_options()};
  OptimizerSwapper swapper;
};

// DeepSpeed keeps sub-groups too small for an aio request in host memory;
// so does resident_below_bytes. Mixed with swapped ones, every sub-group
// steps to the same bits, the param copies come in sub-group order, only
// the swapped ones move bytes, and a reopen finds the resident ones
// uninitialised (they were never stored).
TEST(OptimizerSwapper, SubGroupsUnderResidentBelowBytesStayInMemoryAndStepInOrder) {
  constexpr std::int64_t kSteps = 3;
  const Reference reference(kSteps);
  // layers.0 (4000 B), layers.1 (16388 B) and layers.3 (28 B) under 20000;
  // everything under 1 MiB.
  for (const std::uint64_t resident_below : {std::uint64_t{20000}, std::uint64_t{1} << 20}) {
    for (const bool overlap : {true, false}) {
      SCOPED_TRACE(fmt::format("resident below {}, {}", resident_below, overlap ? "pipelined" : "in turn"));
      TempDir dir;
      OptimizerSwapperOptions options = adamw(overlap);
      options.resident_below_bytes = resident_below;
      std::vector<std::size_t> swapped;
      {
        OnStore on_store(dir.path(), options);
        SwapStore& store = on_store.store;
        OptimizerSwapper& swapper = on_store.swapper;
        std::uint64_t swapped_elements = 0;
        for (std::size_t g = 0; g < kGroups.size(); ++g) {
          EXPECT_EQ(swapper.resident(g), kGroups[g].elements * 4 < resident_below) << kGroups[g].name;
          if (!swapper.resident(g)) {
            swapped.push_back(g);
            swapped_elements += kGroups[g].elements;
          }
          swapper.initialize(g, initial_params(g));
        }
        if (swapped.empty()) {
          EXPECT_EQ(swapper.pinned_bytes(), 0u);
        }
        std::vector<std::vector<std::uint16_t>> copies;
        for (std::int64_t step = 1; step <= kSteps; ++step) {
          Grads grads(step);
          std::vector<std::size_t> order;
          swapper.step(grads.grad_buffers, grads.copy_buffers, [&](std::size_t g) { order.push_back(g); });
          EXPECT_EQ(order, (std::vector<std::size_t>{0, 1, 2, 3, 4}));
          copies = grads.copies;
        }
        for (std::size_t g = 0; g < kGroups.size(); ++g) {
          expect_state(swapper, g, reference);
          EXPECT_EQ(copies[g], reference.last_copies[g]) << "bf16 copy of " << kGroups[g].name;
          EXPECT_EQ(store.find(kGroups[g].name + "/param").has_value(), !swapper.resident(g)) << kGroups[g].name;
        }
        EXPECT_EQ(swapper.last_step_stats().bytes_read, 3 * 4 * swapped_elements);
        EXPECT_EQ(swapper.last_step_stats().bytes_written, 3 * 4 * swapped_elements);
      }
      OnStore on_store(dir.path(), options);
      OptimizerSwapper& reopened = on_store.swapper;
      for (std::size_t g = 0; g < kGroups.size(); ++g) {
        const bool stored = std::find(swapped.begin(), swapped.end(), g) != swapped.end();
        EXPECT_EQ(reopened.recovery().group_steps[g], stored ? kSteps : -1) << kGroups[g].name;
      }
      Grads grads(kSteps + 1);
      EXPECT_THROW(reopened.step(grads.grad_buffers), Error);  // the resident ones need initialize()
    }
  }
}

TEST(OptimizerSwapper, TooSmallAPinnedBudgetFailsBeforeStepZeroNamingTheBytes) {
  TempDir dir;
  SwapStore store(store_options(dir.path()));
  PinnedPool pool(pool_options(1 << 20));
  cpu_adam::CpuOptimizer optimizer(1);
  const std::uint64_t needed =
      OptimizerSwapper::pinned_bytes_needed(kGroups, OptimizerKind::adam, true, 4096);
  EXPECT_EQ(needed, 3u * 3u * 65536u * 4u);
  try {
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw(true));
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::resource);
    EXPECT_NE(std::string(error.what()).find("layers.4"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("2359296 bytes"), std::string::npos) << error.what();
  }
  // Unpipelined needs a third of it and fits.
  EXPECT_NO_THROW(OptimizerSwapper(store, pool, optimizer, kGroups, adamw(false)));
}

TEST(OptimizerSwapper, BadStepInputsAreRefusedBeforeAnyStateChanges) {
  cpu_adam::CpuOptimizer optimizer(1);
  OptimizerSwapper swapper(optimizer, kGroups, adamw(true));
  Grads grads(1);
  EXPECT_THROW(swapper.step(grads.grad_buffers), Error);  // not initialized
  for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, initial_params(g));
  EXPECT_THROW(swapper.step(std::span(grads.grad_buffers).first(2)), Error);
  auto wrong = grads.grad_buffers;
  wrong[1].count -= 1;
  EXPECT_THROW(swapper.step(wrong), Error);
  EXPECT_THROW(swapper.initialize(0, std::vector<float>(3)), Error);
  EXPECT_EQ(swapper.step_count(), 0);
  swapper.step(grads.grad_buffers);
  EXPECT_EQ(swapper.step_count(), 1);
}

}  // namespace
}  // namespace zinf::swap

namespace zinf::swap {
namespace {

// Compressed moments: the store, the host tier, pipelined or not, and a
// plain CpuOptimizer over the same bytes agree bit for bit; the disk moves
// the compressed size; a store in another format is refused by key.
TEST(OptimizerSwapperCompressed, EveryPathGivesTheKernelsBitsAndMovesTheCompressedBytes) {
  for (const auto format : {cpu_adam::MomentFormat::bf16, cpu_adam::MomentFormat::int8}) {
    SCOPED_TRACE(cpu_adam::to_string(format));
    TempDir dir;
    cpu_adam::CpuOptimizer optimizer(2);
    OptimizerSwapperOptions options = adamw(true);
    options.moment_format = format;
    OptimizerSwapperOptions unpipelined = options;
    unpipelined.overlap = false;
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, options);
    TempDir dir2;
    SwapStore store2(store_options(dir2.path()));
    PinnedPool pool2(pool_options());
    OptimizerSwapper serial(store2, pool2, optimizer, kGroups, unpipelined);
    OptimizerSwapper host(optimizer, kGroups, options);
    // The reference: the kernels on plain buffers, seeded by sub-group.
    std::vector<std::vector<float>> params;
    std::vector<std::vector<std::uint8_t>> m, v;
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      for (OptimizerSwapper* s : {&swapper, &serial, &host}) s->initialize(g, initial_params(g));
      params.push_back(initial_params(g));
      m.emplace_back(cpu_adam::moment_bytes(format, kGroups[g].elements), 0);
      v.emplace_back(cpu_adam::moment_bytes(format, kGroups[g].elements), 0);
    }
    std::uint64_t elements = 0;
    for (const auto& group : kGroups) elements += group.elements;
    for (std::int64_t step = 1; step <= 3; ++step) {
      Grads grads(step), grads2(step), grads3(step);
      swapper.step(grads.grad_buffers, grads.copy_buffers);
      serial.step(grads2.grad_buffers, grads2.copy_buffers);
      host.step(grads3.grad_buffers, grads3.copy_buffers);
      EXPECT_EQ(grads.copies, grads2.copies);
      EXPECT_EQ(grads.copies, grads3.copies);
      const std::uint64_t moments = 2 * (format == cpu_adam::MomentFormat::bf16 ? 2 * elements : 0);
      if (format == cpu_adam::MomentFormat::bf16) {
        EXPECT_EQ(swapper.last_step_stats().bytes_written, 4 * elements + moments);
        EXPECT_EQ(swapper.last_step_stats().bytes_read, 4 * elements + moments);
      } else {
        std::uint64_t bytes = 0;
        for (const auto& group : kGroups) bytes += 4 * group.elements + 2 * cpu_adam::moment_bytes(format, group.elements);
        EXPECT_EQ(swapper.last_step_stats().bytes_written, bytes);
        // About half of fp32's 12 bytes per element.
        EXPECT_LT(static_cast<double>(bytes), 0.52 * 12 * static_cast<double>(elements));
      }
      for (std::size_t g = 0; g < kGroups.size(); ++g) {
        cpu_adam::CompressedTensorState state;
        state.param = {params[g].data(), kGroups[g].elements, DType::f32};
        state.grad = grads.grad_buffers[g];
        state.exp_avg = m[g].data();
        state.exp_avg_sq = v[g].data();
        state.seed = g;
        optimizer.adam_step(options.optimizer.adam, step, format, std::span(&state, 1));
      }
    }
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      const std::size_t n = kGroups[g].elements;
      std::vector<float> a(n), b(n), c(n), want_m(n), want_v(n);
      swapper.read_params(g, a);
      serial.read_params(g, b);
      host.read_params(g, c);
      EXPECT_TRUE(same_bits(a, params[g]));
      EXPECT_TRUE(same_bits(b, params[g]));
      EXPECT_TRUE(same_bits(c, params[g]));
      cpu_adam::decode_moment(format, false, m[g].data(), want_m);
      cpu_adam::decode_moment(format, true, v[g].data(), want_v);
      for (OptimizerSwapper* s : {&swapper, &serial, &host}) {
        s->read_state(g, "exp_avg", a);
        EXPECT_TRUE(same_bits(a, want_m));
        s->read_state(g, "exp_avg_sq", a);
        EXPECT_TRUE(same_bits(a, want_v));
      }
    }
  }
}

TEST(OptimizerSwapperCompressed, AStoreInAnotherFormatIsRefusedNamingTheKey) {
  TempDir dir;
  cpu_adam::CpuOptimizer optimizer(1);
  {
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    OptimizerSwapperOptions options = adamw(true);
    options.moment_format = cpu_adam::MomentFormat::int8;
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, options);
    for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, initial_params(g));
  }
  SwapStore store(store_options(dir.path()));
  PinnedPool pool(pool_options());
  try {
    OptimizerSwapper swapper(store, pool, optimizer, kGroups, adamw(true));
    FAIL() << "an int8 store opened as fp32";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_NE(std::string(error.what()).find("zero_optimization.offload_optimizer.state_format"), std::string::npos)
        << error.what();
    EXPECT_NE(std::string(error.what()).find("holds optimizer states in the int8 format, the config asks for fp32"),
              std::string::npos)
        << error.what();
  }
}

TEST(OptimizerSwapperCompressed, CheckpointedStatesComeBackWithinTheirCodesPrecision) {
  cpu_adam::CpuOptimizer optimizer(1);
  OptimizerSwapperOptions options = adamw(true);
  options.moment_format = cpu_adam::MomentFormat::bf16;
  OptimizerSwapper host(optimizer, kGroups, options);
  for (std::size_t g = 0; g < kGroups.size(); ++g) {
    std::vector<float> m = initial_params(g), v = initial_params(g);
    for (auto& x : v) x = x * x;
    const std::vector<std::span<const float>> states = {m, v};
    host.initialize(g, initial_params(g), 5, states);
    std::vector<float> got(m.size());
    host.read_state(g, "exp_avg_sq", got);
    for (std::size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], v[i], std::abs(v[i]) / 128) << i;
  }
  EXPECT_EQ(host.step_count(), 5);
}

TEST(OptimizerSwapperCompressed, LionAndAdagradRefuseCompressedStates) {
  cpu_adam::CpuOptimizer optimizer(1);
  OptimizerSwapperOptions options;
  options.optimizer.kind = OptimizerKind::lion;
  options.moment_format = cpu_adam::MomentFormat::int8;
  try {
    OptimizerSwapper host(optimizer, kGroups, options);
    FAIL();
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("state_format int8 compresses Adam's moments; this optimizer is Lion"),
              std::string::npos)
        << error.what();
  }
}

}  // namespace
}  // namespace zinf::swap

namespace zinf::swap {
namespace {

// Param groups: every element steps exactly as the kernel steps it alone
// with its group's settings, for AdamW, L2 Adam, Lion and Adagrad, through
// the store and in host memory; ranges that differ in weight decay alone
// share a kernel call (decayed apart), the others get one each; a group's
// lr changed between steps (a scheduler) applies from the next step.
const std::vector<SubGroup> kRangedGroups = {{"g0", 1000}, {"g1", 300}};
const std::vector<std::vector<ParamGroupRange>> kRanges = {
    {{0, 100, 1}, {100, 512, 0}, {512, 768, 3}, {768, 1000, 4}}, {{0, 300, 2}}};

std::vector<ParamGroupSettings> test_param_groups() {
  std::vector<ParamGroupSettings> groups(5);
  groups[1].weight_decay = 0.0f;
  groups[2].weight_decay = 0.05f;
  groups[3].lr = 0.02f;
  groups[3].weight_decay = 0.0f;
  groups[4].lr = 0.005f;
  groups[4].beta1 = 0.8f;
  groups[4].beta2 = 0.99f;
  groups[4].eps = 1e-6f;
  groups[4].weight_decay = 0.1f;
  return groups;
}

TEST(OptimizerSwapperParamGroups, EachRangeStepsAsTheKernelWithItsGroupsSettings) {
  for (const OptimizerKind kind : {OptimizerKind::adam, OptimizerKind::adagrad, OptimizerKind::lion}) {
    for (const bool adamw_mode : {true, false}) {
      if (kind != OptimizerKind::adam && !adamw_mode) continue;
      SCOPED_TRACE(::testing::Message() << "kind " << static_cast<int>(kind) << " adamw " << adamw_mode);
      OptimizerSwapperOptions options;
      options.optimizer.kind = kind;
      options.optimizer.adam.adamw_mode = adamw_mode;
      options.optimizer.adam.weight_decay = options.optimizer.lion.weight_decay =
          options.optimizer.adagrad.weight_decay = 0.3f;
      options.optimizer.adam.lr = options.optimizer.lion.lr = options.optimizer.adagrad.lr = 0.01f;
      cpu_adam::CpuOptimizer optimizer(2);
      TempDir dir;
      SwapStore store(store_options(dir.path()));
      PinnedPool pool(pool_options());
      OptimizerSwapper on_store(store, pool, optimizer, kRangedGroups, options);
      OptimizerSwapper host(optimizer, kRangedGroups, options);
      auto param_groups = test_param_groups();
      for (OptimizerSwapper* s : {&on_store, &host}) {
        for (std::size_t k = 0; k < param_groups.size(); ++k) s->set_param_group(k, param_groups[k]);
      }
      std::vector<std::vector<float>> want(kRangedGroups.size()), m(kRangedGroups.size()), v(kRangedGroups.size());
      for (std::size_t g = 0; g < kRangedGroups.size(); ++g) {
        std::vector<float> start(kRangedGroups[g].elements);
        for (std::size_t i = 0; i < start.size(); ++i) start[i] = 0.5f + 0.001f * static_cast<float>(i);
        on_store.initialize(g, start);
        host.initialize(g, start);
        on_store.set_param_group_ranges(g, kRanges[g]);
        host.set_param_group_ranges(g, kRanges[g]);
        want[g] = start;
        m[g].assign(start.size(), 0.0f);
        v[g].assign(start.size(), 0.0f);
      }
      for (std::int64_t step = 1; step <= 3; ++step) {
        if (step == 3) {  // a scheduler moves group 3's lr
          param_groups[3].lr = 0.03f;
          on_store.set_param_group(3, param_groups[3]);
          host.set_param_group(3, param_groups[3]);
        }
        std::vector<std::vector<float>> grads(kRangedGroups.size()), grads2(kRangedGroups.size());
        std::vector<cpu_adam::Buffer> buffers, buffers2;
        for (std::size_t g = 0; g < kRangedGroups.size(); ++g) {
          grads[g].resize(kRangedGroups[g].elements);
          for (std::size_t i = 0; i < grads[g].size(); ++i) grads[g][i] = 0.01f * std::sin(static_cast<float>(i + 7 * step));
          grads2[g] = grads[g];
          buffers.push_back({grads[g].data(), grads[g].size(), DType::f32});
          buffers2.push_back({grads2[g].data(), grads2[g].size(), DType::f32});
          // The reference: the kernel over each range alone, with its group's settings.
          for (const auto& range : kRanges[g]) {
            std::vector<float> g_copy(grads[g].begin() + range.begin, grads[g].begin() + range.end);
            cpu_adam::TensorState state;
            const std::size_t n = range.end - range.begin;
            state.param = {want[g].data() + range.begin, n, DType::f32};
            state.grad = {g_copy.data(), n, DType::f32};
            state.exp_avg = {m[g].data() + range.begin, n, DType::f32};
            state.exp_avg_sq = {v[g].data() + range.begin, n, DType::f32};
            const auto settings = resolve_settings(options.optimizer, param_groups[range.param_group]);
            if (kind == OptimizerKind::adam) optimizer.adam_step(settings.adam, step, std::span(&state, 1));
            if (kind == OptimizerKind::lion) {
              state.exp_avg_sq = {};
              optimizer.lion_step(settings.lion, step, std::span(&state, 1));
            }
            if (kind == OptimizerKind::adagrad) {
              state.exp_avg_sq = state.exp_avg;
              state.exp_avg = {};
              optimizer.adagrad_step(settings.adagrad, step, std::span(&state, 1));
            }
          }
        }
        on_store.step(buffers);
        host.step(buffers2);
      }
      for (std::size_t g = 0; g < kRangedGroups.size(); ++g) {
        std::vector<float> a(kRangedGroups[g].elements), b(kRangedGroups[g].elements);
        on_store.read_params(g, a);
        host.read_params(g, b);
        EXPECT_TRUE(same_bits(a, want[g])) << "store, group " << g;
        EXPECT_TRUE(same_bits(b, want[g])) << "host, group " << g;
      }
    }
  }
}

// Compressed moments: each run of a sub-group steps as the compressed
// kernel steps that range of it (8-bit codes keep the sub-group's layout).
TEST(OptimizerSwapperParamGroups, CompressedMomentsStepEachRunWithItsSettings) {
  for (const auto format : {cpu_adam::MomentFormat::bf16, cpu_adam::MomentFormat::int8}) {
    SCOPED_TRACE(cpu_adam::to_string(format));
    OptimizerSwapperOptions options;
    options.moment_format = format;
    options.optimizer.adam.weight_decay = 0.3f;
    cpu_adam::CpuOptimizer optimizer(2);
    TempDir dir;
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    OptimizerSwapper on_store(store, pool, optimizer, kRangedGroups, options);
    const auto param_groups = test_param_groups();
    for (std::size_t k = 0; k < param_groups.size(); ++k) on_store.set_param_group(k, param_groups[k]);
    std::vector<std::vector<float>> want(kRangedGroups.size());
    std::vector<std::vector<std::byte>> m(kRangedGroups.size()), v(kRangedGroups.size());
    for (std::size_t g = 0; g < kRangedGroups.size(); ++g) {
      const std::size_t n = kRangedGroups[g].elements;
      want[g].resize(n);
      for (std::size_t i = 0; i < n; ++i) want[g][i] = 0.5f + 0.001f * static_cast<float>(i);
      on_store.initialize(g, want[g]);
      on_store.set_param_group_ranges(g, kRanges[g]);
      m[g].assign(cpu_adam::moment_bytes(format, n), std::byte{0});
      v[g].assign(cpu_adam::moment_bytes(format, n), std::byte{0});
    }
    for (std::int64_t step = 1; step <= 3; ++step) {
      std::vector<std::vector<float>> grads(kRangedGroups.size());
      std::vector<cpu_adam::Buffer> buffers;
      for (std::size_t g = 0; g < kRangedGroups.size(); ++g) {
        const std::size_t n = kRangedGroups[g].elements;
        grads[g].resize(n);
        for (std::size_t i = 0; i < n; ++i) grads[g][i] = 0.01f * std::cos(static_cast<float>(i + 3 * step));
        buffers.push_back({grads[g].data(), n, DType::f32});
      }
      // The reference, in the swapper's runs: g0 [0, 512) decays apart
      // (groups 1 and 0 differ in decay alone), [512, 768) and [768, 1000)
      // alone (another lr); g1 whole.
      struct RefRun {
        std::size_t group, begin, end, settings_group;
      };
      const std::vector<RefRun> runs = {{0, 0, 512, 0}, {0, 512, 768, 3}, {0, 768, 1000, 4}, {1, 0, 300, 2}};
      std::vector<std::vector<float>> ref_grads = grads;
      // Decoupled decay of group 0's range [100, 512) (the run's only decayed range).
      const float decay = static_cast<float>(1.0 - static_cast<double>(0.001f) * 0.3f);
      for (std::size_t i = 100; i < 512; ++i) want[0][i] = want[0][i] * decay;
      for (const RefRun& run : runs) {
        const std::size_t n = kRangedGroups[run.group].elements;
        auto settings = resolve_settings(options.optimizer, param_groups[run.settings_group]);
        if (run.begin == 0 && run.group == 0) settings.adam.weight_decay = 0.0f;  // decayed above
        cpu_adam::CompressedTensorState state;
        state.seed = run.group;
        if (format == cpu_adam::MomentFormat::int8) {
          state.param = {want[run.group].data(), n, DType::f32};
          state.grad = {ref_grads[run.group].data(), n, DType::f32};
          state.exp_avg = m[run.group].data();
          state.exp_avg_sq = v[run.group].data();
          state.begin = run.begin;
          state.end = run.end;
        } else {
          const std::size_t count = run.end - run.begin;
          state.param = {want[run.group].data() + run.begin, count, DType::f32};
          state.grad = {ref_grads[run.group].data() + run.begin, count, DType::f32};
          state.exp_avg = m[run.group].data() + 2 * run.begin;
          state.exp_avg_sq = v[run.group].data() + 2 * run.begin;
        }
        optimizer.adam_step(settings.adam, step, format, std::span(&state, 1));
      }
      on_store.step(buffers);
    }
    for (std::size_t g = 0; g < kRangedGroups.size(); ++g) {
      std::vector<float> got(kRangedGroups[g].elements), want_m(got.size());
      on_store.read_params(g, got);
      EXPECT_TRUE(same_bits(got, want[g])) << "group " << g;
      on_store.read_state(g, "exp_avg", got);
      cpu_adam::decode_moment(format, false, m[g].data(), want_m);
      EXPECT_TRUE(same_bits(got, want_m)) << "group " << g;
    }
  }
}

// 8-bit moments: a group with another lr may begin anywhere, inside a
// moment block too; each element steps with its own group's lr (the group
// with lr 0 keeps its params exactly, though it shares a block with the
// moving one).
TEST(OptimizerSwapperParamGroups, GroupsWithAnotherLrMayMeetInsideAnInt8Block) {
  OptimizerSwapperOptions options;
  options.moment_format = cpu_adam::MomentFormat::int8;
  cpu_adam::CpuOptimizer optimizer(2);
  OptimizerSwapper host(optimizer, {{"g0", 1000}}, options);
  ParamGroupSettings moving;
  moving.lr = 0.1f;
  moving.weight_decay = 0.0f;
  ParamGroupSettings still = moving;
  still.lr = 0.0f;
  host.set_param_group(0, moving);
  host.set_param_group(1, still);
  host.set_param_group_ranges(0, {{0, 100, 0}, {100, 1000, 1}});
  std::vector<float> params(1000);
  for (std::size_t i = 0; i < params.size(); ++i) params[i] = 0.001f * static_cast<float>(i);
  host.initialize(0, params);
  std::vector<float> grad(1000, 0.5f);
  for (int step = 0; step < 3; ++step) {
    const cpu_adam::Buffer grads[] = {{grad.data(), grad.size(), cpu_adam::DType::f32}};
    host.step(grads);
  }
  std::vector<float> after(1000);
  host.read_params(0, after);
  // Adam moves by lr a step for a steady gradient (m / sqrt(v) = 1, to the
  // 8-bit codes' precision: measured 0.5%).
  for (std::size_t i = 0; i < 100; ++i) EXPECT_NEAR(after[i], params[i] - 3 * 0.1f, 0.015f) << i;
  for (std::size_t i = 100; i < 1000; ++i) ASSERT_EQ(after[i], params[i]) << i;
}

TEST(OptimizerSwapperParamGroups, BadRangesAndSettingsAreRefused) {
  cpu_adam::CpuOptimizer optimizer(1);
  OptimizerSwapper host(optimizer, {{"g0", 100}}, OptimizerSwapperOptions{});
  host.set_param_group(0, {});
  host.set_param_group(1, {});
  EXPECT_THROW(host.set_param_group_ranges(0, {{0, 50, 0}}), Error);
  EXPECT_THROW(host.set_param_group_ranges(0, {{0, 50, 0}, {60, 100, 1}}), Error);
  EXPECT_THROW(host.set_param_group_ranges(0, {{0, 100, 2}}), Error);  // no group 2
  EXPECT_NO_THROW(host.set_param_group_ranges(0, {{0, 50, 0}, {50, 100, 1}}));
  std::vector<std::pair<std::string, ParamGroupSettings>> bad_settings(5);
  bad_settings[0].first = "lr";
  bad_settings[0].second.lr = -1.0f;
  bad_settings[1].first = "beta1";
  bad_settings[1].second.beta1 = 1.0f;
  bad_settings[2].first = "beta2";
  bad_settings[2].second.beta2 = std::nanf("");
  bad_settings[3].first = "eps";
  bad_settings[3].second.eps = -1e-8f;
  bad_settings[4].first = "weight_decay";
  bad_settings[4].second.weight_decay = std::numeric_limits<float>::infinity();
  for (const auto& [field, bad] : bad_settings) {
    try {
      host.set_param_group(1, bad);
      FAIL() << field;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("param group 1: " + field), std::string::npos) << error.what();
    }
  }
  EXPECT_THROW(host.set_param_group(3, {}), Error);  // groups are added in order
}

}  // namespace
}  // namespace zinf::swap

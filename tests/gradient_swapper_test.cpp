// The gradient swapper: gradients accumulated on NVMe over micro-steps are
// those accumulated in memory, bit for bit, whatever order the pieces come
// in; the norm needs no read; the optimizer steps from them as from memory;
// clear() forgets them without I/O; an I/O error names file, key and errno;
// what a killed run left is dropped; the pinned budget is checked up front.
#include <atomic>
#include <cstring>
#include <functional>
#include <random>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "aio/thread_pool_engine.hpp"
#include "core/error.hpp"
#include "swap/gradient_swapper.hpp"
#include "swap/optimizer_swapper.hpp"
#include "test_util.hpp"

namespace zinf::swap {
namespace {

using cpu_adam::Buffer;
using cpu_adam::DType;
using testing::TempDir;

const std::vector<SubGroup> kGroups = {{"g0", 1000}, {"g1", 4097}, {"g2", 30001}, {"g3", 7}};

SwapStoreOptions store_options(const std::filesystem::path& dir) {
  SwapStoreOptions options;
  options.directories = {dir / "nvme0", dir / "nvme1"};
  options.aio.block_size = 64 << 10;
  options.grow_bytes = 1 << 20;
  options.sync = false;
  return options;
}

PinnedPoolOptions pool_options(std::uint64_t bytes = 8 << 20) {
  PinnedPoolOptions options;
  options.budget_bytes = bytes;
  options.allow_unpinned = true;
  return options;
}

std::vector<float> random_values(std::size_t n, unsigned seed) {
  std::mt19937 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(n);
  for (auto& v : values) v = normal(random);
  return values;
}

// A piece of a sub-group: [offset, offset + values.size()).
struct Piece {
  std::size_t group;
  std::size_t offset;
  std::vector<float> values;
  float scale;
};

// A micro-step's pieces: every sub-group's elements in chunks, the last
// sub-group first (as backward comes), plus some out of order and some
// twice (a param used by two modules), so sub-groups are reopened.
std::vector<Piece> micro_step_pieces(unsigned seed, bool skip_last_group) {
  std::mt19937 random(seed);
  std::vector<Piece> pieces;
  for (std::size_t g = kGroups.size(); g-- > 0;) {
    if (skip_last_group && g + 1 == kGroups.size()) continue;  // a module with no backward this time
    std::size_t end = kGroups[g].elements;
    while (end > 0) {
      const std::size_t length = std::min<std::size_t>(end, 1 + random() % 3000);
      pieces.push_back({g, end - length, random_values(length, random()), 0.25f + 0.001f * (random() % 100)});
      end -= length;
    }
  }
  for (int extra = 0; extra < 4; ++extra) {
    const std::size_t g = random() % kGroups.size();
    const std::size_t length = 1 + random() % kGroups[g].elements;
    const std::size_t offset = random() % (kGroups[g].elements - length + 1);
    pieces.insert(pieces.begin() + static_cast<std::ptrdiff_t>(random() % pieces.size()),
                  Piece{g, offset, random_values(length, random()), 0.5f});
  }
  return pieces;
}

double sum_of_squares(const std::vector<float>& values) {
  double sum = 0.0;
  for (float v : values) sum += static_cast<double>(v) * v;
  return sum;
}

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

// A gradient swapper over a fresh store of two directories.
struct Swapping {
  explicit Swapping(std::vector<SubGroup> groups = kGroups, std::uint64_t resident_below_bytes = 0)
      : swapper(store, pool, std::move(groups), resident_below_bytes) {}
  TempDir dir;
  SwapStore store{store_options(dir.path())};
  PinnedPool pool{pool_options()};
  GradientSwapper swapper;
};

// Reads every sub-group as the optimizer step does (the next one prefetched
// before this one is awaited) and hands each gradient to `check`.
void read_like_a_step(GradientSwapper& swapper,
                      const std::function<void(std::size_t group, std::span<const float> grad)>& check) {
  const std::size_t groups = swapper.groups().size();
  swapper.prefetch(0);
  for (std::size_t g = 0; g < groups; ++g) {
    if (g + 1 < groups) swapper.prefetch(g + 1);
    const Buffer grad = swapper.await(g);
    check(g, {static_cast<const float*>(grad.data), grad.count});
  }
}

// Sub-groups under this many bytes (g0, g1, g3) stay in host memory when
// it is given: only g2 swaps.
constexpr std::uint64_t kResidentBelow = 20000;

class GradientSwapperResidency : public ::testing::TestWithParam<std::uint64_t> {};

TEST_P(GradientSwapperResidency, AccumulatesOverMicroStepsBitForBitAsMemoryDoes) {
  Swapping setup(kGroups, GetParam());
  GradientSwapper& swapper = setup.swapper;
  for (std::size_t g = 0; g < kGroups.size(); ++g) {
    EXPECT_EQ(swapper.resident(g), kGroups[g].elements * 4 < GetParam()) << kGroups[g].name;
  }
  std::vector<std::vector<float>> reference;
  for (const auto& group : kGroups) reference.emplace_back(group.elements, 0.0f);
  for (unsigned micro = 0; micro < 3; ++micro) {
    for (const Piece& piece : micro_step_pieces(micro + 1, micro == 2)) {
      swapper.accumulate(piece.group, piece.offset, piece.values, piece.scale);
      float* target = reference[piece.group].data() + piece.offset;
      for (std::size_t i = 0; i < piece.values.size(); ++i) target[i] += piece.scale * piece.values[i];
    }
    swapper.end_micro_step();
  }
  for (std::size_t g = 0; g < kGroups.size(); ++g) {
    EXPECT_EQ(swapper.sum_of_squares(g), sum_of_squares(reference[g])) << kGroups[g].name;
  }
  // The step's reads, scaled as clipping asks.
  const float clip = 0.375f;
  swapper.set_read_scale(clip);
  read_like_a_step(swapper, [&](std::size_t g, std::span<const float> grad) {
    ASSERT_EQ(grad.size(), kGroups[g].elements);
    std::vector<float> want = reference[g];
    for (float& v : want) v *= clip;
    EXPECT_TRUE(same_bits(grad, want)) << kGroups[g].name;
  });
  if (GetParam() == 0) {
    // Four sub-groups in two buffers: some were written and read back.
    EXPECT_GT(swapper.bytes_written(), 0u);
    EXPECT_GT(swapper.bytes_read(), 0u);
  } else {
    // One swapped sub-group stays in its buffer: no I/O at all.
    EXPECT_EQ(swapper.bytes_written() + swapper.bytes_read(), 0u);
  }
  // Copies out and clear() as for the swapped ones.
  std::vector<float> out(kGroups[3].elements);
  swapper.copy_out(3, out);
  EXPECT_TRUE(same_bits(out, reference[3]));
  swapper.clear();
  swapper.copy_out(3, out);
  EXPECT_EQ(out, std::vector<float>(kGroups[3].elements, 0.0f));
  EXPECT_EQ(swapper.sum_of_squares(0), 0.0);
}

// safe_get_full_grad between pieces and micro-steps: every sub-group's
// copy is what has accumulated so far (open, held, unwritten, stored or
// never touched), and reading it changes nothing of what accumulates.
TEST(GradientSwapper, CopiesOutWhatHasAccumulatedAndAccumulationGoesOnUnchanged) {
  Swapping setup;
  GradientSwapper& swapper = setup.swapper;
  std::vector<std::vector<float>> reference;
  for (const auto& group : kGroups) reference.emplace_back(group.elements, 0.0f);
  const auto expect_copies = [&](const char* when) {
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      std::vector<float> copy(kGroups[g].elements, -1.0f);
      swapper.copy_out(g, copy);
      EXPECT_TRUE(same_bits(copy, reference[g])) << kGroups[g].name << " " << when;
    }
  };
  expect_copies("before any");
  for (unsigned micro = 0; micro < 2; ++micro) {
    const auto pieces = micro_step_pieces(micro + 7, false);
    for (std::size_t k = 0; k < pieces.size(); ++k) {
      const Piece& piece = pieces[k];
      swapper.accumulate(piece.group, piece.offset, piece.values, piece.scale);
      float* target = reference[piece.group].data() + piece.offset;
      for (std::size_t i = 0; i < piece.values.size(); ++i) target[i] += piece.scale * piece.values[i];
      if (k % 5 == 0) expect_copies("mid micro-step");
    }
    expect_copies("at the end of backward");
    swapper.end_micro_step();
    expect_copies("after the micro-step");
  }
  std::vector<float> wrong(3);
  EXPECT_THROW(swapper.copy_out(0, wrong), Error);
  read_like_a_step(swapper, [&](std::size_t g, std::span<const float> grad) {
    EXPECT_TRUE(same_bits(grad, reference[g])) << kGroups[g].name;
  });
}

TEST(GradientSwapper, ClearForgetsEveryGradientWithoutReadingOrWriting) {
  Swapping setup;
  GradientSwapper& swapper = setup.swapper;
  SwapStore& store = setup.store;
  const auto ones = std::vector<float>(kGroups[1].elements, 1.0f);
  swapper.accumulate(1, 0, ones, 1.0f);
  swapper.accumulate(0, 0, std::span(ones.data(), kGroups[0].elements), 1.0f);
  swapper.accumulate(3, 0, std::span(ones.data(), kGroups[3].elements), 1.0f);  // g1 goes to the store
  swapper.end_micro_step();
  EXPECT_EQ(swapper.sum_of_squares(1), static_cast<double>(kGroups[1].elements));
  EXPECT_FALSE(store.keys().empty());
  swapper.clear();
  EXPECT_EQ(swapper.sum_of_squares(1), 0.0);
  EXPECT_TRUE(store.keys().empty());  // no stale copy holds disk space
  const std::uint64_t read = swapper.bytes_read();
  // A fresh accumulation starts from zeros, not from the old values.
  swapper.accumulate(1, 10, std::span(ones.data(), 5), 2.0f);
  swapper.end_micro_step();
  EXPECT_EQ(swapper.bytes_read(), read);
  EXPECT_EQ(swapper.sum_of_squares(1), 5 * 4.0);
  swapper.prefetch(0);
  swapper.prefetch(1);
  const Buffer none = swapper.await(0);
  for (std::size_t i = 0; i < none.count; ++i) ASSERT_EQ(static_cast<const float*>(none.data)[i], 0.0f);
  const Buffer some = swapper.await(1);
  for (std::size_t i = 0; i < some.count; ++i) {
    ASSERT_EQ(static_cast<const float*>(some.data)[i], i >= 10 && i < 15 ? 2.0f : 0.0f) << i;
  }
}

// The step begins with the sub-groups backward wrote last (the first of
// the partition): still in the buffers, they are not read back.
TEST(GradientSwapper, TheSubGroupsWrittenLastAreNotReadBack) {
  Swapping setup;
  GradientSwapper& swapper = setup.swapper;
  std::vector<std::vector<float>> values;
  for (std::size_t g = 0; g < kGroups.size(); ++g) values.push_back(random_values(kGroups[g].elements, 50 + static_cast<unsigned>(g)));
  for (std::size_t g = kGroups.size(); g-- > 0;) swapper.accumulate(g, 0, values[g], 1.0f);
  swapper.end_micro_step();
  const std::uint64_t before = swapper.bytes_read();
  read_like_a_step(swapper, [&](std::size_t g, std::span<const float> grad) {
    EXPECT_TRUE(same_bits(grad, values[g])) << kGroups[g].name;
    if (g == 1) {
      EXPECT_EQ(swapper.bytes_read(), before) << "sub-groups 0 and 1 were read back";
    }
  });
  EXPECT_EQ(swapper.bytes_read(), before + 4 * (kGroups[2].elements + kGroups[3].elements));
}

// Step after step, with one sub-group or several, each step reads the
// gradients of its own micro-steps (no buffer's leftovers from the last).
TEST(GradientSwapper, EachStepReadsItsOwnMicroStepsGradients) {
  for (const auto& groups : {std::vector<SubGroup>{{"only", 3000}}, kGroups}) {
    SCOPED_TRACE(groups.size());
    Swapping setup(groups);
    GradientSwapper& swapper = setup.swapper;
    const unsigned micro_steps[] = {1, 1, 1, 2, 1, 3, 1};
    for (unsigned step = 0; step < std::size(micro_steps); ++step) {
      std::vector<std::vector<float>> reference;
      for (const auto& group : groups) reference.emplace_back(group.elements, 0.0f);
      for (unsigned micro = 0; micro < micro_steps[step]; ++micro) {
        // Backward's order (the last sub-group first), or forward's on odd
        // steps, so the boundary leaves the last sub-groups in the buffers
        // and the step must write them out to make room.
        for (std::size_t k = 0; k < groups.size(); ++k) {
          const std::size_t g = step % 2 == 1 ? k : groups.size() - 1 - k;
          const auto values = random_values(groups[g].elements, 100 * step + 10 * micro + static_cast<unsigned>(g));
          swapper.accumulate(g, 0, values, 1.0f);
          for (std::size_t i = 0; i < values.size(); ++i) reference[g][i] += 1.0f * values[i];
        }
        swapper.end_micro_step();
      }
      const float scale = step % 2 == 0 ? 1.0f : 0.5f;
      swapper.set_read_scale(scale);
      read_like_a_step(swapper, [&](std::size_t g, std::span<const float> grad) {
        std::vector<float> want = reference[g];
        for (float& v : want) v *= scale;
        ASSERT_TRUE(same_bits(grad, want)) << "step " << step << ", " << groups[g].name;
      });
      swapper.clear();
    }
  }
}

// A rank whose partition is one sub-group keeps its gradients in a buffer
// from one micro-step to the next and into the step: no gradient I/O at
// all, with accumulation too. With two, nothing is read back; the one
// backward leaves first is written once per micro-step (as it is left,
// while the other accumulates).
TEST(GradientSwapper, OneOrTwoSubGroupsAreNeverReadBack) {
  for (const auto& groups : {std::vector<SubGroup>{{"only", 5000}}, std::vector<SubGroup>{{"a", 3000}, {"b", 2000}}}) {
    SCOPED_TRACE(groups.size());
    Swapping setup(groups);
    GradientSwapper& swapper = setup.swapper;
    for (unsigned step = 0; step < 3; ++step) {
      std::vector<std::vector<float>> reference;
      for (const auto& group : groups) reference.emplace_back(group.elements, 0.0f);
      for (unsigned micro = 0; micro < step + 1; ++micro) {
        for (std::size_t g = groups.size(); g-- > 0;) {  // backward: the end first, in two pieces
          const auto values = random_values(groups[g].elements, 10 * step + micro + 100 * static_cast<unsigned>(g));
          const std::size_t half = values.size() / 2;
          swapper.accumulate(g, half, std::span(values).subspan(half), 1.0f);
          swapper.accumulate(g, 0, std::span(values).first(half), 1.0f);
          for (std::size_t i = 0; i < values.size(); ++i) reference[g][i] += 1.0f * values[i];
        }
        swapper.end_micro_step();
      }
      read_like_a_step(swapper, [&](std::size_t g, std::span<const float> grad) {
        EXPECT_EQ(swapper.sum_of_squares(g), sum_of_squares(reference[g]));
        EXPECT_TRUE(same_bits(grad, reference[g]));
      });
      swapper.clear();
    }
    EXPECT_EQ(swapper.bytes_read(), 0u);
    // 1 + 2 + 3 micro-steps.
    EXPECT_EQ(swapper.bytes_written(), groups.size() == 1 ? 0u : 6 * 4 * groups.back().elements);
  }
}

// The optimizer steps from gradients on NVMe exactly as from the same
// gradients in memory, pipelined or not.
TEST_P(GradientSwapperResidency, TheOptimizerStepsFromThemAsFromMemory) {
  for (const bool overlap : {true, false}) {
    SCOPED_TRACE(overlap ? "pipelined" : "in turn");
    const std::uint64_t resident_below = GetParam();
    TempDir dir;
    OptimizerSwapperOptions options;
    options.optimizer.adam.lr = 1e-2f;
    options.optimizer.adam.weight_decay = 0.01f;
    options.overlap = overlap;
    cpu_adam::CpuOptimizer optimizer(2);
    PinnedPool pool(pool_options(32 << 20));
    SwapStore from_memory_store(store_options(dir.path() / "a"));
    SwapStore from_nvme_store(store_options(dir.path() / "b"));
    SwapStore gradient_store(store_options(dir.path() / "g"));
    OptimizerSwapper from_memory(from_memory_store, pool, optimizer, kGroups, options);
    // With resident_below: the small sub-groups' states and gradients in
    // host memory, stepped between the swapped ones.
    options.resident_below_bytes = resident_below;
    OptimizerSwapper from_nvme(from_nvme_store, pool, optimizer, kGroups, options);
    GradientSwapper gradients(gradient_store, pool, kGroups, resident_below);
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      const auto params = random_values(kGroups[g].elements, 100 + static_cast<unsigned>(g));
      from_memory.initialize(g, params);
      from_nvme.initialize(g, params);
    }
    for (int step = 1; step <= 3; ++step) {
      std::vector<std::vector<float>> grads;
      std::vector<Buffer> buffers;
      for (std::size_t g = kGroups.size(); g-- > 0;) {
        auto values = random_values(kGroups[g].elements, 1000 * step + static_cast<unsigned>(g));
        gradients.accumulate(g, 0, values, 1.0f);
        grads.insert(grads.begin(), std::move(values));
      }
      gradients.end_micro_step();
      gradients.set_read_scale(0.5f);
      for (auto& values : grads) {
        for (float& v : values) v *= 0.5f;
        buffers.push_back({values.data(), values.size(), DType::f32});
      }
      from_memory.step(buffers);
      from_nvme.step(gradients);
      gradients.clear();
      if (resident_below == 0) {
        EXPECT_GT(from_nvme.last_step_stats().bytes_read, from_memory.last_step_stats().bytes_read);
      } else {
        // g2's states alone move; its gradient never leaves its buffer.
        EXPECT_EQ(from_nvme.last_step_stats().bytes_read, 3u * 4 * kGroups[2].elements);
      }
    }
    for (std::size_t g = 0; g < kGroups.size(); ++g) {
      std::vector<float> a(kGroups[g].elements), b(kGroups[g].elements);
      from_memory.read_params(g, a);
      from_nvme.read_params(g, b);
      EXPECT_TRUE(same_bits(a, b)) << kGroups[g].name;
      from_memory.read_state(g, "exp_avg_sq", a);
      from_nvme.read_state(g, "exp_avg_sq", b);
      EXPECT_TRUE(same_bits(a, b)) << kGroups[g].name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllSwappedOrSmallOnesResident, GradientSwapperResidency,
                         ::testing::Values(std::uint64_t{0}, kResidentBelow));

// Both swappers must agree on which sub-groups are resident: the step's
// pipeline takes a resident one's gradients between the swapped ones'.
TEST(GradientSwapper, AnOptimizerWithOtherResidentSubGroupsIsRefused) {
  TempDir dir;
  cpu_adam::CpuOptimizer optimizer(1);
  PinnedPool pool(pool_options(32 << 20));
  SwapStore optimizer_store(store_options(dir.path() / "o"));
  SwapStore gradient_store(store_options(dir.path() / "g"));
  OptimizerSwapperOptions options;
  options.resident_below_bytes = kResidentBelow;
  OptimizerSwapper swapper(optimizer_store, pool, optimizer, kGroups, options);
  for (std::size_t g = 0; g < kGroups.size(); ++g) swapper.initialize(g, random_values(kGroups[g].elements, 7));
  GradientSwapper gradients(gradient_store, pool, kGroups);
  gradients.end_micro_step();
  try {
    swapper.step(gradients);
    FAIL() << "stepped";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("resident_below_bytes"), std::string::npos) << error.what();
  }
}

// Writes fail with ENOSPC once armed (a full disk).
class FullDevice final : public aio::SyncDevice {
 public:
  explicit FullDevice(std::atomic<bool>& armed) : armed_(armed) {}
  std::int64_t transfer(aio::Op op, const aio::File& file, std::uint64_t offset, std::byte* buffer,
                        std::uint64_t length) override {
    if (op == aio::Op::write && armed_.load()) return -ENOSPC;
    return inner_.transfer(op, file, offset, buffer, length);
  }
  std::string_view name() const override { return "full"; }

 private:
  std::atomic<bool>& armed_;
  aio::PosixDevice inner_;
};

TEST(GradientSwapper, AFullDiskIsAnErrorNamingTheFileAndErrno) {
  TempDir dir;
  std::atomic<bool> armed{false};
  const auto options = store_options(dir.path());
  SwapStore store(options, [&](std::size_t) {
    return std::make_unique<aio::ThreadPoolEngine>(options.aio, std::make_unique<FullDevice>(armed), 1, "full");
  });
  PinnedPool pool(pool_options());
  GradientSwapper swapper(store, pool, kGroups);
  // Opening g0 after g2 and g1 writes g2 out (two buffers): that write fails.
  armed = true;
  try {
    for (std::size_t g : {2, 1, 0}) swapper.accumulate(g, 0, random_values(kGroups[g].elements, 7), 1.0f);
    swapper.end_micro_step();
    FAIL() << "the write error was lost";
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::no_space) << error.what();
    EXPECT_EQ(error.error_number(), ENOSPC) << error.what();
    EXPECT_NE(std::string(error.what()).find("zinf.volume"), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("g2/grad"), std::string::npos) << error.what();
  }
}

TEST(GradientSwapper, WhatAKilledRunLeftIsDroppedAndTheBudgetIsCheckedFirst) {
  TempDir dir;
  {
    SwapStore store(store_options(dir.path()));
    PinnedPool pool(pool_options());
    GradientSwapper swapper(store, pool, kGroups);
    // Three sub-groups through two buffers: g2 and g1 are written out.
    for (std::size_t g : {2, 1, 0}) swapper.accumulate(g, 0, random_values(kGroups[g].elements, 1), 1.0f);
    swapper.end_micro_step();  // committed: the manifest names them
    EXPECT_EQ(store.keys().size(), 2u);
  }
  SwapStore store(store_options(dir.path()));
  EXPECT_EQ(store.keys().size(), 2u);
  PinnedPool pool(pool_options());
  GradientSwapper swapper(store, pool, kGroups);
  EXPECT_TRUE(store.keys().empty());
  EXPECT_EQ(swapper.sum_of_squares(2), 0.0);

  const std::uint64_t needed = GradientSwapper::pinned_bytes_needed(kGroups, store.alignment());
  EXPECT_EQ(needed, 2 * ((30001 * 4 + 4095) / 4096 * 4096));
  PinnedPool small(pool_options(needed / 2));
  EXPECT_THROW(GradientSwapper(store, small, kGroups), Error);
}

TEST(GradientSwapper, PiecesPastTheirSubGroupAreRefused) {
  Swapping setup;
  GradientSwapper& swapper = setup.swapper;
  const std::vector<float> values(8, 1.0f);
  EXPECT_THROW(swapper.accumulate(3, 0, values, 1.0f), Error);  // g3 has 7 elements
  EXPECT_THROW(swapper.accumulate(4, 0, values, 1.0f), Error);  // no sub-group 4
}

}  // namespace
}  // namespace zinf::swap

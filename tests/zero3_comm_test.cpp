// The communicators: the launch environment as torchrun writes it, and the
// Gloo collectives between real processes (world sizes 1, 2, 3 and 4),
// including what the survivors see when a rank dies.
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <numeric>
#include <vector>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "rank_processes.hpp"
#include "zero3/communicator.hpp"

namespace zinf::zero3 {
namespace {

using testing::all_succeeded;
using testing::describe;
using testing::run_ranks;

// Sets environment variables for one test and restores them after.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const auto& [name, value] : vars) {
      const char* old = std::getenv(name);
      saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
      if (value) ::setenv(name, value, 1);
      else ::unsetenv(name);
    }
  }
  ~ScopedEnv() {
    for (const auto& [name, value] : saved_) {
      if (value) ::setenv(name.c_str(), value->c_str(), 1);
      else ::unsetenv(name.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST(LaunchEnv, ReadsTorchrunVariables) {
  ScopedEnv env({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                 {"MASTER_ADDR", "node07"}, {"MASTER_PORT", "29611"},
                 {"TORCHELASTIC_USE_AGENT_STORE", "True"}});
  const LaunchEnv launch = launch_env_from_environment();
  EXPECT_EQ(launch.rank, 3);
  EXPECT_EQ(launch.world_size, 8);
  EXPECT_EQ(launch.local_rank, 1);
  EXPECT_EQ(launch.master_addr, "node07");
  EXPECT_EQ(launch.master_port, 29611);
  EXPECT_TRUE(launch.agent_store);
}

TEST(LaunchEnv, NoLauncherMeansAWorldOfOne) {
  ScopedEnv env({{"RANK", nullptr}, {"WORLD_SIZE", nullptr}, {"LOCAL_RANK", nullptr},
                 {"MASTER_ADDR", nullptr}, {"MASTER_PORT", nullptr},
                 {"TORCHELASTIC_USE_AGENT_STORE", nullptr}});
  const LaunchEnv launch = launch_env_from_environment();
  EXPECT_EQ(launch.rank, 0);
  EXPECT_EQ(launch.world_size, 1);
  EXPECT_FALSE(launch.agent_store);
  auto comm = make_communicator(launch);
  EXPECT_EQ(comm->backend(), "local");
}

TEST(LaunchEnv, BadVariablesNameThemselves) {
  const auto error_of = [](std::initializer_list<std::pair<const char*, const char*>> vars) {
    ScopedEnv env(vars);
    try {
      launch_env_from_environment();
    } catch (const Error& error) {
      EXPECT_EQ(error.kind(), ErrorKind::config);
      return error.context().key_path + " | " + error.what();
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of({{"RANK", "4"}, {"WORLD_SIZE", "4"}}).find("RANK | "), std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", nullptr}}).find("WORLD_SIZE | "), std::string::npos);
  // The message names the missing variable too (it once read "but  is not").
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", nullptr}}).find("RANK is set but WORLD_SIZE is not"),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", nullptr}, {"WORLD_SIZE", "2"}}).find("WORLD_SIZE is set but RANK is not"),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_PORT", "http"}}).find("MASTER_PORT | "),
            std::string::npos);
  EXPECT_NE(error_of({{"RANK", "x"}, {"WORLD_SIZE", "2"}}).find("'x'"), std::string::npos);
}

TEST(LocalCommunicator, EveryCollectiveIsACopy) {
  auto comm = make_local_communicator();
  std::vector<float> in{1, 2, 3}, out(3);
  comm->all_gather(in.data(), out.data(), 3 * sizeof(float));
  EXPECT_EQ(out, in);
  std::fill(out.begin(), out.end(), 0.0f);
  comm->reduce_scatter(in.data(), out.data(), 3);
  EXPECT_EQ(out, in);
  comm->all_reduce(in.data(), 3, ReduceOp::max);
  EXPECT_EQ(in, (std::vector<float>{1, 2, 3}));
  EXPECT_THROW(comm->broadcast(in.data(), 4, 1), Error);
}

// Each rank checks every collective against values it can compute itself.
void exercise_collectives(const LaunchEnv& launch) {
  CommunicatorOptions options;
  options.backend = Backend::gloo;
  options.timeout = std::chrono::seconds(60);
  auto comm = make_communicator(launch, options);
  const int world = comm->world_size();
  const int rank = comm->rank();
  if (world != launch.world_size || rank != launch.rank) throw std::runtime_error("rank/world mismatch");
  const auto expect = [&](bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("rank " + std::to_string(rank) + ": " + what);
  };

  // all_gather of an odd byte count, out of place and in place.
  const std::size_t bytes = 1001;
  std::vector<std::uint8_t> mine(bytes), gathered(bytes * world);
  for (std::size_t i = 0; i < bytes; ++i) mine[i] = static_cast<std::uint8_t>(rank * 31 + i);
  comm->all_gather(mine.data(), gathered.data(), bytes);
  for (int r = 0; r < world; ++r) {
    for (std::size_t i = 0; i < bytes; ++i) {
      expect(gathered[r * bytes + i] == static_cast<std::uint8_t>(r * 31 + i), "all_gather out of place");
    }
  }
  std::vector<std::uint8_t> in_place(bytes * world, 0);
  std::copy(mine.begin(), mine.end(), in_place.begin() + rank * bytes);
  comm->all_gather(in_place.data() + rank * bytes, in_place.data(), bytes);
  expect(in_place == gathered, "all_gather in place");

  // reduce_scatter: block b of rank r holds r + b + i/1000; the sum over r.
  const std::size_t count = 257;
  std::vector<float> blocks(count * world), reduced(count);
  for (int b = 0; b < world; ++b) {
    for (std::size_t i = 0; i < count; ++i) blocks[b * count + i] = static_cast<float>(rank + b) + i / 1000.0f;
  }
  comm->reduce_scatter(blocks.data(), reduced.data(), count);
  for (std::size_t i = 0; i < count; ++i) {
    float want = 0;
    for (int r = 0; r < world; ++r) want += static_cast<float>(r + rank) + i / 1000.0f;
    expect(std::fabs(reduced[i] - want) <= 1e-5f * std::fabs(want) + 1e-6f, "reduce_scatter");
  }

  std::vector<float> values{static_cast<float>(rank), static_cast<float>(-rank), 1.0f};
  comm->all_reduce(values.data(), values.size(), ReduceOp::sum);
  const float rank_sum = static_cast<float>(world * (world - 1) / 2);
  expect(values[0] == rank_sum && values[1] == -rank_sum && values[2] == static_cast<float>(world),
         "all_reduce sum");
  std::vector<float> peak{static_cast<float>(rank)};
  comm->all_reduce(peak.data(), 1, ReduceOp::max);
  expect(peak[0] == static_cast<float>(world - 1), "all_reduce max");

  const int root = world - 1;
  std::vector<std::uint8_t> message(77, static_cast<std::uint8_t>(rank == root ? 0xab : 0));
  comm->broadcast(message.data(), message.size(), root);
  expect(std::all_of(message.begin(), message.end(), [](std::uint8_t b) { return b == 0xab; }), "broadcast");
  comm->barrier();
}

class GlooWorld : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override {
    if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator (libgloo-dev + libtorch-dev)";
  }
};

TEST_P(GlooWorld, CollectivesAgreeWithWhatEachRankComputes) {
  const auto outcomes = run_ranks(GetParam(), exercise_collectives);
  EXPECT_TRUE(all_succeeded(outcomes)) << describe(outcomes);
}

INSTANTIATE_TEST_SUITE_P(WorldSizes, GlooWorld, ::testing::Values(1, 2, 3, 4));

TEST(GlooFailure, ARankThatDiesMakesTheOthersFailClearly) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  const auto outcomes = run_ranks(3, [](const LaunchEnv& launch) {
    CommunicatorOptions options;
    options.backend = Backend::gloo;
    options.timeout = std::chrono::seconds(60);
    auto comm = make_communicator(launch, options);
    comm->barrier();
    if (launch.rank == 2) ::_exit(9);  // dies between collectives, as a crash would
    std::vector<float> data(1 << 16, 1.0f);
    for (int i = 0; i < 3; ++i) comm->all_reduce(data.data(), data.size());
  }, std::chrono::seconds(50));
  ASSERT_EQ(outcomes[2].exit_code, 9) << describe(outcomes);
  for (int rank : {0, 1}) {
    EXPECT_FALSE(outcomes[rank].hung) << describe(outcomes);
    EXPECT_EQ(outcomes[rank].exit_code, 3) << describe(outcomes);
    EXPECT_NE(outcomes[rank].error.find("all_reduce"), std::string::npos) << outcomes[rank].error;
    EXPECT_NE(outcomes[rank].error.find("peer rank died"), std::string::npos) << outcomes[rank].error;
  }
}

TEST(GlooFailure, AMissingPeerFailsTheRendezvousNamingTheAddress) {
  if (!gloo_available()) GTEST_SKIP() << "this build has no Gloo communicator";
  const auto outcomes = run_ranks(2, [](const LaunchEnv& launch) {
    if (launch.rank == 1) return;  // never joins
    CommunicatorOptions options;
    options.backend = Backend::gloo;
    options.timeout = std::chrono::seconds(2);
    make_communicator(launch, options);
  }, std::chrono::seconds(60));
  EXPECT_FALSE(outcomes[0].hung) << describe(outcomes);
  EXPECT_EQ(outcomes[0].exit_code, 3) << describe(outcomes);
  EXPECT_NE(outcomes[0].error.find("MASTER_ADDR:MASTER_PORT"), std::string::npos) << outcomes[0].error;
  EXPECT_NE(outcomes[0].error.find("127.0.0.1:"), std::string::npos) << outcomes[0].error;
}

}  // namespace
}  // namespace zinf::zero3

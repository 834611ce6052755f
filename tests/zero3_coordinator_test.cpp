// The prefetch coordinator's decisions: what it gathers ahead, what it keeps,
// what it never touches, and what happens when the module order changes.
#include <gtest/gtest.h>

#include "zero3/coordinator.hpp"

namespace zinf::zero3 {
namespace {

constexpr auto F = Phase::forward;
constexpr auto B = Phase::backward;

// Four modules with one 100-element param each (p0..p3) and one shared
// persistent param p4 in module 0.
Coordinator four_layers(CoordinatorOptions options) {
  return Coordinator({{0, 4}, {1}, {2}, {3}}, {100, 100, 100, 100, 10}, {false, false, false, false, true},
                     options);
}

const auto nothing_live = [](ParamIndex) { return false; };

// Runs forward 0..3 then backward 3..0, returning what each hook prefetched.
std::vector<std::vector<ParamIndex>> one_pass(Coordinator& c, const std::function<bool(ParamIndex)>& live = nothing_live,
                                              std::uint64_t live_elements = 0) {
  std::vector<std::vector<ParamIndex>> out;
  for (ModuleIndex m : {0u, 1u, 2u, 3u}) out.push_back(c.on_pre_hook({m, F}, live, live_elements));
  for (ModuleIndex m : {3u, 2u, 1u, 0u}) out.push_back(c.on_pre_hook({m, B}, live, live_elements));
  return out;
}

TEST(Coordinator, RecordsTheFirstMicroStepThenPrefetchesWithinTheBucket) {
  CoordinatorOptions options;
  options.prefetch_bucket_elements = 150;
  Coordinator c = four_layers(options);
  for (const auto& ahead : one_pass(c)) EXPECT_TRUE(ahead.empty());  // recording
  EXPECT_EQ(c.mode(), Coordinator::Mode::recording);
  c.begin_micro_step();
  EXPECT_EQ(c.mode(), Coordinator::Mode::following);
  EXPECT_EQ(c.trace().size(), 8u);
  const auto ahead = one_pass(c);
  // At F0: p1 (the next 100 fit in 150, p2 would not).
  EXPECT_EQ(ahead[0], (std::vector<ParamIndex>{1}));
  EXPECT_EQ(ahead[1], (std::vector<ParamIndex>{2}));
  EXPECT_EQ(ahead[2], (std::vector<ParamIndex>{3}));
  // At F3 the next module is 3 again (its own param, not fetched ahead), then 2.
  EXPECT_EQ(ahead[3], (std::vector<ParamIndex>{2}));
  EXPECT_EQ(ahead[6], (std::vector<ParamIndex>{0}));
  EXPECT_TRUE(ahead[7].empty());  // the end of the trace
}

TEST(Coordinator, ABiggerBucketReachesFurtherAndSkipsLiveAndPersistentParams) {
  CoordinatorOptions options;
  options.prefetch_bucket_elements = 1000;
  Coordinator c = four_layers(options);
  one_pass(c);
  c.begin_micro_step();
  const auto live = [](ParamIndex p) { return p == 2; };
  const auto ahead = c.on_pre_hook({0, F}, live, 100);
  EXPECT_EQ(ahead, (std::vector<ParamIndex>{1, 3}));  // p2 is live, p4 persistent, p0 its own
}

TEST(Coordinator, MaxLiveParametersCapsWhatIsGathered) {
  CoordinatorOptions options;
  options.prefetch_bucket_elements = 1000;
  options.max_live_elements = 250;
  Coordinator c = four_layers(options);
  one_pass(c);
  c.begin_micro_step();
  // Module 0's own p0 (100) counts; 250 leaves room for one more.
  EXPECT_EQ(c.on_pre_hook({0, F}, nothing_live, 0), (std::vector<ParamIndex>{1}));
  // With 200 already live, nothing fits beside module 1's param.
  EXPECT_TRUE(c.on_pre_hook({1, F}, [](ParamIndex p) { return p == 1; }, 200).empty());
}

TEST(Coordinator, KeepsParamsDueAgainWithinTheReuseDistance) {
  CoordinatorOptions options;
  options.max_reuse_distance = 250;
  Coordinator c = four_layers(options);
  one_pass(c);
  EXPECT_FALSE(c.keep_after_use(0));  // recording: release everything
  c.begin_micro_step();
  const std::vector<std::pair<ModuleEvent, bool>> expected = {
      {{0, F}, false},  // next use of p0 at B0, 600 elements later
      {{1, F}, false},  // 400 later
      {{2, F}, true},   // F3, B3: 200 later
      {{3, F}, true},   // B3 right after
      {{3, B}, false},  // never again this micro-step
      {{2, B}, false}, {{1, B}, false}, {{0, B}, false}};
  for (const auto& [event, keep] : expected) {
    c.on_pre_hook(event, nothing_live, 0);
    EXPECT_EQ(c.keep_after_use(event.module), keep) << "module " << event.module;
  }
  EXPECT_FALSE(c.keep_after_use(4));  // persistent: never released, never "kept"
}

TEST(Coordinator, AChangedOrderFallsBackToOnDemandAndIsRecordedAgain) {
  CoordinatorOptions options;
  options.prefetch_bucket_elements = 1000;
  Coordinator c = four_layers(options);
  one_pass(c);
  c.begin_micro_step();
  EXPECT_FALSE(c.on_pre_hook({0, F}, nothing_live, 0).empty());
  // Module 2 runs where module 1 was expected (a skipped layer).
  EXPECT_TRUE(c.on_pre_hook({2, F}, nothing_live, 0).empty());
  EXPECT_EQ(c.mode(), Coordinator::Mode::on_demand);
  EXPECT_EQ(c.divergences(), 1u);
  EXPECT_TRUE(c.on_pre_hook({3, F}, nothing_live, 0).empty());
  EXPECT_FALSE(c.keep_after_use(3));
  // The next micro-step records the new order, the one after follows it.
  c.begin_micro_step();
  EXPECT_EQ(c.mode(), Coordinator::Mode::recording);
  for (ModuleIndex m : {0u, 2u, 3u}) c.on_pre_hook({m, F}, nothing_live, 0);
  c.begin_micro_step();
  EXPECT_EQ(c.mode(), Coordinator::Mode::following);
  EXPECT_EQ(c.on_pre_hook({0, F}, nothing_live, 0), (std::vector<ParamIndex>{2, 3}));
  EXPECT_EQ(c.divergences(), 1u);
}

TEST(Coordinator, ABucketOfZeroTurnsPrefetchOff) {
  CoordinatorOptions options;
  options.prefetch_bucket_elements = 0;
  Coordinator c = four_layers(options);
  one_pass(c);
  c.begin_micro_step();
  for (const auto& ahead : one_pass(c)) EXPECT_TRUE(ahead.empty());
  EXPECT_EQ(c.mode(), Coordinator::Mode::following);
}

TEST(Coordinator, RefusesUnknownModulesAndParams) {
  EXPECT_THROW(Coordinator({{5}}, {1}, {false}, {}), std::exception);
  Coordinator c({{0}}, {1}, {false}, {});
  EXPECT_THROW(c.on_pre_hook({3, F}, nothing_live, 0), std::exception);
}

}  // namespace
}  // namespace zinf::zero3

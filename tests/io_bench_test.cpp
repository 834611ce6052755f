// The recommendation rule of zinf-bench io (tools/io_bench.hpp).
#include <gtest/gtest.h>

#include "core/units.hpp"
#include "tools/io_bench.hpp"

namespace zinf::bench {
namespace {

std::pair<PassResult, PassResult> result(std::uint64_t block, std::uint32_t depth,
                                         std::uint32_t threads, double write_s, double read_s) {
  std::pair<PassResult, PassResult> r;
  for (PassResult* p : {&r.first, &r.second}) {
    p->setting.aio.block_size = block;
    p->setting.aio.queue_depth = depth;
    p->setting.aio.intra_op_parallelism = threads;
    p->bytes = GiB;
  }
  r.first.seconds = write_s;
  r.second.seconds = read_s;
  return r;
}

TEST(IoBenchRecommendation, FastestIsLeastWritePlusReadTime) {
  const std::vector results{result(MiB, 32, 1, 1.0, 1.0), result(16 * MiB, 64, 1, 0.5, 1.2),
                            result(4 * MiB, 8, 1, 0.9, 0.9)};
  EXPECT_EQ(fastest(results).first.setting.aio.block_size, 16 * MiB);
}

TEST(IoBenchRecommendation, PrefersFewerBytesInFlightWithinTolerance) {
  const std::vector results{result(16 * MiB, 64, 1, 1.00, 1.00), result(4 * MiB, 8, 1, 1.04, 1.00),
                            result(MiB, 32, 1, 1.50, 1.50)};
  EXPECT_EQ(best_of(results).first.setting.aio.block_size, 4 * MiB);
  EXPECT_EQ(best_of(results, 0.0).first.setting.aio.block_size, 16 * MiB);
}

TEST(IoBenchRecommendation, SlowerThanToleranceIsNeverChosen) {
  const std::vector results{result(16 * MiB, 64, 1, 1.0, 1.0), result(MiB, 8, 1, 1.2, 1.0)};
  EXPECT_EQ(best_of(results).first.setting.aio.block_size, 16 * MiB);
}

TEST(IoBenchRecommendation, TiesInFlightGoToFewerThreads) {
  const std::vector results{result(4 * MiB, 8, 2, 1.0, 1.0), result(4 * MiB, 16, 1, 1.0, 1.0)};
  EXPECT_EQ(best_of(results).first.setting.aio.intra_op_parallelism, 1u);
}

TEST(IoBenchRecommendation, SpreadAndNoiseComeFromTheRepeats) {
  auto a = result(16 * MiB, 64, 1, 1.0, 1.0), b = result(4 * MiB, 8, 1, 1.15, 1.0),
       c = result(MiB, 32, 1, 2.0, 2.0);
  a.first.repeat_gb_per_s = {1.0, 1.3, 1.2};   // 30 % spread
  a.second.repeat_gb_per_s = {1.0, 1.0, 1.1};
  b.first.repeat_gb_per_s = {0.9, 1.1, 1.0};   // 20 %
  c.first.repeat_gb_per_s = {0.5};             // one pass: no spread
  EXPECT_NEAR(a.first.spread(), 0.3 / 1.2, 1e-12);
  EXPECT_EQ(c.first.spread(), 0.0);
  const std::vector results{a, b, c};
  EXPECT_NEAR(noise_of(results), 0.2, 1e-12);  // median of 0.25, 0.2, 0
  // 15 % slower is beyond a 5 % tolerance but within this disk's noise.
  EXPECT_EQ(best_of(results).first.setting.aio.block_size, 16 * MiB);
  EXPECT_EQ(best_of(results, noise_of(results)).first.setting.aio.block_size, 4 * MiB);
}

TEST(IoBenchRecommendation, AioBlockHasDeepSpeedKeys) {
  IoSetting s;
  s.aio.block_size = 4 * MiB;
  s.aio.queue_depth = 8;
  const auto block = aio_block(s);
  EXPECT_EQ(block["block_size"], 4 * MiB);
  EXPECT_EQ(block["queue_depth"], 8);
  EXPECT_EQ(block["intra_op_parallelism"], 1);
  EXPECT_EQ(block["single_submit"], false);
  EXPECT_EQ(block["overlap_events"], true);
  EXPECT_EQ(block["use_gds"], false);
}

}  // namespace
}  // namespace zinf::bench

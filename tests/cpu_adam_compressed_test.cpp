// Adam with compressed moments (bf16, 8-bit block-wise): codes hold their
// stated precision and range, stochastic rounding is unbiased (an EMA does
// not freeze), every tier and thread count gives the scalar tier's bits,
// a compressed step tracks the fp32 one, and bad input is refused.
#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "cpu_adam/cpu_adam.hpp"

namespace zinf::cpu_adam {
namespace {

std::vector<float> normal_values(std::size_t n, float scale, std::uint64_t seed) {
  std::mt19937_64 random(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> out(n);
  for (auto& x : out) x = normal(random) * scale;
  return out;
}

std::vector<float> round_trip(MomentFormat format, bool second, const std::vector<float>& values,
                              std::uint64_t seed = 0) {
  std::vector<std::uint8_t> bytes(moment_bytes(format, values.size()));
  encode_moment(format, second, values, bytes.data(), seed);
  std::vector<float> out(values.size());
  decode_moment(format, second, bytes.data(), out);
  return out;
}

TEST(MomentFormat, SizesAndNames) {
  EXPECT_EQ(moment_bytes(MomentFormat::fp32, 1000), 4000u);
  EXPECT_EQ(moment_bytes(MomentFormat::bf16, 1000), 2000u);
  // 1000 codes, 4 scales of 256-element blocks.
  EXPECT_EQ(moment_bytes(MomentFormat::int8, 1000), 1000u + 4 * 4);
  EXPECT_EQ(moment_bytes(MomentFormat::int8, 1), 4u + 4);
  EXPECT_EQ(parse_moment_format("int8"), MomentFormat::int8);
  EXPECT_EQ(to_string(MomentFormat::bf16), "bf16");
  try {
    parse_moment_format("fp8");
    FAIL() << "fp8 accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("expected fp32, bf16 or int8"), std::string::npos) << error.what();
  }
}

// Each element within one code spacing of its value: 2^-3 relative for the
// 8-bit codes (3 mantissa bits), 2^-7 for bf16, down to each code's range.
TEST(MomentFormat, CodesHoldTheirPrecisionAndRange) {
  const std::size_t n = 4099;  // a partial last block
  std::vector<float> first = normal_values(n, 0.01f, 1);
  std::vector<float> second(n);
  std::mt19937_64 random(2);
  std::uniform_real_distribution<float> exponent(-30.0f, 0.0f);
  for (auto& x : second) x = std::pow(2.0f, exponent(random)) * 1e-3f;  // 9 decades in one block
  for (std::size_t i = 0; i < n; i += 97) first[i] = 0.0f;

  for (MomentFormat format : {MomentFormat::bf16, MomentFormat::int8}) {
    const double spacing = format == MomentFormat::bf16 ? 1.0 / 128 : 1.0 / 8;
    for (bool is_second : {false, true}) {
      const auto& values = is_second ? second : first;
      const auto decoded = round_trip(format, is_second, values);
      for (std::size_t b = 0; b < n; b += kMomentBlock) {
        float absmax = 0.0f;
        for (std::size_t i = b; i < std::min(n, b + kMomentBlock); ++i) absmax = std::max(absmax, std::abs(values[i]));
        // The smallest normal code relative to the block's largest value.
        const double floor = format == MomentFormat::bf16 ? 0.0 : absmax / 1.875 * std::ldexp(1.0, is_second ? -30 : -14);
        for (std::size_t i = b; i < std::min(n, b + kMomentBlock); ++i) {
          const double x = values[i], y = decoded[i];
          SCOPED_TRACE(::testing::Message() << to_string(format) << (is_second ? " second" : " first") << " element "
                                            << i << " value " << x << " decoded " << y);
          if (std::abs(x) >= floor) {
            ASSERT_LE(std::abs(y - x), std::abs(x) * spacing * 1.0001);
          } else {
            ASSERT_LE(std::abs(y - x), floor / 8 * 1.0001);  // the subnormal codes' spacing
          }
          if (x == 0.0) {
            ASSERT_EQ(y, 0.0);
          }
          if (is_second) {
            ASSERT_GT(y, 0.0) << "a positive second moment decoded to 0";
          }
          ASSERT_FALSE(std::signbit(x) != std::signbit(y) && y != 0.0);
        }
      }
    }
  }
}

// The mean over many roundings is the value: rounding is unbiased.
TEST(MomentFormat, StochasticRoundingIsUnbiased) {
  for (MomentFormat format : {MomentFormat::bf16, MomentFormat::int8}) {
    // Two values per block: the block's largest (exact in int8) and one 0.3
    // of a spacing above a code.
    const float code = format == MomentFormat::bf16 ? 1.0f : 0.5f;
    const float spacing = format == MomentFormat::bf16 ? 1.0f / 128 : 0.5f / 8;
    const float value = code + 0.3f * spacing;
    std::vector<float> values(2 * kMomentBlock, 0.0f);
    for (std::size_t b = 0; b < values.size(); b += kMomentBlock) {
      values[b] = 1.875f;
      for (std::size_t i = b + 1; i < b + kMomentBlock; ++i) values[i] = value;
    }
    double sum = 0.0;
    std::size_t samples = 0;
    for (std::uint64_t seed = 0; seed < 20; ++seed) {
      const auto decoded = round_trip(format, true, values, seed);
      for (std::size_t i = 0; i < values.size(); ++i) {
        if (i % kMomentBlock == 0) {
          ASSERT_EQ(decoded[i], 1.875f);
          continue;
        }
        ASSERT_TRUE(decoded[i] == code || decoded[i] == code + spacing) << decoded[i];
        sum += decoded[i];
        ++samples;
      }
    }
    // 10,200 samples: the mean's standard deviation is 0.005 of a spacing.
    EXPECT_NEAR(sum / static_cast<double>(samples), value, 0.03 * spacing) << to_string(format);
  }
}

// Adam's buffers for one tensor in a moment format.
struct Compressed {
  Compressed(MomentFormat format, std::size_t n, DType grad_dtype, std::optional<DType> copy_dtype,
             std::uint64_t seed)
      : format(format), n(n), grad_dtype(grad_dtype), copy_dtype(copy_dtype) {
    param = normal_values(n, 1.0f, seed);
    grad_values = normal_values(n, 0.1f, seed + 1);
    grad.resize(n * (grad_dtype == DType::f32 ? 4 : 2));
    set_grad(grad_values);
    m.resize(moment_bytes(format, n));
    v.resize(moment_bytes(format, n));
    if (copy_dtype) copy.resize(n * 2);
  }
  void set_grad(const std::vector<float>& values) {
    for (std::size_t i = 0; i < n; ++i) {
      if (grad_dtype == DType::f32) {
        std::memcpy(grad.data() + 4 * i, &values[i], 4);
      } else {
        const std::uint16_t h = grad_dtype == DType::bf16 ? float_to_bf16(values[i]) : float_to_f16(values[i]);
        std::memcpy(grad.data() + 2 * i, &h, 2);
      }
    }
  }
  CompressedTensorState state(std::uint64_t seed = 7) {
    CompressedTensorState s;
    s.param = {param.data(), n, DType::f32};
    s.grad = {grad.data(), n, grad_dtype};
    s.exp_avg = m.data();
    s.exp_avg_sq = v.data();
    if (copy_dtype) s.param_copy = {copy.data(), n, *copy_dtype};
    s.seed = seed;
    return s;
  }
  std::vector<float> moment(bool second) const {
    std::vector<float> out(n);
    decode_moment(format, second, (second ? v : m).data(), out);
    return out;
  }
  MomentFormat format;
  std::size_t n;
  DType grad_dtype;
  std::optional<DType> copy_dtype;
  std::vector<float> param, grad_values;
  std::vector<std::uint8_t> grad, m, v, copy;
};

// sum |got - want| / sum |want|: a compressed moment against fp32's.
double mean_relative_difference(const std::vector<float>& got, const std::vector<float>& want) {
  double diff = 0.0, size = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    diff += std::abs(static_cast<double>(got[i]) - want[i]);
    size += std::abs(static_cast<double>(want[i]));
  }
  return diff / size;
}

class CompressedTierTest : public ::testing::TestWithParam<Tier> {
 protected:
  void SetUp() override {
    if (!tier_supported(GetParam(), detect_cpu_features())) {
      GTEST_SKIP() << "this CPU cannot run the " << to_string(GetParam()) << " tier ("
                   << detect_cpu_features().describe() << ")";
    }
  }
};

TEST_P(CompressedTierTest, MatchesScalarBitForBitOnEveryLengthGradAndCopy) {
  CpuOptimizer tier_opt(2, GetParam());  // two threads: ranges split on blocks
  CpuOptimizer scalar_opt(1, Tier::scalar);
  AdamOptions options;
  options.lr = 1e-2f;
  options.weight_decay = 0.01f;
  std::uint64_t seed = 1;
  for (MomentFormat format : {MomentFormat::bf16, MomentFormat::int8}) {
    for (DType g : {DType::f32, DType::bf16, DType::f16}) {
      for (std::optional<DType> c : {std::optional<DType>{}, std::optional<DType>{DType::bf16},
                                     std::optional<DType>{DType::f16}}) {
        for (std::size_t n : {1u, 7u, 17u, 255u, 256u, 257u, 1000u, 4099u}) {
          SCOPED_TRACE(::testing::Message() << to_string(format) << " grad " << to_string(g) << " copy "
                                            << (c ? to_string(*c) : "none") << " n " << n);
          Compressed a(format, n, g, c, seed), b(format, n, g, c, seed);
          ++seed;
          for (std::int64_t t = 1; t <= 3; ++t) {
            const auto sa = a.state(), sb = b.state();
            tier_opt.adam_step(options, t, format, std::span(&sa, 1));
            scalar_opt.adam_step(options, t, format, std::span(&sb, 1));
          }
          ASSERT_EQ(0, std::memcmp(a.param.data(), b.param.data(), n * 4));
          ASSERT_EQ(a.m, b.m);
          ASSERT_EQ(a.v, b.v);
          ASSERT_EQ(a.copy, b.copy);
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tiers, CompressedTierTest, ::testing::Values(Tier::scalar, Tier::avx2, Tier::avx512),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// 200 steps of Adam on one tensor: the compressed moments track fp32's,
// and so do the params.
TEST(CompressedAdam, TracksTheFp32Step) {
  const std::size_t n = 3000;
  AdamOptions options;
  options.lr = 1e-3f;
  CpuOptimizer optimizer(2);
  for (MomentFormat format : {MomentFormat::bf16, MomentFormat::int8}) {
    Compressed c(format, n, DType::f32, DType::bf16, 3);
    Compressed f(MomentFormat::fp32, n, DType::f32, std::nullopt, 3);
    const std::vector<float> start = c.param;
    std::mt19937_64 random(9);
    std::normal_distribution<float> noise(0.0f, 1.0f);
    for (std::int64_t t = 1; t <= 200; ++t) {
      // A gradient with a stable direction and per-step noise, as training's.
      std::vector<float> g(n);
      for (std::size_t i = 0; i < n; ++i) g[i] = 0.05f * std::sin(0.01f * static_cast<float>(i)) + 0.1f * noise(random);
      c.set_grad(g);
      f.set_grad(g);
      const auto sc = c.state(), sf = f.state();
      optimizer.adam_step(options, t, format, std::span(&sc, 1));
      optimizer.adam_step(options, t, MomentFormat::fp32, std::span(&sf, 1));
    }
    double moved = 0.0, error = 0.0;
    for (std::size_t i = 0; i < n; ++i) {
      moved += std::abs(static_cast<double>(f.param[i]) - start[i]);
      error += std::abs(static_cast<double>(c.param[i]) - f.param[i]);
    }
    // Mean over elements, measured: bf16 0.3%, int8 5.0%.
    EXPECT_LT(error / moved, format == MomentFormat::bf16 ? 0.01 : 0.08) << to_string(format);
    for (bool second : {false, true}) {
      const double off = mean_relative_difference(c.moment(second), f.moment(second));
      // Stochastic rounding's noise is unbiased but the EMA keeps it: with
      // beta2 = 0.999 it adds up over ~1/(1 - beta2^2) steps. Measured at
      // step 200: bf16 1.4% (v), int8 15.6% (v) and under 8% (m).
      const double bound = format == MomentFormat::bf16 ? 0.03 : (second ? 0.25 : 0.1);
      EXPECT_LT(off, bound) << to_string(format) << (second ? " exp_avg_sq" : " exp_avg");
    }
  }
}

// Param groups with their own lr meeting inside an 8-bit block: the two
// range steps that share it leave each other's params exactly as they were
// (here one group's lr is 0), every range's moments track fp32's, and any
// thread count gives the bits of one thread (threads split on the
// tensor's blocks, not on the range's start).
TEST(CompressedAdam, RangesThatCutABlockStepTheirOwnElementsOnly) {
  const std::size_t n = 5000;
  const std::size_t cut = 300;  // inside block [256, 512)
  AdamOptions moving;
  moving.lr = 1e-2f;
  AdamOptions still = moving;
  still.lr = 0.0f;
  std::vector<std::vector<std::uint8_t>> results;
  for (std::size_t threads : {1u, 2u, 3u}) {
    SCOPED_TRACE(threads);
    CpuOptimizer optimizer(threads);
    Compressed c(MomentFormat::int8, n, DType::f32, DType::bf16, 11);
    Compressed f(MomentFormat::fp32, n, DType::f32, std::nullopt, 11);
    const std::vector<float> start = c.param;
    for (std::int64_t t = 1; t <= 20; ++t) {
      for (const auto& [begin, end, options] : {std::tuple{std::size_t{0}, cut, moving},
                                                 std::tuple{cut, n, still}}) {
        auto sc = c.state(), sf = f.state();
        sc.begin = sf.begin = begin;
        sc.end = sf.end = end;
        optimizer.adam_step(options, t, MomentFormat::int8, std::span(&sc, 1));
        optimizer.adam_step(options, t, MomentFormat::fp32, std::span(&sf, 1));
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (i < cut) {
        ASSERT_NE(c.param[i], start[i]) << i;
      } else {
        ASSERT_EQ(c.param[i], start[i]) << i;  // lr 0 and no decay: untouched, the shared block too
      }
    }
    for (bool second : {false, true}) {
      const double off = mean_relative_difference(c.moment(second), f.moment(second));
      EXPECT_LT(off, second ? 0.25 : 0.1) << (second ? "exp_avg_sq" : "exp_avg");
    }
    std::vector<std::uint8_t> bits(reinterpret_cast<const std::uint8_t*>(c.param.data()),
                                   reinterpret_cast<const std::uint8_t*>(c.param.data() + n));
    bits.insert(bits.end(), c.m.begin(), c.m.end());
    bits.insert(bits.end(), c.v.begin(), c.v.end());
    results.push_back(std::move(bits));
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

// beta2 = 0.999 moves v by 0.1% a step, below half of any code's spacing:
// rounding to nearest would keep v where it started.
TEST(CompressedAdam, SecondMomentDoesNotFreeze) {
  const std::size_t n = kMomentBlock;
  CpuOptimizer optimizer(1);
  AdamOptions options;
  for (MomentFormat format : {MomentFormat::bf16, MomentFormat::int8}) {
    Compressed c(format, n, DType::f32, std::nullopt, 4);
    std::vector<float> g(n, 0.1f);
    c.set_grad(g);
    for (std::int64_t t = 1; t <= 10; ++t) {  // v near 0.01
      const auto s = c.state();
      optimizer.adam_step(options, t, format, std::span(&s, 1));
    }
    const double before = c.moment(true)[1];
    std::fill(g.begin(), g.end(), 0.2f);  // v's target is now 0.04
    c.set_grad(g);
    for (std::int64_t t = 11; t <= 700; ++t) {
      const auto s = c.state();
      optimizer.adam_step(options, t, format, std::span(&s, 1));
    }
    const auto v = c.moment(true);
    double mean = 0.0;
    for (float x : v) mean += x;
    mean /= static_cast<double>(n);
    // Exact EMA: 0.04 - (0.04 - before) * 0.999^690.
    const double want = 0.04 - (0.04 - before) * std::pow(0.999, 690);
    EXPECT_NEAR(mean, want, 0.03 * want) << to_string(format) << " v started at " << before;
  }
}

TEST(CompressedAdam, ZeroGradientsAndStatesStayZero) {
  CpuOptimizer optimizer(1);
  for (MomentFormat format : {MomentFormat::bf16, MomentFormat::int8}) {
    Compressed c(format, 600, DType::f32, std::nullopt, 5);
    c.set_grad(std::vector<float>(600, 0.0f));
    const std::vector<float> start = c.param;
    const auto s = c.state();
    optimizer.adam_step(AdamOptions{}, 1, format, std::span(&s, 1));
    EXPECT_EQ(c.param, start);
    for (bool second : {false, true}) {
      for (float x : c.moment(second)) ASSERT_EQ(x, 0.0f);
    }
  }
}

TEST(CompressedAdam, RefusesBadInputNamingTheTensor) {
  CpuOptimizer optimizer(1);
  Compressed c(MomentFormat::int8, 100, DType::f32, std::nullopt, 6);
  const auto expect_error = [&](CompressedTensorState s, const std::string& text) {
    try {
      optimizer.adam_step(AdamOptions{}, 1, MomentFormat::int8, std::span(&s, 1));
      ADD_FAILURE() << "accepted; expected: " << text;
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find(text), std::string::npos) << error.what();
    }
  };
  auto s = c.state();
  s.param.dtype = DType::bf16;
  expect_error(s, "tensor 0: param is bf16: compressed moments need fp32 master params");
  s = c.state();
  s.exp_avg_sq = nullptr;
  expect_error(s, "exp_avg_sq buffer is null");
  s = c.state();
  s.grad.count = 99;
  expect_error(s, "length mismatch: grad has 99 elements, param 100");
  s = c.state();
  s.exp_avg_sq = c.m.data() + 8;  // overlaps exp_avg
  expect_error(s, "overlaps");
  s = c.state();
  s.param_copy = {c.m.data(), 100, DType::f32};
  expect_error(s, "param_copy must be bf16 or fp16");
}

}  // namespace
}  // namespace zinf::cpu_adam

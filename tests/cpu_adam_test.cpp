// CPU optimizers: every tier the host supports gives the scalar tier's bits;
// the scalar tier is within stated bounds of double-precision math; 16-bit
// conversions round exactly; bad input is refused with a clear error.
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <vector>

#include <gtest/gtest.h>

#include "core/error.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "cpu_adam/thread_pool.hpp"
#include "test_util.hpp"

namespace zinf::cpu_adam {
namespace {

// ---------------------------------------------------------------- conversions

TEST(Bf16, RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(bits_float(0x3f808000)), 0x3f80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(bits_float(0x3f818000)), 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(float_to_bf16(bits_float(0x3f808001)), 0x3f81);  // above the tie
  EXPECT_EQ(float_to_bf16(bits_float(0x7f7fffff)), 0x7f80);  // max float rounds to inf
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(float_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(float_to_bf16(bits_float(0x00018000)), 0x0002);  // subnormal tie, odd: up
  EXPECT_EQ(float_to_bf16(bits_float(0x00008000)), 0x0000);  // subnormal tie, even: down
  EXPECT_EQ(float_to_bf16(bits_float(0x80000001)), 0x8000);  // -tiny to -0
  EXPECT_EQ(float_to_bf16(bits_float(0x7f800001)), 0x7fc0);  // sNaN becomes quiet, not inf
  EXPECT_EQ(float_to_bf16(bits_float(0xffc12345)), 0xffc1);
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = bf16_to_float(bits);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f))));
    } else {
      ASSERT_EQ(float_to_bf16(f), bits) << std::hex << h;  // exact round trip
    }
  }
}

TEST(Fp16, RoundsToNearestEvenAndKeepsSpecials) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);                 // halfway to the next: inf
  EXPECT_EQ(float_to_f16(bits_float(0x477fefff)), 0x7bff);   // just below
  EXPECT_EQ(float_to_f16(bits_float(0x33800000)), 0x0001);   // smallest subnormal
  EXPECT_EQ(float_to_f16(bits_float(0x33000000)), 0x0000);   // half of it: tie to even (0)
  EXPECT_EQ(float_to_f16(bits_float(0x33400000)), 0x0001);   // three quarters: up
  EXPECT_EQ(float_to_f16(bits_float(0x387fe000)), 0x0400);   // rounds up into the normals
  EXPECT_EQ(float_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_f16(bits_float(0x7f812345)), 0x7e09);   // NaN: quiet, payload kept
  EXPECT_EQ(float_to_f16(bits_float(0xffbfffff)), 0xffff);
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = f16_to_float(bits);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(f))));
    } else {
      ASSERT_EQ(float_to_f16(f), bits) << std::hex << h;
    }
  }
}

__attribute__((target("f16c"))) std::uint16_t hardware_f16(float f) {
  return static_cast<std::uint16_t>(
      _mm_extract_epi16(_mm_cvtps_ph(_mm_set1_ps(f), _MM_FROUND_TO_NEAREST_INT), 0));
}

TEST(Fp16, SoftwareConversionMatchesF16cOverTheFloatRange) {
  if (!detect_cpu_features().avx2) GTEST_SKIP() << "this CPU has no F16C/AVX2 to compare with";
  std::uint64_t checked = 0;
  for (std::uint64_t bits = 0; bits <= 0xffffffffull; bits += 997) {
    const float f = bits_float(static_cast<std::uint32_t>(bits));
    ASSERT_EQ(float_to_f16(f), hardware_f16(f)) << std::hex << bits;
    ++checked;
  }
  for (std::uint32_t near = 0x33000000; near < 0x33000000 + 4096; ++near) {  // subnormal ties
    ASSERT_EQ(float_to_f16(bits_float(near)), hardware_f16(bits_float(near))) << std::hex << near;
  }
  EXPECT_GT(checked, 4000000u);
}

// ---------------------------------------------------------------- tensors

// Owns the buffers of one tensor in any dtype combination, shifted by
// `misalign` elements from an aligned allocation.
struct Tensor {
  Tensor(std::size_t n, DType p, DType g, DType s, std::optional<DType> copy, std::size_t misalign,
         std::uint64_t seed, bool edge_values)
      : n(n), pd(p), gd(g), sd(s), cd(copy), shift(misalign) {
    param = make(p), grad = make(g), m = make(s), v = make(s);
    if (copy) c = make(*copy);
    std::mt19937_64 random(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (std::size_t i = 0; i < n; ++i) {
      float gv = normal(random) * 0.1f;
      if (edge_values && i % 97 == 3) gv = 0.0f;
      if (edge_values && i % 101 == 5) gv = -0.0f;
      if (edge_values && i % 103 == 7) gv = 1e-30f;  // subnormal in bf16 range tests
      set(grad, g, i, gv);
      set(param, p, i, normal(random));
      set(m, s, i, normal(random) * 0.01f);
      set(v, s, i, std::abs(normal(random)) * 1e-4f);
    }
  }
  std::vector<std::uint8_t> make(DType d) const {
    return std::vector<std::uint8_t>((n + shift) * size_of(d) + 64, 0);
  }
  static std::size_t size_of(DType d) { return d == DType::f32 ? 4 : 2; }
  void* at(std::vector<std::uint8_t>& b, DType d) { return b.data() + shift * size_of(d); }
  void set(std::vector<std::uint8_t>& b, DType d, std::size_t i, float x) {
    auto* base = static_cast<std::uint8_t*>(at(b, d));
    if (d == DType::f32) std::memcpy(base + 4 * i, &x, 4);
    if (d == DType::bf16) {
      const std::uint16_t h = float_to_bf16(x);
      std::memcpy(base + 2 * i, &h, 2);
    }
    if (d == DType::f16) {
      const std::uint16_t h = float_to_f16(x);
      std::memcpy(base + 2 * i, &h, 2);
    }
  }
  float get(std::vector<std::uint8_t>& b, DType d, std::size_t i) {
    auto* base = static_cast<std::uint8_t*>(at(b, d));
    if (d == DType::f32) {
      float x;
      std::memcpy(&x, base + 4 * i, 4);
      return x;
    }
    std::uint16_t h;
    std::memcpy(&h, base + 2 * i, 2);
    return d == DType::bf16 ? bf16_to_float(h) : f16_to_float(h);
  }
  TensorState state() {
    TensorState t;
    t.param = {at(param, pd), n, pd};
    t.grad = {at(grad, gd), n, gd};
    t.exp_avg = {at(m, sd), n, sd};
    t.exp_avg_sq = {at(v, sd), n, sd};
    if (cd) t.param_copy = {at(c, *cd), n, *cd};
    return t;
  }
  std::size_t n;
  DType pd, gd, sd;
  std::optional<DType> cd;
  std::size_t shift;
  std::vector<std::uint8_t> param, grad, m, v, c;
};

// Equal bits, or both NaN (payloads of NaN meeting NaN may differ by tier).
::testing::AssertionResult same_values(const std::vector<std::uint8_t>& a,
                                       const std::vector<std::uint8_t>& b, DType d) {
  const std::size_t step = d == DType::f32 ? 4 : 2;
  for (std::size_t off = 0; off + step <= a.size(); off += step) {
    if (std::memcmp(a.data() + off, b.data() + off, step) == 0) continue;
    float x, y;
    if (d == DType::f32) {
      std::memcpy(&x, a.data() + off, 4);
      std::memcpy(&y, b.data() + off, 4);
    } else {
      std::uint16_t hx, hy;
      std::memcpy(&hx, a.data() + off, 2);
      std::memcpy(&hy, b.data() + off, 2);
      x = d == DType::bf16 ? bf16_to_float(hx) : f16_to_float(hx);
      y = d == DType::bf16 ? bf16_to_float(hy) : f16_to_float(hy);
    }
    if (std::isnan(x) && std::isnan(y)) continue;
    return ::testing::AssertionFailure() << "byte offset " << off << ": " << x << " vs " << y;
  }
  return ::testing::AssertionSuccess();
}

struct Combo {
  DType p, g, s;
  std::optional<DType> copy;
};

std::vector<Combo> supported_combos() {
  std::vector<Combo> combos;
  for (DType g : {DType::f32, DType::bf16, DType::f16}) {
    for (std::optional<DType> c : {std::optional<DType>{}, std::optional<DType>{DType::bf16},
                                   std::optional<DType>{DType::f16}}) {
      combos.push_back({DType::f32, g, DType::f32, c});
    }
  }
  for (DType p : {DType::bf16, DType::f16}) {
    for (DType s : {p, DType::f32}) {
      for (DType g : {p, DType::f32}) combos.push_back({p, g, s, std::nullopt});
    }
  }
  return combos;
}

enum class Which { adam, adamw, adam_no_bias, adagrad, lion };

void step(CpuOptimizer& opt, Which which, std::int64_t t, std::span<const TensorState> tensors) {
  AdamOptions adam;
  adam.lr = 1e-2f;
  adam.weight_decay = 0.01f;
  switch (which) {
    case Which::adam:
      adam.adamw_mode = false;
      opt.adam_step(adam, t, tensors);
      break;
    case Which::adamw: opt.adam_step(adam, t, tensors); break;
    case Which::adam_no_bias:
      adam.bias_correction = false;
      adam.weight_decay = 0;
      opt.adam_step(adam, t, tensors);
      break;
    case Which::adagrad: opt.adagrad_step(AdagradOptions{0.05f, 1e-10f, 0.01f}, t, tensors); break;
    case Which::lion: opt.lion_step(LionOptions{1e-3f, 0.9f, 0.99f, 0.1f}, t, tensors); break;
  }
}

class TierTest : public ::testing::TestWithParam<Tier> {
 protected:
  void SetUp() override {
    if (!tier_supported(GetParam(), detect_cpu_features())) {
      GTEST_SKIP() << "this CPU cannot run the " << to_string(GetParam()) << " tier ("
                   << detect_cpu_features().describe() << ")";
    }
  }
};

TEST_P(TierTest, MatchesScalarBitForBitOnOddLengthsUnalignedPointersAndTails) {
  CpuOptimizer tier_opt(2, GetParam());
  CpuOptimizer scalar_opt(1, Tier::scalar);
  std::uint64_t seed = 1;
  for (const Combo& combo : supported_combos()) {
    for (Which which : {Which::adam, Which::adamw, Which::adam_no_bias, Which::adagrad, Which::lion}) {
      for (std::size_t n : {1u, 7u, 15u, 16u, 17u, 63u, 65u, 1000u, 4099u}) {
        for (std::size_t shift : {0u, 1u, 3u}) {
          SCOPED_TRACE(::testing::Message()
                       << "param " << to_string(combo.p) << " grad " << to_string(combo.g) << " state "
                       << to_string(combo.s) << " copy " << (combo.copy ? to_string(*combo.copy) : "none")
                       << " optimizer " << static_cast<int>(which) << " n " << n << " shift " << shift);
          Tensor a(n, combo.p, combo.g, combo.s, combo.copy, shift, seed, true);
          Tensor b(n, combo.p, combo.g, combo.s, combo.copy, shift, seed, true);
          ++seed;
          for (std::int64_t t = 1; t <= 2; ++t) {
            const TensorState sa = a.state();
            const TensorState sb = b.state();
            step(tier_opt, which, t, std::span(&sa, 1));
            step(scalar_opt, which, t, std::span(&sb, 1));
          }
          ASSERT_TRUE(same_values(a.param, b.param, combo.p));
          ASSERT_TRUE(same_values(a.m, b.m, combo.s));
          ASSERT_TRUE(same_values(a.v, b.v, combo.s));
          if (combo.copy) {
            ASSERT_TRUE(same_values(a.c, b.c, *combo.copy));
          }
        }
      }
    }
  }
}

TEST_P(TierTest, SpecialValuesGiveTheScalarBits) {
  const std::vector<float> specials = {0.0f, -0.0f, 1e-40f, -1e-40f, 1e-30f, 3e38f, -3e38f,
                                       std::numeric_limits<float>::infinity(),
                                       -std::numeric_limits<float>::infinity(),
                                       std::numeric_limits<float>::quiet_NaN(), 1.0f, -1.0f,
                                       65504.0f, 65520.0f, 6e-8f, 1e-45f};
  CpuOptimizer tier_opt(1, GetParam());
  CpuOptimizer scalar_opt(1, Tier::scalar);
  for (const Combo& combo : supported_combos()) {
    for (Which which : {Which::adamw, Which::adam, Which::lion, Which::adagrad}) {
      const std::size_t n = specials.size() * specials.size();
      Tensor a(n, combo.p, combo.g, combo.s, combo.copy, 1, 5, false);
      Tensor b(n, combo.p, combo.g, combo.s, combo.copy, 1, 5, false);
      for (std::size_t i = 0; i < n; ++i) {
        for (Tensor* t : {&a, &b}) {
          t->set(t->grad, combo.g, i, specials[i % specials.size()]);
          t->set(t->param, combo.p, i, specials[i / specials.size()]);
        }
      }
      const TensorState sa = a.state();
      const TensorState sb = b.state();
      step(tier_opt, which, 1, std::span(&sa, 1));
      step(scalar_opt, which, 1, std::span(&sb, 1));
      ASSERT_TRUE(same_values(a.param, b.param, combo.p)) << static_cast<int>(which);
      ASSERT_TRUE(same_values(a.m, b.m, combo.s));
      ASSERT_TRUE(same_values(a.v, b.v, combo.s));
      if (combo.copy) {
            ASSERT_TRUE(same_values(a.c, b.c, *combo.copy));
          }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Tiers, TierTest, ::testing::Values(Tier::scalar, Tier::avx2, Tier::avx512),
                         [](const auto& info) { return std::string(to_string(info.param)); });

// ------------------------------------------------------- against double math

float ulp(float x) {
  const float a = std::abs(x);
  return std::nextafter(a, std::numeric_limits<float>::infinity()) - a;
}

struct Reference {
  double p, m, v;
  double update_scale;  // magnitude of the terms that made the update
};

Reference adam_reference(const AdamOptions& o, std::int64_t t, float p_f, float g_f, float m_f,
                         float v_f) {
  const double b1 = o.beta1, b2 = o.beta2, lr = o.lr, wd = o.weight_decay, eps = o.eps;
  const double bc1 = o.bias_correction ? 1 - std::pow(b1, t) : 1;
  const double bc2 = o.bias_correction ? std::sqrt(1 - std::pow(b2, t)) : 1;
  double p = p_f, g = g_f, m = m_f, v = v_f;
  if (!o.adamw_mode && wd > 0) g += wd * p;
  const double m_terms = std::abs(b1 * m) + std::abs((1 - b1) * g);
  m = b1 * m + (1 - b1) * g;
  v = b2 * v + (1 - b2) * g * g;
  const double denom = std::sqrt(v) / bc2 + eps;
  double scale = (lr / bc1) * m_terms / denom;
  if (o.adamw_mode && wd > 0) {
    scale += std::abs(lr * wd * p);
    p *= 1 - lr * wd;
  }
  p -= (lr / bc1) * m / denom;
  return {p, m, v, scale};
}

TEST_P(TierTest, OneStepWithinStatedBoundsOfDoubleMath) {
  // Bound: |p - p_ref| <= 2 ulp(p_ref) + 16 float epsilons of the update's
  // terms (before cancellation); the same for m; v within 2 ulp + 16 eps of
  // its terms. Float rounding of ~10 operations stays well inside this.
  const float eps32 = std::numeric_limits<float>::epsilon();
  for (bool adamw : {false, true}) {
    for (bool bias : {false, true}) {
      AdamOptions o;
      o.lr = 3e-3f;
      o.weight_decay = 0.05f;
      o.adamw_mode = adamw;
      o.bias_correction = bias;
      const std::size_t n = 10007;
      Tensor x(n, DType::f32, DType::f32, DType::f32, std::nullopt, 0, 77, false);
      std::vector<Reference> expected(n);
      const std::int64_t t = 3;
      for (std::size_t i = 0; i < n; ++i) {
        expected[i] = adam_reference(o, t, x.get(x.param, DType::f32, i), x.get(x.grad, DType::f32, i),
                                     x.get(x.m, DType::f32, i), x.get(x.v, DType::f32, i));
      }
      CpuOptimizer opt(2, GetParam());
      const TensorState s = x.state();
      opt.adam_step(o, t, std::span(&s, 1));
      for (std::size_t i = 0; i < n; ++i) {
        const Reference& r = expected[i];
        const float p = x.get(x.param, DType::f32, i);
        const double bound = 2 * ulp(static_cast<float>(r.p)) + 16 * eps32 * r.update_scale;
        ASSERT_LE(std::abs(p - r.p), bound) << "element " << i << " adamw " << adamw << " bias " << bias;
        const float v = x.get(x.v, DType::f32, i);
        ASSERT_LE(std::abs(v - r.v), 2 * ulp(static_cast<float>(r.v)) + 16 * eps32 * r.v) << i;
      }
    }
  }
}

TEST(CpuAdamAccuracy, TenStepTrajectoryStaysWithDoubleMath) {
  AdamOptions o;
  o.lr = 1e-2f;
  o.weight_decay = 0.01f;
  const std::size_t n = 4096;
  Tensor x(n, DType::f32, DType::bf16, DType::f32, DType::bf16, 0, 9, false);
  std::vector<double> p(n), m(n), v(n);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = x.get(x.param, DType::f32, i);
    m[i] = x.get(x.m, DType::f32, i);
    v[i] = x.get(x.v, DType::f32, i);
  }
  CpuOptimizer opt(2);
  double worst = 0;
  for (std::int64_t t = 1; t <= 10; ++t) {
    for (std::size_t i = 0; i < n; ++i) {  // a new bf16 gradient every step
      x.set(x.grad, DType::bf16, i, std::sin(static_cast<float>(i * t)) * 0.1f);
    }
    for (std::size_t i = 0; i < n; ++i) {
      const Reference r = adam_reference(o, t, static_cast<float>(p[i]), x.get(x.grad, DType::bf16, i),
                                         static_cast<float>(m[i]), static_cast<float>(v[i]));
      p[i] = r.p, m[i] = r.m, v[i] = r.v;
    }
    const TensorState s = x.state();
    opt.adam_step(o, t, std::span(&s, 1));
    for (std::size_t i = 0; i < n; ++i) {
      const float got = x.get(x.param, DType::f32, i);
      worst = std::max(worst, std::abs(got - p[i]));
      // The fused copy is exactly the updated param rounded to bf16.
      ASSERT_EQ(float_to_bf16(got), float_to_bf16(x.get(x.c, DType::bf16, i))) << i;
      p[i] = got;  // follow the float trajectory: compare one step's error at a time
      m[i] = x.get(x.m, DType::f32, i);
      v[i] = x.get(x.v, DType::f32, i);
    }
  }
  EXPECT_LT(worst, 1e-6) << "per-step error against double math";
}

TEST(CpuAdamAccuracy, Bf16ParamsAndStatesTrackDoubleMathWithinBf16Precision) {
  AdamOptions o;
  o.lr = 1e-2f;
  const std::size_t n = 2048;
  Tensor x(n, DType::bf16, DType::bf16, DType::bf16, std::nullopt, 1, 4, false);
  CpuOptimizer opt(2);
  for (std::int64_t t = 1; t <= 10; ++t) {
    std::vector<Reference> expected(n);
    for (std::size_t i = 0; i < n; ++i) {
      expected[i] = adam_reference(o, t, x.get(x.param, DType::bf16, i), x.get(x.grad, DType::bf16, i),
                                   x.get(x.m, DType::bf16, i), x.get(x.v, DType::bf16, i));
    }
    const TensorState s = x.state();
    opt.adam_step(o, t, std::span(&s, 1));
    for (std::size_t i = 0; i < n; ++i) {
      // One bf16 rounding of the result: half a bf16 ulp, 2^-9 relative.
      const float got = x.get(x.param, DType::bf16, i);
      ASSERT_LE(std::abs(got - expected[i].p), std::abs(expected[i].p) * 0x1p-8 + 1e-30) << i;
    }
  }
}

TEST(CpuAdamAccuracy, LionSignIsExact) {
  LionOptions o;
  o.lr = 1e-3f;
  const std::size_t n = 5000;
  Tensor x(n, DType::f32, DType::f32, DType::f32, std::nullopt, 0, 12, true);
  std::vector<float> p0(n), m0(n), g0(n);
  for (std::size_t i = 0; i < n; ++i) {
    p0[i] = x.get(x.param, DType::f32, i);
    m0[i] = x.get(x.m, DType::f32, i);
    g0[i] = x.get(x.grad, DType::f32, i);
  }
  CpuOptimizer opt(1);
  const TensorState s = x.state();
  opt.lion_step(o, 1, std::span(&s, 1));
  for (std::size_t i = 0; i < n; ++i) {
    const float c = 0.9f * m0[i] + static_cast<float>(1.0 - 0.9f) * g0[i];
    const float sign = c > 0 ? 1.0f : (c < 0 ? -1.0f : c);
    const float expected = p0[i] - o.lr * sign;  // weight_decay 0
    ASSERT_EQ(x.get(x.param, DType::f32, i), expected) << i;
    if (c == 0) {
      EXPECT_EQ(x.get(x.param, DType::f32, i), p0[i]);  // sign(0) = 0: no move
    }
  }
}

// --------------------------------------------------- multi-tensor and threads

TEST(CpuAdamMultiTensor, OneCallOverManyTensorsEqualsOneCallEach) {
  std::vector<Tensor> together, apart;
  std::mt19937 random(3);
  for (int i = 0; i < 40; ++i) {
    const std::size_t n = 1 + random() % 3000;
    together.emplace_back(n, DType::f32, DType::bf16, DType::f32, DType::bf16, i % 3, 100 + i, false);
    apart.emplace_back(n, DType::f32, DType::bf16, DType::f32, DType::bf16, i % 3, 100 + i, false);
  }
  CpuOptimizer three(3);
  CpuOptimizer one(1);
  AdamOptions o;
  for (std::int64_t t = 1; t <= 3; ++t) {
    std::vector<TensorState> states;
    for (auto& x : together) states.push_back(x.state());
    three.adam_step(o, t, states);
    for (auto& x : apart) {
      const TensorState s = x.state();
      one.adam_step(o, t, std::span(&s, 1));
    }
  }
  for (std::size_t i = 0; i < together.size(); ++i) {
    ASSERT_TRUE(same_values(together[i].param, apart[i].param, DType::f32)) << i;
    ASSERT_TRUE(same_values(together[i].c, apart[i].c, DType::bf16)) << i;
  }
}

TEST(CpuAdamThreads, PoolRunsEveryIndexAndPropagatesErrors) {
  ThreadPool pool(4);
  std::vector<int> hits(4, 0);
  for (int round = 0; round < 100; ++round) pool.run([&](std::size_t i) { ++hits[i]; });
  for (int h : hits) EXPECT_EQ(h, 100);
  EXPECT_THROW(pool.run([](std::size_t i) {
    if (i == 2) throw std::runtime_error("boom");
  }),
               std::runtime_error);
  pool.run([&](std::size_t i) { ++hits[i]; });  // still usable
  EXPECT_EQ(hits[3], 101);
}

// ------------------------------------------------------------ bad input

class CpuAdamErrors : public ::testing::Test {
 protected:
  CpuAdamErrors() : x(100, DType::f32, DType::f32, DType::f32, std::nullopt, 0, 1, false) {}
  std::string message_of(const std::function<void()>& call) {
    try {
      call();
    } catch (const Error& error) {
      return error.what();
    }
    return "no error";
  }
  Tensor x;
  CpuOptimizer opt{1};
};

TEST_F(CpuAdamErrors, LengthMismatchNamesBothLengths) {
  TensorState s = x.state();
  s.grad.count = 99;
  const std::string text = message_of([&] { opt.adam_step({}, 1, std::span(&s, 1)); });
  EXPECT_NE(text.find("length mismatch: grad has 99 elements, param 100"), std::string::npos) << text;
}

TEST_F(CpuAdamErrors, NullBuffersAreNamed) {
  TensorState s = x.state();
  s.exp_avg_sq.data = nullptr;
  EXPECT_NE(message_of([&] { opt.adam_step({}, 1, std::span(&s, 1)); }).find("exp_avg_sq buffer is null"),
            std::string::npos);
  s = x.state();
  s.param.data = nullptr;
  EXPECT_NE(message_of([&] { opt.lion_step({}, 1, std::span(&s, 1)); }).find("param buffer is null"),
            std::string::npos);
}

TEST_F(CpuAdamErrors, NonFiniteOrOutOfRangeHyperParameters) {
  const TensorState s = x.state();
  for (float lr : {std::nanf(""), std::numeric_limits<float>::infinity(), -1.0f}) {
    AdamOptions o;
    o.lr = lr;
    EXPECT_NE(message_of([&] { opt.adam_step(o, 1, std::span(&s, 1)); }).find("optimizer lr"),
              std::string::npos);
  }
  AdamOptions o;
  o.beta1 = 1.0f;
  EXPECT_NE(message_of([&] { opt.adam_step(o, 1, std::span(&s, 1)); }).find("beta1"), std::string::npos);
  EXPECT_NE(message_of([&] { opt.adam_step({}, 0, std::span(&s, 1)); }).find("steps count from 1"),
            std::string::npos);
  LionOptions lion;
  lion.beta2 = std::nanf("");
  EXPECT_NE(message_of([&] { opt.lion_step(lion, 1, std::span(&s, 1)); }).find("beta2"), std::string::npos);
}

TEST_F(CpuAdamErrors, UnsupportedDtypePairsAreRefusedBeforeAnyWrite) {
  Tensor bad(10, DType::bf16, DType::bf16, DType::f16, std::nullopt, 0, 2, false);
  const std::vector<std::uint8_t> before = bad.param;
  TensorState s = bad.state();
  const std::string text = message_of([&] { opt.adam_step({}, 1, std::span(&s, 1)); });
  EXPECT_NE(text.find("unsupported dtypes: param bf16, grad bf16, state fp16"), std::string::npos) << text;
  EXPECT_EQ(bad.param, before);
  TensorState f32_copy = x.state();
  std::vector<float> copy(100);
  f32_copy.param_copy = {copy.data(), 100, DType::f32};
  EXPECT_NE(message_of([&] { opt.adam_step({}, 1, std::span(&f32_copy, 1)); }).find("param_copy must be bf16 or fp16"),
            std::string::npos);
}

TEST_F(CpuAdamErrors, OverlappingBuffersAreRefused) {
  std::vector<TensorState> twice = {x.state(), x.state()};  // a tied parameter listed twice
  std::string text = message_of([&] { opt.adam_step({}, 1, twice); });
  EXPECT_NE(text.find("overlaps"), std::string::npos) << text;
  TensorState same = x.state();
  same.exp_avg_sq = same.exp_avg;
  text = message_of([&] { opt.adam_step({}, 1, std::span(&same, 1)); });
  EXPECT_NE(text.find("tensor 0's exp_avg overlaps tensor 0's exp_avg_sq"), std::string::npos) << text;
  // Read-only grads may be shared.
  Tensor y(100, DType::f32, DType::f32, DType::f32, std::nullopt, 0, 2, false);
  TensorState a = x.state();
  TensorState b = y.state();
  b.grad = a.grad;
  std::vector<TensorState> shared_grad = {a, b};
  EXPECT_NO_THROW(opt.adam_step({}, 1, shared_grad));
}

TEST_F(CpuAdamErrors, BadDtypeValuesAndEmptyTensorsWithMismatchedLengths) {
  TensorState s = x.state();
  s.grad.dtype = static_cast<DType>(7);
  EXPECT_NE(message_of([&] { opt.adam_step({}, 1, std::span(&s, 1)); }).find("dtype value 7"),
            std::string::npos);
  TensorState empty;
  empty.grad.count = 5;  // param has 0 elements
  EXPECT_NE(message_of([&] { opt.adam_step({}, 1, std::span(&empty, 1)); }).find("length mismatch"),
            std::string::npos);
  TensorState nothing;  // all empty: fine
  EXPECT_NO_THROW(opt.adam_step({}, 1, std::span(&nothing, 1)));
}

TEST(CpuAdamThreads, WorkersUseTheCallersFloatingPointMode) {
  // With flush-to-zero set by the caller, every share flushes, whichever
  // thread computes it: results equal the single-threaded ones. Large enough
  // that the workers take part (small steps run on the caller alone).
  constexpr std::size_t kElements = 40000;
  const unsigned saved = _mm_getcsr();
  std::vector<float> out1, out2;
  for (std::size_t threads : {1u, 3u}) {
    CpuOptimizer opt(threads);
    Tensor x(kElements, DType::f32, DType::f32, DType::f32, std::nullopt, 0, 8, false);
    for (std::size_t i = 0; i < kElements; ++i) {
      x.set(x.grad, DType::f32, i, 1e-39f * static_cast<float>(i % 7));  // subnormal
      x.set(x.m, DType::f32, i, 0.0f);  // so (1 - beta1) * g is the whole first moment
    }
    const TensorState s = x.state();
    AdamOptions o;
    _mm_setcsr(saved | 0x8040);  // FTZ and DAZ, set after the inputs were made
    opt.adam_step(o, 1, std::span(&s, 1));
    _mm_setcsr(saved);
    auto& out = threads == 1 ? out1 : out2;
    for (std::size_t i = 0; i < kElements; ++i) out.push_back(x.get(x.m, DType::f32, i));
  }
  EXPECT_EQ(std::memcmp(out1.data(), out2.data(), out1.size() * 4), 0);
}

TEST_F(CpuAdamErrors, ForcingATierThisCpuLacksIsRefused) {
  const CpuFeatures features = detect_cpu_features();
  if (features.avx512) GTEST_SKIP() << "this CPU supports every tier";
  EXPECT_THROW(CpuOptimizer(1, Tier::avx512), Error);
}

TEST(CpuAdamTier, EnvironmentValueForcesALowerTierOnly) {
  CpuFeatures all;
  all.avx2 = all.avx512 = true;
  CpuFeatures avx2_only;
  avx2_only.avx2 = true;
  EXPECT_EQ(resolve_tier(all, nullptr), Tier::avx512);
  EXPECT_EQ(resolve_tier(all, ""), Tier::avx512);
  EXPECT_EQ(resolve_tier(all, "scalar"), Tier::scalar);
  EXPECT_EQ(resolve_tier(all, "avx2"), Tier::avx2);
  EXPECT_EQ(resolve_tier(avx2_only, "avx512"), Tier::avx2);  // cannot force a higher tier
  EXPECT_EQ(resolve_tier(CpuFeatures{}, "avx2"), Tier::scalar);
  EXPECT_THROW(resolve_tier(all, "sse9"), Error);
}

TEST(CpuAdamTier, EnvironmentIsReadWhenTheProcessStarts) {
  // default_tier() is decided once per process, so ask a fresh one.
  const std::string self = std::filesystem::read_symlink("/proc/self/exe").string();
  const std::string command = "ZINF_CPU_ADAM_TIER=scalar " + self +
                              " --gtest_filter=CpuAdamTier.ReportsDefaultTier 2>&1 | grep -q 'tier is scalar'";
  EXPECT_EQ(std::system(command.c_str()), 0);
}

TEST(CpuAdamTier, ReportsDefaultTier) {
  std::printf("default tier is %s\n", std::string(to_string(CpuOptimizer(1).tier())).c_str());
}

}  // namespace
}  // namespace zinf::cpu_adam

// Micro-benchmarks of the CPU optimizers: per-tier AdamW throughput on a
// cache-resident tensor (compute-bound: what the kernels themselves cost)
// and the fixed cost of one step (pool hand-off, validation) on a tiny one.
// Memory-bound throughput against the machine's limit is `zinf-bench adam`.
#include <benchmark/benchmark.h>

#include <vector>

#include <fmt/format.h>

#include "cpu_adam/cpu_adam.hpp"

namespace {

using namespace zinf::cpu_adam;

struct Buffers {
  explicit Buffers(std::size_t n) : p(n, 0.5f), g(n, -0.01f), m(n, 0.0f), v(n, 0.0f), copy(n) {}
  TensorState state(bool with_copy) {
    TensorState t;
    t.param = {p.data(), p.size(), DType::f32};
    t.grad = {g.data(), g.size(), DType::f32};
    t.exp_avg = {m.data(), m.size(), DType::f32};
    t.exp_avg_sq = {v.data(), v.size(), DType::f32};
    if (with_copy) t.param_copy = {copy.data(), copy.size(), DType::bf16};
    return t;
  }
  std::vector<float> p, g, m, v;
  std::vector<std::uint16_t> copy;
};

void BM_AdamWCacheResident(benchmark::State& state) {
  const auto tier = static_cast<Tier>(state.range(0));
  if (!tier_supported(tier, detect_cpu_features())) {
    state.SkipWithError("tier not supported by this CPU");
    return;
  }
  CpuOptimizer optimizer(static_cast<std::size_t>(state.range(1)), tier);
  Buffers buffers(256 * 1024);  // 4 MiB of state: stays in cache
  const TensorState t = buffers.state(false);
  std::int64_t step = 1;
  for (auto _ : state) optimizer.adam_step({}, step++, std::span(&t, 1));
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(buffers.p.size()));
  state.SetLabel(std::string(to_string(tier)));
}
BENCHMARK(BM_AdamWCacheResident)
    ->ArgsProduct({{0, 1, 2}, {1, 2}})
    ->UseRealTime();

// Adam with compressed moments (arg 0: tier, arg 1: format 0 fp32, 1 bf16,
// 2 int8), one thread, cache resident: the decode/encode cost against the
// fp32 kernel's.
void BM_AdamCompressedMoments(benchmark::State& state) {
  const auto tier = static_cast<Tier>(state.range(0));
  if (!tier_supported(tier, detect_cpu_features())) {
    state.SkipWithError("tier not supported by this CPU");
    return;
  }
  const auto format = static_cast<MomentFormat>(state.range(1));
  CpuOptimizer optimizer(1, tier);
  const std::size_t n = 256 * 1024;
  std::vector<float> p(n, 0.5f), g(n, -0.01f);
  std::vector<std::uint8_t> m(moment_bytes(format, n)), v(moment_bytes(format, n));
  std::vector<std::uint16_t> copy(n);
  CompressedTensorState t;
  t.param = {p.data(), n, DType::f32};
  t.grad = {g.data(), n, DType::f32};
  t.exp_avg = m.data();
  t.exp_avg_sq = v.data();
  t.param_copy = {copy.data(), n, DType::bf16};
  std::int64_t step = 1;
  for (auto _ : state) optimizer.adam_step({}, step++, format, std::span(&t, 1));
  state.SetItemsProcessed(state.iterations() * static_cast<std::int64_t>(n));
  state.SetLabel(fmt::format("{} {}", to_string(tier), to_string(format)));
}
BENCHMARK(BM_AdamCompressedMoments)->ArgsProduct({{0, 1, 2}, {0, 1, 2}})->UseRealTime();

void BM_StepFixedCost(benchmark::State& state) {
  CpuOptimizer optimizer(static_cast<std::size_t>(state.range(0)));
  Buffers buffers(64);
  const TensorState t = buffers.state(true);
  std::int64_t step = 1;
  for (auto _ : state) optimizer.adam_step({}, step++, std::span(&t, 1));
}
BENCHMARK(BM_StepFixedCost)->Arg(1)->Arg(2)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();

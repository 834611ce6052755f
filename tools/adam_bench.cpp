#include "tools/adam_bench.hpp"
#include "tools/median.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"

namespace zinf::bench {
namespace {

using cpu_adam::DType;

std::size_t size_of(DType d) { return d == DType::f32 ? 4 : 2; }

// Anonymous memory, huge-page advised and faulted in once: first touches
// cost ~11 us per 4 KiB page on the reference machine and must not be timed.
class Arena {
 public:
  explicit Arena(std::uint64_t bytes) : bytes_(align_up(std::max<std::uint64_t>(bytes, 1), 2 * MiB)) {
    void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      throw Error(ErrorKind::resource, fmt::format("cannot map {} for the benchmark", format_bytes(bytes_)));
    }
    base_ = static_cast<std::byte*>(p);
    ::madvise(base_, bytes_, MADV_HUGEPAGE);
#ifdef MADV_POPULATE_WRITE
    if (::madvise(base_, bytes_, MADV_POPULATE_WRITE) != 0) std::memset(base_, 0, bytes_);
#else
    std::memset(base_, 0, bytes_);
#endif
  }
  ~Arena() { ::munmap(base_, bytes_); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  std::byte* take(std::uint64_t bytes) {
    std::byte* p = base_ + used_;
    used_ += align_up(bytes, 4096);
    return p;
  }

 private:
  std::byte* base_ = nullptr;
  std::uint64_t bytes_ = 0;
  std::uint64_t used_ = 0;
};

void fill(std::byte* data, std::uint64_t count, DType d, float value, float step) {
  for (std::uint64_t i = 0; i < count; ++i) {
    const float x = value + step * static_cast<float>(i % 1024);
    if (d == DType::f32) {
      std::memcpy(data + 4 * i, &x, 4);
    } else {
      const std::uint16_t h = d == DType::bf16 ? cpu_adam::float_to_bf16(x) : cpu_adam::float_to_f16(x);
      std::memcpy(data + 2 * i, &h, 2);
    }
  }
}

}  // namespace

std::string AdamCase::label() const {
  std::string text = fmt::format("{} {}", optimizer, cpu_adam::to_string(param));
  if (grad != param) text += fmt::format(" grad {}", cpu_adam::to_string(grad));
  if (state != param) text += fmt::format(" state {}", cpu_adam::to_string(state));
  if (copy) text += fmt::format(" +{} copy", cpu_adam::to_string(*copy));
  if (tensors > 1) text += fmt::format(" ({} x {})", tensors, elements);
  return text;
}

std::uint64_t AdamCase::bytes_per_param() const {
  const std::uint64_t p = size_of(param), g = size_of(grad), s = size_of(state);
  const std::uint64_t states = optimizer == "adagrad" || optimizer == "lion" ? 1 : 2;
  return 2 * p + g + 2 * states * s + (copy ? size_of(*copy) : 0);
}

nlohmann::json AdamResult::to_json() const {
  return {{"optimizer", spec.optimizer},
          {"tier", cpu_adam::to_string(spec.tier)},
          {"threads", threads},
          {"param", cpu_adam::to_string(spec.param)},
          {"grad", cpu_adam::to_string(spec.grad)},
          {"state", cpu_adam::to_string(spec.state)},
          {"copy", spec.copy ? std::string(cpu_adam::to_string(*spec.copy)) : std::string("none")},
          {"elements_per_tensor", spec.elements},
          {"tensors", spec.tensors},
          {"bytes_per_param", spec.bytes_per_param()},
          {"params_per_s", params_per_s},
          {"limit_params_per_s", limit_params_per_s},
          {"fraction_of_limit", fraction()},
          {"gb_per_s", gb_per_s()}};
}

AdamResult run_adam_case(const AdamCase& spec, cpu_adam::CpuOptimizer& optimizer, int repeats,
                         double min_seconds) {
  const std::uint64_t n = spec.elements;
  const std::uint64_t per_tensor = align_up(n * size_of(spec.param), 4096) +
                                   align_up(n * size_of(spec.grad), 4096) +
                                   2 * align_up(n * size_of(spec.state), 4096) +
                                   (spec.copy ? align_up(n * size_of(*spec.copy), 4096) : 0);
  Arena arena(per_tensor * spec.tensors);
  std::vector<cpu_adam::TensorState> tensors(spec.tensors);
  for (auto& t : tensors) {
    t.param = {arena.take(n * size_of(spec.param)), n, spec.param};
    t.grad = {arena.take(n * size_of(spec.grad)), n, spec.grad};
    t.exp_avg = {arena.take(n * size_of(spec.state)), n, spec.state};
    t.exp_avg_sq = {arena.take(n * size_of(spec.state)), n, spec.state};
    if (spec.copy) t.param_copy = {arena.take(n * size_of(*spec.copy)), n, *spec.copy};
    fill(static_cast<std::byte*>(t.param.data), n, spec.param, 0.5f, 1e-4f);
    // Positive grads: bandwidth_step adds them to exp_avg_sq, which must stay
    // non-negative or later Adam timings would run on NaNs.
    fill(static_cast<std::byte*>(t.grad.data), n, spec.grad, 0.001f, 2e-6f);
  }
  const std::uint64_t total = n * spec.tensors;

  std::int64_t step = 1;
  const auto optimizer_step = [&] {
    if (spec.optimizer == "adagrad") {
      optimizer.adagrad_step({}, step, tensors);
    } else if (spec.optimizer == "lion") {
      optimizer.lion_step({}, step, tensors);
    } else {
      cpu_adam::AdamOptions o;
      o.adamw_mode = spec.optimizer == "adamw";
      o.weight_decay = 0.01f;
      optimizer.adam_step(o, step, tensors);
    }
    ++step;
  };
  const auto bandwidth_step = [&] { optimizer.bandwidth_step(tensors); };
  // Steps per timing so one timing lasts at least min_seconds.
  const auto time_steps = [&](const auto& fn, int steps) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) fn();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  optimizer_step();  // warm up: caches, pages, thread wake-ups
  const double once = std::max(time_steps(optimizer_step, 1), 1e-6);
  const int steps = std::max(1, static_cast<int>(min_seconds / once));

  std::vector<double> adam_rates, limit_rates;
  for (int r = 0; r < repeats; ++r) {
    // Alternated so drift in the machine's bandwidth hits both alike.
    limit_rates.push_back(static_cast<double>(total) * steps / time_steps(bandwidth_step, steps));
    adam_rates.push_back(static_cast<double>(total) * steps / time_steps(optimizer_step, steps));
  }
  AdamResult result;
  result.spec = spec;
  result.threads = optimizer.threads();
  result.params_per_s = median(adam_rates);
  result.limit_params_per_s = median(limit_rates);
  return result;
}

}  // namespace zinf::bench

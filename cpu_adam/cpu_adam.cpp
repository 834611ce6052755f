#include "cpu_adam/cpu_adam.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"
#include "cpu_adam/kernel_table.hpp"
#include "cpu_adam/thread_pool.hpp"

namespace zinf::cpu_adam {

std::string_view to_string(DType dtype) {
  switch (dtype) {
    case DType::f32: return "fp32";
    case DType::bf16: return "bf16";
    case DType::f16: return "fp16";
  }
  return "unknown";
}

DType parse_dtype(std::string_view text) {
  if (text == "fp32" || text == "f32" || text == "float32") return DType::f32;
  if (text == "bf16" || text == "bfloat16") return DType::bf16;
  if (text == "fp16" || text == "f16" || text == "float16") return DType::f16;
  throw Error(ErrorKind::invalid, fmt::format("unknown dtype '{}': expected fp32, bf16 or fp16", text));
}

static_assert(kMomentBlock == kQuantBlock, "one block size for the API and the kernels");

std::string_view to_string(MomentFormat format) {
  switch (format) {
    case MomentFormat::fp32: return "fp32";
    case MomentFormat::bf16: return "bf16";
    case MomentFormat::int8: return "int8";
  }
  return "unknown";
}

MomentFormat parse_moment_format(std::string_view text) {
  if (text == "fp32") return MomentFormat::fp32;
  if (text == "bf16") return MomentFormat::bf16;
  if (text == "int8") return MomentFormat::int8;
  throw Error(ErrorKind::invalid, fmt::format("unknown moment format '{}': expected fp32, bf16 or int8", text));
}

std::size_t moment_bytes(MomentFormat format, std::size_t elements) {
  switch (format) {
    case MomentFormat::fp32: return elements * 4;
    case MomentFormat::bf16: return elements * 2;
    case MomentFormat::int8:
      return ((elements + 3) & ~std::size_t{3}) + (elements + kQuantBlock - 1) / kQuantBlock * 4;
  }
  return 0;
}

namespace {

std::uint32_t mix32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The rounding stream of one tensor at one step.
std::uint32_t rounding_salt(std::int64_t step, std::uint64_t seed) {
  const auto s = static_cast<std::uint64_t>(step);
  return mix32(mix32(static_cast<std::uint32_t>(seed) ^ mix32(static_cast<std::uint32_t>(seed >> 32) + 0x632be5abu)) ^
               (static_cast<std::uint32_t>(s) * 0x9e3779b9u) ^ static_cast<std::uint32_t>(s >> 32));
}

}  // namespace

namespace {

const KernelTable& table_for(Tier tier) {
  switch (tier) {
    case Tier::avx512: return avx512_kernels();
    case Tier::avx2: return avx2_kernels();
    case Tier::scalar: break;
  }
  return scalar_kernels();
}

enum class Uses { adam, adagrad, lion, bandwidth };

[[noreturn]] void bad(std::size_t index, const std::string& message) {
  throw Error(ErrorKind::invalid, fmt::format("tensor {}: {}", index, message));
}

void check_hyper(const char* name, float value, bool ok, const char* rule) {
  if (!std::isfinite(value) || !ok) {
    throw Error(ErrorKind::invalid,
                fmt::format("optimizer {} is {}: it must be finite and {}", name, value, rule));
  }
}

// A resolved unit of work: one tensor with its kernel arguments.
struct Job {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* copy;
  std::size_t count;
  int p, g, s, c;  // table indices (s: the moment format for compressed steps)
  std::uint32_t salt = 0;
  std::size_t begin = 0;  // the elements to step: [begin, end)
  std::size_t end = 0;
};

std::size_t size_of(DType d) { return d == DType::f32 ? 4 : 2; }

// A byte range some kernel will touch, for the aliasing check.
struct Span {
  std::uintptr_t begin, end;
  std::size_t tensor;
  const char* name;
  bool written;
};

void check_overlaps(std::vector<Span>& spans);

// Fills `jobs` (reused between steps: no allocation once warm).
void resolve(std::span<const TensorState> tensors, Uses uses, std::vector<Job>& jobs,
             std::vector<Span>& spans) {
  jobs.clear();
  spans.clear();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const TensorState& t = tensors[i];
    const std::size_t n = t.param.count;
    for (const Buffer* b : {&t.param, &t.grad, &t.exp_avg, &t.exp_avg_sq, &t.param_copy}) {
      if (static_cast<unsigned>(b->dtype) > static_cast<unsigned>(DType::f16)) {
        bad(i, fmt::format("dtype value {} is not fp32, bf16 or fp16", static_cast<unsigned>(b->dtype)));
      }
    }
    if (n > (std::size_t{1} << 60)) bad(i, fmt::format("{} elements is out of range", n));
    const bool needs_m = uses == Uses::adam || uses == Uses::lion || uses == Uses::bandwidth;
    const bool needs_v = uses == Uses::adam || uses == Uses::adagrad || uses == Uses::bandwidth;
    if (t.grad.count != n) bad(i, fmt::format("length mismatch: grad has {} elements, param {}", t.grad.count, n));
    if (needs_m && t.exp_avg.count != n) {
      bad(i, fmt::format("length mismatch: exp_avg has {} elements, param {}", t.exp_avg.count, n));
    }
    if (n == 0) continue;  // an empty tensor: nothing to read or write
    if (t.param.data == nullptr) bad(i, "param buffer is null");
    if (t.grad.data == nullptr) bad(i, "grad buffer is null");
    if (needs_m && t.exp_avg.data == nullptr) bad(i, "exp_avg buffer is null");
    if (needs_v && t.exp_avg_sq.data == nullptr) bad(i, "exp_avg_sq buffer is null");
    if (needs_v && t.exp_avg_sq.count != n) {
      bad(i, fmt::format("length mismatch: exp_avg_sq has {} elements, param {}", t.exp_avg_sq.count, n));
    }
    if (needs_m && needs_v && t.exp_avg.dtype != t.exp_avg_sq.dtype) {
      bad(i, fmt::format("exp_avg is {} but exp_avg_sq is {}: both states must have one dtype",
                         to_string(t.exp_avg.dtype), to_string(t.exp_avg_sq.dtype)));
    }
    const DType state = needs_m ? t.exp_avg.dtype : t.exp_avg_sq.dtype;
    int copy = 0;
    if (t.param_copy.data != nullptr) {
      if (t.param_copy.dtype == DType::f32) bad(i, "param_copy must be bf16 or fp16");
      if (t.param_copy.count != n) {
        bad(i, fmt::format("length mismatch: param_copy has {} elements, param {}", t.param_copy.count, n));
      }
      copy = static_cast<int>(t.param_copy.dtype);
    }
    Job job{t.param.data, t.grad.data, t.exp_avg.data, t.exp_avg_sq.data, t.param_copy.data, n,
            static_cast<int>(t.param.dtype), static_cast<int>(t.grad.dtype),
            static_cast<int>(state), copy, 0, 0, n};
    // The scalar table has every supported combination: check against it.
    if (scalar_kernels().adam[job.p][job.g][job.s][job.c] == nullptr) {
      bad(i, fmt::format("unsupported dtypes: param {}, grad {}, state {}{}; supported: fp32 "
                         "params with fp32 states, any grad and an optional bf16/fp16 copy; "
                         "bf16/fp16 params with states of the param type or fp32 and grads of "
                         "the param type or fp32",
                         to_string(t.param.dtype), to_string(t.grad.dtype), to_string(state),
                         copy == 0 ? "" : fmt::format(", copy {}", to_string(t.param_copy.dtype))));
    }
    jobs.push_back(job);
    const auto add = [&](const Buffer& b, const char* name, bool written) {
      const auto begin = reinterpret_cast<std::uintptr_t>(b.data);
      spans.push_back(Span{begin, begin + n * size_of(b.dtype), i, name, written});
    };
    add(t.param, "param", true);
    add(t.grad, "grad", false);
    if (needs_m) add(t.exp_avg, "exp_avg", true);
    if (needs_v) add(t.exp_avg_sq, "exp_avg_sq", true);
    if (copy != 0) add(t.param_copy, "param_copy", true);
  }
  check_overlaps(spans);
}

// Two threads updating the same bytes would race, and a buffer overlapping
// another of its own tensor gives wrong results: refuse any overlap that
// involves a written buffer (grads may share memory with each other).
void check_overlaps(std::vector<Span>& spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  for (std::size_t k = 0; k + 1 < spans.size(); ++k) {
    const Span& a = spans[k];
    for (std::size_t j = k + 1; j < spans.size() && spans[j].begin < a.end; ++j) {
      const Span& b = spans[j];
      if (a.written || b.written) {
        throw Error(ErrorKind::invalid,
                    fmt::format("tensor {}'s {} overlaps tensor {}'s {}: optimizer buffers must not "
                                "share memory (list a tied parameter once)",
                                a.tensor, a.name, b.tensor, b.name));
      }
    }
  }
}

// Compressed-moment tensors (fills `jobs`, Job::s is the format).
void resolve_compressed(std::span<const CompressedTensorState> tensors, MomentFormat format,
                        std::int64_t step, std::vector<Job>& jobs, std::vector<Span>& spans) {
  jobs.clear();
  spans.clear();
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const CompressedTensorState& t = tensors[i];
    const std::size_t n = t.param.count;
    if (n > (std::size_t{1} << 60)) bad(i, fmt::format("{} elements is out of range", n));
    if (t.param.dtype != DType::f32) {
      bad(i, fmt::format("param is {}: compressed moments need fp32 master params", to_string(t.param.dtype)));
    }
    if (static_cast<unsigned>(t.grad.dtype) > static_cast<unsigned>(DType::f16)) {
      bad(i, fmt::format("grad dtype value {} is not fp32, bf16 or fp16", static_cast<unsigned>(t.grad.dtype)));
    }
    if (t.grad.count != n) bad(i, fmt::format("length mismatch: grad has {} elements, param {}", t.grad.count, n));
    if (n == 0) continue;
    if (t.param.data == nullptr) bad(i, "param buffer is null");
    if (t.grad.data == nullptr) bad(i, "grad buffer is null");
    if (t.exp_avg == nullptr) bad(i, "exp_avg buffer is null");
    if (t.exp_avg_sq == nullptr) bad(i, "exp_avg_sq buffer is null");
    int copy = 0;
    if (t.param_copy.data != nullptr) {
      if (t.param_copy.dtype != DType::bf16 && t.param_copy.dtype != DType::f16) {
        bad(i, "param_copy must be bf16 or fp16");
      }
      if (t.param_copy.count != n) {
        bad(i, fmt::format("length mismatch: param_copy has {} elements, param {}", t.param_copy.count, n));
      }
      copy = static_cast<int>(t.param_copy.dtype);
    }
    const std::size_t end = t.end == 0 ? n : t.end;
    if (end > n || t.begin > end) {
      bad(i, fmt::format("range [{}, {}) of {} elements: it must lie in the tensor", t.begin, end, n));
    }
    Job job{t.param.data, t.grad.data, t.exp_avg, t.exp_avg_sq, t.param_copy.data, n, 0,
            static_cast<int>(t.grad.dtype), static_cast<int>(format) - 1, copy, rounding_salt(step, t.seed),
            t.begin, end};
    jobs.push_back(job);
    const auto add = [&](const void* data, std::size_t bytes, const char* name, bool written) {
      const auto begin = reinterpret_cast<std::uintptr_t>(data);
      spans.push_back(Span{begin, begin + bytes, i, name, written});
    };
    add(t.param.data, n * 4, "param", true);
    add(t.grad.data, n * size_of(t.grad.dtype), "grad", false);
    add(t.exp_avg, moment_bytes(format, n), "exp_avg", true);
    add(t.exp_avg_sq, moment_bytes(format, n), "exp_avg_sq", true);
    if (copy != 0) add(t.param_copy.data, n * 2, "param_copy", true);
  }
  check_overlaps(spans);
}

// Elements per split unit: ranges start on 64-element boundaries of their
// tensor, so two threads never write the same cache line of one array.
// Compressed steps split on their blocks (kQuantBlock).
constexpr std::size_t kGrain = 64;
// Below this many elements a step runs on the calling thread alone.
constexpr std::size_t kSerialElements = 16384;

}  // namespace

struct CpuOptimizer::Impl {
  explicit Impl(std::size_t threads) : pool(threads) {}
  ThreadPool pool;
  std::vector<Job> jobs;    // reused every step
  std::vector<Span> spans;  // reused every step

  // Splits the concatenation of all jobs' ranges into one contiguous share
  // per thread and calls run(job, begin, end) for each piece of a share.
  // Pieces are cut on multiples of `grain` of their tensor, even where a
  // range begins between two: no two threads touch one grain (a cache line,
  // or an 8-bit moment block decoded and re-encoded whole).
  template <class Run>
  void for_each_range(const Run& run, const std::size_t grain = kGrain) {
    const auto start_of = [grain](const Job& job) { return job.begin - job.begin % grain; };
    const auto grains_of = [&](const Job& job) {
      return job.end > job.begin ? (job.end - start_of(job) + grain - 1) / grain : 0;
    };
    std::size_t total = 0;
    for (const Job& job : jobs) total += grains_of(job);
    // A step this small takes less time than waking the workers (tens of
    // microseconds): the calling thread runs it alone. Each element's
    // result does not depend on the thread that computes it.
    const std::size_t threads = total * grain < kSerialElements ? 1 : pool.size();
    auto share = [&](std::size_t index) {
      const std::size_t first = total * index / threads;
      const std::size_t last = total * (index + 1) / threads;
      std::size_t base = 0;  // grains before the current job
      for (const Job& job : jobs) {
        const std::size_t grains = grains_of(job);
        const std::size_t from = std::max(first, base);
        const std::size_t to = std::min(last, base + grains);
        if (from < to) {
          const std::size_t start = start_of(job);
          run(job, std::max(job.begin, start + (from - base) * grain), std::min(job.end, start + (to - base) * grain));
        }
        base += grains;
        if (base >= last) break;
      }
    };
    if (threads == 1) {
      share(0);
    } else {
      pool.run(share);
    }
  }
};

CpuOptimizer::CpuOptimizer(std::size_t threads, std::optional<Tier> tier)
    : impl_(std::make_unique<Impl>(threads)), tier_(tier ? *tier : default_tier()) {
  if (tier && !tier_supported(*tier, detect_cpu_features())) {
    throw Error(ErrorKind::unsupported,
                fmt::format("the {} optimizer tier needs CPU features this machine lacks ({})",
                            to_string(*tier), detect_cpu_features().describe()));
  }
}

CpuOptimizer::~CpuOptimizer() = default;

std::size_t CpuOptimizer::threads() const { return impl_->pool.size(); }

namespace {

// Checks Adam's hyper-parameters and computes one step's scalars.
AdamScalars adam_scalars(const AdamOptions& o, std::int64_t step) {
  check_hyper("lr", o.lr, o.lr >= 0, "non-negative");
  check_hyper("beta1", o.beta1, o.beta1 >= 0 && o.beta1 < 1, "in [0, 1)");
  check_hyper("beta2", o.beta2, o.beta2 >= 0 && o.beta2 < 1, "in [0, 1)");
  check_hyper("eps", o.eps, o.eps >= 0, "non-negative");
  check_hyper("weight_decay", o.weight_decay, o.weight_decay >= 0, "non-negative");
  ZINF_CHECK(step >= 1, fmt::format("optimizer step is {}: steps count from 1", step));
  AdamScalars s{};
  const double t = static_cast<double>(step);
  const double bc1 = o.bias_correction ? 1.0 - std::pow(static_cast<double>(o.beta1), t) : 1.0;
  const double bc2 = o.bias_correction ? std::sqrt(1.0 - std::pow(static_cast<double>(o.beta2), t)) : 1.0;
  s.beta1 = o.beta1;
  s.beta2 = o.beta2;
  s.one_minus_beta1 = static_cast<float>(1.0 - o.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
  s.eps = o.eps;
  s.weight_decay = o.weight_decay;
  s.decay = static_cast<float>(1.0 - static_cast<double>(o.lr) * o.weight_decay);
  s.step_size = static_cast<float>(o.lr / bc1);
  s.inv_bias_correction2 = static_cast<float>(1.0 / bc2);
  s.adamw = o.adamw_mode;
  s.use_weight_decay = o.weight_decay > 0;
  return s;
}

}  // namespace

void CpuOptimizer::adam_step(const AdamOptions& o, std::int64_t step,
                             std::span<const TensorState> tensors) {
  const AdamScalars s = adam_scalars(o, step);
  resolve(tensors, Uses::adam, impl_->jobs, impl_->spans);
  const KernelTable& table = table_for(tier_);
  impl_->for_each_range([&](const Job& j, std::size_t begin, std::size_t end) {
    table.adam[j.p][j.g][j.s][j.c](s, j.param, j.grad, j.exp_avg, j.exp_avg_sq, j.copy, begin, end);
  });
}

void CpuOptimizer::adam_step(const AdamOptions& o, std::int64_t step, MomentFormat format,
                             std::span<const CompressedTensorState> tensors) {
  const AdamScalars s = adam_scalars(o, step);
  if (format == MomentFormat::fp32) {
    // fp32 moments are plain tensors: a range is the same buffers from its begin.
    std::vector<TensorState> plain(tensors.size());
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const std::size_t end = t.end == 0 ? t.param.count : t.end;
      if (end > t.param.count || t.begin > end) {
        bad(i, fmt::format("range [{}, {}) of {} elements: it must lie in the tensor", t.begin, end, t.param.count));
      }
      const std::size_t n = end - t.begin;
      const auto from = [&](const Buffer& b) {
        if (b.data == nullptr) return b;
        return Buffer{static_cast<std::byte*>(b.data) + t.begin * size_of(b.dtype), n, b.dtype};
      };
      const auto moment = [&](void* data) {
        return Buffer{data == nullptr ? nullptr : static_cast<float*>(data) + t.begin, n, DType::f32};
      };
      plain[i] = TensorState{from(t.param), from(t.grad), moment(t.exp_avg), moment(t.exp_avg_sq),
                             from(t.param_copy)};
    }
    adam_step(o, step, plain);
    return;
  }
  if (format != MomentFormat::bf16 && format != MomentFormat::int8) {
    throw Error(ErrorKind::invalid, fmt::format("moment format value {} is not fp32, bf16 or int8",
                                                static_cast<unsigned>(format)));
  }
  resolve_compressed(tensors, format, step, impl_->jobs, impl_->spans);
  const KernelTable& table = table_for(tier_);
  impl_->for_each_range(
      [&](const Job& j, std::size_t begin, std::size_t end) {
        table.adam_compressed[j.s][j.g][j.c](s, j.salt, j.param, j.grad, j.exp_avg, j.exp_avg_sq, j.copy,
                                             j.count, begin, end);
      },
      kQuantBlock);
}

void encode_moment(MomentFormat format, bool second, std::span<const float> values, void* out,
                   std::uint64_t seed) {
  if (values.empty()) return;
  ZINF_CHECK(out != nullptr, "encode_moment: the output buffer is null");
  if (format == MomentFormat::fp32) {
    std::memcpy(out, values.data(), values.size_bytes());
    return;
  }
  const KernelTable& table = table_for(default_tier());
  table.encode[static_cast<int>(format) - 1](values.data(), out, second, rounding_salt(0, seed), values.size(), 0,
                                             values.size());
}

void decode_moment(MomentFormat format, bool second, const void* in, std::span<float> values) {
  if (values.empty()) return;
  ZINF_CHECK(in != nullptr, "decode_moment: the input buffer is null");
  if (format == MomentFormat::fp32) {
    std::memcpy(values.data(), in, values.size_bytes());
    return;
  }
  const KernelTable& table = table_for(default_tier());
  table.decode[static_cast<int>(format) - 1](in, values.data(), second, values.size(), 0, values.size());
}

void CpuOptimizer::adagrad_step(const AdagradOptions& o, std::int64_t step,
                                std::span<const TensorState> tensors) {
  check_hyper("lr", o.lr, o.lr >= 0, "non-negative");
  check_hyper("eps", o.eps, o.eps >= 0, "non-negative");
  check_hyper("weight_decay", o.weight_decay, o.weight_decay >= 0, "non-negative");
  ZINF_CHECK(step >= 1, fmt::format("optimizer step is {}: steps count from 1", step));
  resolve(tensors, Uses::adagrad, impl_->jobs, impl_->spans);
  AdagradScalars s{o.lr, o.eps, o.weight_decay, o.weight_decay > 0};
  const KernelTable& table = table_for(tier_);
  impl_->for_each_range([&](const Job& j, std::size_t begin, std::size_t end) {
    table.adagrad[j.p][j.g][j.s][j.c](s, j.param, j.grad, j.exp_avg_sq, j.copy, begin, end);
  });
}

void CpuOptimizer::lion_step(const LionOptions& o, std::int64_t step,
                             std::span<const TensorState> tensors) {
  check_hyper("lr", o.lr, o.lr >= 0, "non-negative");
  check_hyper("beta1", o.beta1, o.beta1 >= 0 && o.beta1 < 1, "in [0, 1)");
  check_hyper("beta2", o.beta2, o.beta2 >= 0 && o.beta2 < 1, "in [0, 1)");
  check_hyper("weight_decay", o.weight_decay, o.weight_decay >= 0, "non-negative");
  ZINF_CHECK(step >= 1, fmt::format("optimizer step is {}: steps count from 1", step));
  resolve(tensors, Uses::lion, impl_->jobs, impl_->spans);
  LionScalars s{};
  s.lr = o.lr;
  s.beta1 = o.beta1;
  s.beta2 = o.beta2;
  s.one_minus_beta1 = static_cast<float>(1.0 - o.beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
  s.decay = static_cast<float>(1.0 - static_cast<double>(o.lr) * o.weight_decay);
  s.use_weight_decay = o.weight_decay > 0;
  const KernelTable& table = table_for(tier_);
  impl_->for_each_range([&](const Job& j, std::size_t begin, std::size_t end) {
    table.lion[j.p][j.g][j.s][j.c](s, j.param, j.grad, j.exp_avg, j.copy, begin, end);
  });
}

void CpuOptimizer::bandwidth_step(std::span<const TensorState> tensors) {
  resolve(tensors, Uses::bandwidth, impl_->jobs, impl_->spans);
  const KernelTable& table = table_for(tier_);
  impl_->for_each_range([&](const Job& j, std::size_t begin, std::size_t end) {
    table.bandwidth[j.p][j.g][j.s][j.c](j.param, j.grad, j.exp_avg, j.exp_avg_sq, j.copy, begin, end);
  });
}

}  // namespace zinf::cpu_adam

#include "swap/optimizer_swapper.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"
#include "swap/gradient_swapper.hpp"

namespace zinf::swap {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<SubGroup> swapped_groups(std::span<const SubGroup> groups, std::uint64_t resident_below_bytes) {
  std::vector<SubGroup> swapped;
  for (const auto& group : groups) {
    if (!stays_resident(group, resident_below_bytes)) swapped.push_back(group);
  }
  return swapped;
}

std::size_t largest_group(std::span<const SubGroup> groups) {
  std::size_t largest = 0;
  for (const auto& group : groups) largest = std::max(largest, group.elements);
  return largest;
}

// Each tensor's region in a slot: the largest sub-group's bytes, aligned.
std::vector<std::uint64_t> region_bytes(std::span<const SubGroup> groups, std::size_t tensors,
                                        std::uint64_t alignment, cpu_adam::MomentFormat format) {
  std::vector<std::uint64_t> regions;
  for (std::size_t t = 0; t < tensors; ++t) {
    const std::uint64_t bytes = OptimizerSwapper::tensor_bytes(t, largest_group(groups), format);
    regions.push_back(std::max<std::uint64_t>(align_up(bytes, alignment), alignment));
  }
  return regions;
}

// Durations accumulate into the step's stats.
class Timed {
 public:
  explicit Timed(std::chrono::nanoseconds& sink) : sink_(sink), start_(Clock::now()) {}
  ~Timed() { sink_ += Clock::now() - start_; }
  Timed(const Timed&) = delete;
  Timed& operator=(const Timed&) = delete;

 private:
  std::chrono::nanoseconds& sink_;
  Clock::time_point start_;
};

// Waits for every ticket (all of them, so no buffer is still in use), clears
// the list, and throws the first error.
void wait_tickets(SwapStore& store, std::vector<SwapTicket>& tickets) {
  std::optional<Error> first;
  for (auto ticket : tickets) {
    try {
      store.wait(ticket);
    } catch (const Error& error) {
      if (!first) first.emplace(error);
    }
  }
  tickets.clear();
  if (first) throw Error(*first);
}

}  // namespace

// One pinned buffer holding a sub-group's param and states, and the
// tickets of the I/O on it.
struct OptimizerSwapper::Slot {
  PinnedBuffer buffer;
  std::vector<std::uint64_t> offsets;  // of each tensor's region
  std::vector<std::uint64_t> regions;  // bytes of each tensor's region
  std::vector<SwapTicket> reads;
  std::vector<SwapTicket> writes;
  std::optional<std::size_t> writing_group;

  std::span<std::byte> tensor(std::size_t index) const {
    return {buffer.data() + offsets[index], regions[index]};
  }
  float* floats(std::size_t index) const {
    return reinterpret_cast<float*>(buffer.data() + offsets[index]);
  }
};

std::uint64_t OptimizerSwapper::tensor_bytes(std::size_t index, std::size_t elements,
                                             cpu_adam::MomentFormat format) {
  return index == 0 ? elements * sizeof(float) : cpu_adam::moment_bytes(format, elements);
}

std::uint64_t OptimizerSwapper::bytes_of(std::size_t group, std::size_t tensor) const {
  return tensor_bytes(tensor, groups_[group].elements, options_.moment_format);
}

std::vector<std::string> OptimizerSwapper::state_names(OptimizerKind kind) {
  switch (kind) {
    case OptimizerKind::adam: return {"exp_avg", "exp_avg_sq"};
    case OptimizerKind::adagrad: return {"exp_avg_sq"};
    case OptimizerKind::lion: return {"exp_avg"};
  }
  return {};
}

std::uint64_t OptimizerSwapper::pinned_bytes_needed(std::span<const SubGroup> groups,
                                                    OptimizerKind kind, bool overlap,
                                                    std::uint64_t alignment,
                                                    cpu_adam::MomentFormat format,
                                                    std::uint64_t resident_below_bytes) {
  const std::vector<SubGroup> swapped = swapped_groups(groups, resident_below_bytes);
  if (swapped.empty()) return 0;
  std::uint64_t slot = 0;
  for (const std::uint64_t region : region_bytes(swapped, 1 + state_names(kind).size(), alignment, format)) {
    slot += region;
  }
  return (overlap ? 3 : 1) * slot;
}

namespace {

void check_format(const OptimizerSwapperOptions& options) {
  if (options.moment_format != cpu_adam::MomentFormat::fp32 && options.optimizer.kind != OptimizerKind::adam) {
    ErrorContext ctx;
    ctx.key_path = "zero_optimization.offload_optimizer.state_format";
    throw Error(ErrorKind::config,
                fmt::format("state_format {} compresses Adam's moments; this optimizer is {}: use fp32",
                            cpu_adam::to_string(options.moment_format),
                            options.optimizer.kind == OptimizerKind::lion ? "Lion" : "Adagrad"),
                std::move(ctx));
  }
}

}  // namespace

OptimizerSwapper::OptimizerSwapper(SwapStore& store, PinnedPool& pool,
                                   cpu_adam::CpuOptimizer& optimizer,
                                   std::vector<SubGroup> groups, OptimizerSwapperOptions options)
    : store_(&store),
      optimizer_(optimizer),
      groups_(std::move(groups)),
      options_(std::move(options)),
      states_(state_names(options_.optimizer.kind)) {
  ZINF_CHECK(!groups_.empty(), "the optimizer swapper needs at least one sub-group");
  check_format(options_);
  for (const auto& group : groups_) {
    ZINF_CHECK(group.elements > 0 && !group.name.empty(),
               "every sub-group needs a name and at least one element");
  }
  const std::vector<SubGroup> swapped = swapped_groups(groups_, options_.resident_below_bytes);
  for (const auto& group : groups_) resident_.push_back(stays_resident(group, options_.resident_below_bytes));
  host_.resize(groups_.size());
  const std::uint64_t needed = pinned_bytes_needed(groups_, options_.optimizer.kind, options_.overlap,
                                                   store.alignment(), options_.moment_format,
                                                   options_.resident_below_bytes);
  const std::uint64_t capacity = pool.stats().capacity_bytes;
  if (needed > capacity || pool.alignment() % store.alignment() != 0) {
    const auto largest = std::max_element(
        swapped.begin(), swapped.end(),
        [](const SubGroup& a, const SubGroup& b) { return a.elements < b.elements; });
    throw Error(ErrorKind::resource,
                fmt::format("the optimizer swapper needs {} ({} bytes) of pinned memory ({} "
                            "slot(s) of {} tensors for the largest sub-group '{}', {} elements) "
                            "but the pinned pool holds {}: raise the pinned budget or lower "
                            "zero_optimization.sub_group_size",
                            format_bytes(needed), needed, options_.overlap ? 3 : 1, 1 + states_.size(),
                            largest->name, largest->elements, format_bytes(capacity)));
  }
  const auto regions = region_bytes(swapped, 1 + states_.size(), store.alignment(), options_.moment_format);
  for (int i = 0; i < (swapped.empty() ? 0 : options_.overlap ? 3 : 1); ++i) {
    auto slot = std::make_unique<Slot>();
    slot->regions = regions;
    std::uint64_t offset = 0;
    for (const std::uint64_t region : regions) {
      slot->offsets.push_back(offset);
      offset += region;
    }
    slot->buffer = pool.acquire(offset, std::chrono::milliseconds(0));
    slots_.push_back(std::move(slot));
  }
  read_recovery();
}

OptimizerSwapper::OptimizerSwapper(cpu_adam::CpuOptimizer& optimizer,
                                   std::vector<SubGroup> groups, OptimizerSwapperOptions options)
    : optimizer_(optimizer),
      groups_(std::move(groups)),
      options_(std::move(options)),
      states_(state_names(options_.optimizer.kind)) {
  ZINF_CHECK(!groups_.empty(), "the optimizer swapper needs at least one sub-group");
  check_format(options_);
  host_.resize(groups_.size());
  resident_.assign(groups_.size(), true);
  recovery_.group_steps.assign(groups_.size(), -1);
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    ZINF_CHECK(groups_[g].elements > 0 && !groups_[g].name.empty(),
               "every sub-group needs a name and at least one element");
  }
}

namespace {

float decay_of(const OptimizerSettings& s) {
  switch (s.kind) {
    case OptimizerKind::adam: return s.adam.weight_decay;
    case OptimizerKind::adagrad: return s.adagrad.weight_decay;
    case OptimizerKind::lion: return s.lion.weight_decay;
  }
  return 0.0f;
}

void set_decay(OptimizerSettings& s, float weight_decay) {
  s.adam.weight_decay = s.adagrad.weight_decay = s.lion.weight_decay = weight_decay;
}

// Whether one kernel call can step both (with the decay done apart).
bool same_but_decay(const OptimizerSettings& a, const OptimizerSettings& b) {
  switch (a.kind) {
    case OptimizerKind::adam:
      return a.adam.lr == b.adam.lr && a.adam.beta1 == b.adam.beta1 && a.adam.beta2 == b.adam.beta2 &&
             a.adam.eps == b.adam.eps;
    case OptimizerKind::adagrad: return a.adagrad.lr == b.adagrad.lr && a.adagrad.eps == b.adagrad.eps;
    case OptimizerKind::lion:
      return a.lion.lr == b.lion.lr && a.lion.beta1 == b.lion.beta1 && a.lion.beta2 == b.lion.beta2;
  }
  return false;
}

}  // namespace

bool stays_resident(const SubGroup& group, std::uint64_t resident_below_bytes) {
  return group.elements * sizeof(float) < resident_below_bytes;
}

float learning_rate_of(const OptimizerSettings& settings) {
  switch (settings.kind) {
    case OptimizerKind::adam: return settings.adam.lr;
    case OptimizerKind::adagrad: return settings.adagrad.lr;
    case OptimizerKind::lion: return settings.lion.lr;
  }
  return settings.adam.lr;
}

void check_param_group(std::size_t index, const ParamGroupSettings& settings) {
  const auto check = [index](const char* name, const std::optional<float>& value, bool ok, const char* rule) {
    if (value && (!std::isfinite(*value) || !ok)) {
      throw Error(ErrorKind::invalid,
                  fmt::format("param group {}: {} is {}: it must be finite and {}", index, name, *value, rule));
    }
  };
  check("lr", settings.lr, settings.lr >= 0.0f, "non-negative");
  check("beta1", settings.beta1, settings.beta1 >= 0.0f && settings.beta1 < 1.0f, "in [0, 1)");
  check("beta2", settings.beta2, settings.beta2 >= 0.0f && settings.beta2 < 1.0f, "in [0, 1)");
  check("eps", settings.eps, settings.eps >= 0.0f, "non-negative");
  check("weight_decay", settings.weight_decay, settings.weight_decay >= 0.0f, "non-negative");
}

OptimizerSettings resolve_settings(const OptimizerSettings& optimizer, const ParamGroupSettings& group) {
  OptimizerSettings s = optimizer;
  if (group.lr) s.adam.lr = s.adagrad.lr = s.lion.lr = *group.lr;
  if (group.beta1) s.adam.beta1 = s.lion.beta1 = *group.beta1;
  if (group.beta2) s.adam.beta2 = s.lion.beta2 = *group.beta2;
  if (group.eps) s.adam.eps = s.adagrad.eps = *group.eps;
  if (group.weight_decay) set_decay(s, *group.weight_decay);
  return s;
}

void OptimizerSwapper::set_param_group(std::size_t index, const ParamGroupSettings& settings) {
  ZINF_CHECK(index <= param_groups_.size(),
             fmt::format("param group {} set before group {}", index, param_groups_.size()));
  check_param_group(index, settings);
  if (index == param_groups_.size()) {
    param_groups_.push_back(settings);
  } else {
    param_groups_[index] = settings;
  }
}

const ParamGroupSettings& OptimizerSwapper::param_group(std::size_t index) const {
  ZINF_CHECK(index < param_groups_.size(), fmt::format("param group {} was never set", index));
  return param_groups_[index];
}

void OptimizerSwapper::set_param_group_ranges(std::size_t group, std::vector<ParamGroupRange> ranges) {
  ZINF_CHECK(group < groups_.size(), "sub-group index out of range");
  std::size_t at = 0;
  for (const auto& range : ranges) {
    if (range.begin != at || range.end <= range.begin || range.param_group >= param_groups_.size()) {
      throw Error(ErrorKind::invalid,
                  fmt::format("sub-group '{}': range [{}, {}) of param group {}: ranges must cover the sub-group "
                              "in order, each non-empty, of a param group that was set ({} are)",
                              groups_[group].name, range.begin, range.end, range.param_group,
                              param_groups_.size()));
    }
    at = range.end;
  }
  if (!ranges.empty() && at != groups_[group].elements) {
    throw Error(ErrorKind::invalid, fmt::format("sub-group '{}': param-group ranges end at {} of {} elements",
                                                groups_[group].name, at, groups_[group].elements));
  }
  if (group_ranges_.size() < groups_.size()) group_ranges_.resize(groups_.size());
  group_ranges_[group] = std::move(ranges);
}

OptimizerSettings OptimizerSwapper::base_settings() const {
  return param_groups_.empty() ? options_.optimizer : resolve_settings(options_.optimizer, param_groups_[0]);
}

std::vector<OptimizerSwapper::Run> OptimizerSwapper::runs_of(std::size_t group) const {
  if (group >= group_ranges_.size() || group_ranges_[group].empty()) {
    return {Run{0, groups_[group].elements, base_settings(), 0, 0, false}};
  }
  const auto& ranges = group_ranges_[group];
  std::vector<Run> runs;
  float first_decay = 0.0f;
  for (std::size_t k = 0; k < ranges.size(); ++k) {
    const OptimizerSettings settings = resolve_settings(options_.optimizer, param_groups_[ranges[k].param_group]);
    if (!runs.empty() && same_but_decay(runs.back().settings, settings)) {
      Run& run = runs.back();
      run.end = ranges[k].end;
      run.last_range = k + 1;
      run.decays_itself = run.decays_itself || decay_of(settings) != first_decay;
    } else {
      runs.push_back(Run{ranges[k].begin, ranges[k].end, settings, k, k + 1, false});
      first_decay = decay_of(settings);
    }
  }
  for (Run& run : runs) {
    if (run.decays_itself) set_decay(run.settings, 0.0f);
  }
  return runs;
}

void OptimizerSwapper::decay_ranges(std::size_t group, const Run& run, float* param,
                                    const cpu_adam::Buffer& grad) const {
  const bool decoupled = (run.settings.kind == OptimizerKind::adam && run.settings.adam.adamw_mode) ||
                         run.settings.kind == OptimizerKind::lion;
  if (!decoupled && grad.dtype != cpu_adam::DType::f32) {
    throw Error(ErrorKind::invalid,
                fmt::format("sub-group '{}': per-range L2 weight decay adds to the gradients, which must be fp32 "
                            "(they are {})", groups_[group].name, cpu_adam::to_string(grad.dtype)));
  }
  auto* g = static_cast<float*>(grad.data);
  for (std::size_t k = run.first_range; k < run.last_range; ++k) {
    const ParamGroupRange& range = group_ranges_[group][k];
    const OptimizerSettings settings = resolve_settings(options_.optimizer, param_groups_[range.param_group]);
    const float weight_decay = decay_of(settings);
    if (weight_decay == 0.0f) continue;
    // The kernels' own operations, so a range decayed here steps exactly as
    // the kernel would have decayed it.
    if (decoupled) {
      const float decay = static_cast<float>(1.0 - static_cast<double>(learning_rate_of(settings)) * weight_decay);
      for (std::size_t i = range.begin; i < range.end; ++i) param[i] = param[i] * decay;
    } else {
      for (std::size_t i = range.begin; i < range.end; ++i) g[i] = g[i] + weight_decay * param[i];
    }
  }
}

float OptimizerSwapper::learning_rate() const { return learning_rate_of(options_.optimizer); }

OptimizerSwapper::~OptimizerSwapper() {
  drain_slots();
}

void OptimizerSwapper::drain_slots() noexcept {
  for (auto& slot : slots_) {
    slot->writing_group.reset();
    for (auto* tickets : {&slot->reads, &slot->writes}) {
      try {
        wait_tickets(*store_, *tickets);
      } catch (...) {  // the caller already has the first error; the manifest is unaffected
      }
    }
  }
}

std::string OptimizerSwapper::key(std::size_t group, std::string_view tensor) const {
  return fmt::format("{}/{}", groups_[group].name, tensor);
}

void OptimizerSwapper::read_recovery() {
  recovery_ = {};
  const std::string format(cpu_adam::to_string(options_.moment_format));
  if (const auto stored = store_->attribute(options_.name + ".state_format"); stored && *stored != format) {
    ErrorContext ctx;
    ctx.key_path = "zero_optimization.offload_optimizer.state_format";
    throw Error(ErrorKind::config,
                fmt::format("the swap directory holds optimizer states in the {} format, the config asks for {}: "
                            "set state_format to {}, or start from a checkpoint in a fresh nvme_path",
                            *stored, format, *stored),
                std::move(ctx));
  }
  if (const auto finished = store_->attribute(options_.name + ".step")) {
    recovery_.finished_step = std::stoll(*finished);
  }
  if (const auto interrupted = store_->attribute(options_.name + ".step_in_progress");
      interrupted && !interrupted->empty()) {
    recovery_.interrupted = std::stoll(*interrupted);
  }
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (resident_[g]) {  // never stored: nothing to recover
      recovery_.group_steps.push_back(-1);
      continue;
    }
    std::optional<std::int64_t> version;
    bool complete = true;
    for (std::size_t t = 0; t <= states_.size(); ++t) {
      const auto info = store_->find(key(g, t == 0 ? "param" : states_[t - 1]));
      if (!info) {
        complete = false;
        break;
      }
      if (info->size_bytes != bytes_of(g, t)) {
        throw Error(ErrorKind::config,
                    fmt::format("sub-group '{}' has {} elements but its stored tensors hold {} "
                                "bytes: the swap directory belongs to another model layout",
                                groups_[g].name, groups_[g].elements, info->size_bytes));
      }
      if (version && *version != info->version) {
        throw Error(ErrorKind::corrupt,
                    fmt::format("sub-group '{}' has tensors from steps {} and {}", groups_[g].name,
                                *version, info->version));
      }
      version = info->version;
    }
    recovery_.group_steps.push_back(complete ? *version : -1);
  }
  step_ = recovery_.finished_step;
}

void OptimizerSwapper::commit_groups(std::int64_t step, bool now) {
  if (now) {
    store_->commit();
  } else if (!store_->commit_after(options_.commit_bytes)) {
    return;
  }
  for (const std::size_t group : uncommitted_) {
    recovery_.group_steps[group] = step;
    if (options_.after_group_committed) options_.after_group_committed(group);
  }
  uncommitted_.clear();
}

void OptimizerSwapper::initialize(std::size_t group, std::span<const float> params,
                                  std::int64_t step,
                                  std::span<const std::span<const float>> states) {
  ZINF_CHECK(group < groups_.size(), "sub-group index out of range");
  ZINF_CHECK(step >= 0, "the step must not be negative");
  const std::size_t n = groups_[group].elements;
  if (params.size() != n) {
    throw Error(ErrorKind::invalid,
                fmt::format("initialize sub-group '{}': {} params given for {} elements",
                            groups_[group].name, params.size(), n));
  }
  if (!states.empty() && states.size() != states_.size()) {
    throw Error(ErrorKind::invalid,
                fmt::format("initialize sub-group '{}': {} state tensors given, this optimizer "
                            "keeps {}",
                            groups_[group].name, states.size(), states_.size()));
  }
  for (const auto& state : states) {
    if (state.size() != n) {
      throw Error(ErrorKind::invalid,
                  fmt::format("initialize sub-group '{}': a state of {} elements for {}",
                              groups_[group].name, state.size(), n));
    }
  }
  // The moments from a checkpoint (encoded in the state format), or zeros
  // for a fresh start (all-zero bytes in every format).
  const auto fill = [&](float* out, std::size_t t) {
    if (states.empty()) {
      std::memset(out, 0, bytes_of(group, t));
    } else {
      cpu_adam::encode_moment(options_.moment_format, t == 2, states[t - 1], out, group);
    }
  };
  if (resident_[group]) {
    // Each tensor built in place: no sub-group-sized temporary on top of the
    // states (it showed in the peak RSS of every run).
    auto& tensors = host_[group];
    tensors.resize(1 + states_.size());
    tensors[0].assign(params.begin(), params.end());
    for (std::size_t t = 1; t <= states_.size(); ++t) {
      tensors[t].resize((bytes_of(group, t) + sizeof(float) - 1) / sizeof(float));
      fill(tensors[t].data(), t);
    }
  } else {
    Slot& slot = *slots_[0];
    std::memcpy(slot.floats(0), params.data(), n * sizeof(float));
    for (std::size_t t = 1; t <= states_.size(); ++t) fill(slot.floats(t), t);
    try {
      submit_writes(group, slot, step);
      wait_writes(slot);
    } catch (...) {
      drain_slots();
      // Whatever of the group did land must not be committed on its own.
      for (std::size_t t = 0; t <= states_.size(); ++t) {
        store_->revert(key(group, t == 0 ? "param" : states_[t - 1]));
      }
      throw;
    }
  }
  recovery_.group_steps[group] = step;
  if (std::all_of(recovery_.group_steps.begin(), recovery_.group_steps.end(),
                  [&](std::int64_t s) { return s == step; })) {
    step_ = step;
    recovery_.finished_step = step;
    recovery_.interrupted.reset();
    if (store_ != nullptr) {
      store_->set_attribute(options_.name + ".step", std::to_string(step));
      store_->set_attribute(options_.name + ".step_in_progress", "");
      store_->set_attribute(options_.name + ".state_format", std::string(cpu_adam::to_string(options_.moment_format)));
      store_->commit();
    }
  } else if (store_ != nullptr && !resident_[group]) {
    store_->commit_after(options_.commit_bytes);  // the last sub-group's commits them all
  }
}

void OptimizerSwapper::roll_back_uncommitted(std::int64_t next) {
  // Sub-groups whose commit did not happen go back, tensor by tensor, to
  // what the manifest names, so no later commit can make a torn sub-group
  // (some tensors at the new step, some at the old) durable.
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (recovery_.group_steps[g] == next || resident_[g]) continue;
    for (std::size_t t = 0; t <= states_.size(); ++t) {
      store_->revert(key(g, t == 0 ? "param" : states_[t - 1]));
    }
  }
}

void OptimizerSwapper::submit_reads(std::size_t group, Slot& slot, GradientSwapper* gradients) {
  ZINF_ASSERT(slot.reads.empty() && slot.writes.empty(), "slot reused while busy");
  if (gradients != nullptr) gradients->prefetch(group);
  for (std::size_t t = 0; t <= states_.size(); ++t) {
    slot.reads.push_back(store_->read(key(group, t == 0 ? "param" : states_[t - 1]),
                                      slot.tensor(t)));
  }
  for (std::size_t t = 0; t <= states_.size(); ++t) last_stats_.bytes_read += bytes_of(group, t);
}

void OptimizerSwapper::wait_reads(Slot& slot) {
  Timed timed(last_stats_.read_wait);
  wait_tickets(*store_, slot.reads);
}

void OptimizerSwapper::submit_writes(std::size_t group, Slot& slot, std::int64_t version) {
  ZINF_ASSERT(slot.writes.empty(), "slot reused while busy");
  for (std::size_t t = 0; t <= states_.size(); ++t) {
    const std::uint64_t bytes = bytes_of(group, t);
    slot.writes.push_back(store_->write(key(group, t == 0 ? "param" : states_[t - 1]),
                                        slot.tensor(t), bytes, version));
    last_stats_.bytes_written += bytes;
  }
  slot.writing_group = group;
}

void OptimizerSwapper::wait_writes(Slot& slot) {
  Timed timed(last_stats_.write_wait);
  slot.writing_group.reset();
  wait_tickets(*store_, slot.writes);
}

void OptimizerSwapper::compute(std::size_t group, float* param, void* exp_avg,
                               void* exp_avg_sq, const cpu_adam::Buffer& grad,
                               const cpu_adam::Buffer& copy) {
  Timed timed(last_stats_.compute);
  const std::size_t n = groups_[group].elements;
  const std::int64_t next = step_ + 1;
  // An fp32 "copy" (fp32 training) is a plain copy after the update; the
  // kernels fuse only the rounding ones.
  const bool f32_copy = copy.data != nullptr && copy.dtype == cpu_adam::DType::f32;
  const auto format = options_.moment_format;
  for (const Run& run : runs_of(group)) {
    if (run.decays_itself) decay_ranges(group, run, param, grad);
    const std::size_t count = run.end - run.begin;
    // The run's part of an element-wise buffer.
    const auto part = [&](const cpu_adam::Buffer& b) {
      if (b.data == nullptr) return b;
      const std::size_t size = b.dtype == cpu_adam::DType::f32 ? 4 : 2;
      return cpu_adam::Buffer{static_cast<std::byte*>(b.data) + run.begin * size, count, b.dtype};
    };
    if (format == cpu_adam::MomentFormat::int8) {
      // Block-wise codes keep the whole sub-group's layout: the kernel
      // steps the run's elements of it (a block two runs share is decoded
      // and re-encoded by each, its other elements kept).
      cpu_adam::CompressedTensorState state;
      state.param = {param, n, cpu_adam::DType::f32};
      state.grad = grad;
      state.exp_avg = exp_avg;
      state.exp_avg_sq = exp_avg_sq;
      if (!f32_copy) state.param_copy = copy;
      state.seed = group;
      state.begin = run.begin;
      state.end = run.end;
      optimizer_.adam_step(run.settings.adam, next, format, std::span(&state, 1));
      continue;
    }
    if (format == cpu_adam::MomentFormat::bf16) {
      cpu_adam::CompressedTensorState state;
      state.param = {param + run.begin, count, cpu_adam::DType::f32};
      state.grad = part(grad);
      state.exp_avg = static_cast<std::uint16_t*>(exp_avg) + run.begin;
      state.exp_avg_sq = static_cast<std::uint16_t*>(exp_avg_sq) + run.begin;
      if (!f32_copy) state.param_copy = part(copy);
      state.seed = group;
      optimizer_.adam_step(run.settings.adam, next, format, std::span(&state, 1));
      continue;
    }
    cpu_adam::TensorState state;
    state.param = {param + run.begin, count, cpu_adam::DType::f32};
    state.grad = part(grad);
    if (!f32_copy) state.param_copy = part(copy);
    const cpu_adam::Buffer first = {exp_avg == nullptr ? nullptr : static_cast<float*>(exp_avg) + run.begin, count,
                                    cpu_adam::DType::f32};
    const cpu_adam::Buffer second = {
        exp_avg_sq == nullptr ? nullptr : static_cast<float*>(exp_avg_sq) + run.begin, count, cpu_adam::DType::f32};
    switch (run.settings.kind) {
      case OptimizerKind::adam:
        state.exp_avg = first;
        state.exp_avg_sq = second;
        optimizer_.adam_step(run.settings.adam, next, std::span(&state, 1));
        break;
      case OptimizerKind::adagrad:
        state.exp_avg_sq = second;
        optimizer_.adagrad_step(run.settings.adagrad, next, std::span(&state, 1));
        break;
      case OptimizerKind::lion:
        state.exp_avg = first;
        optimizer_.lion_step(run.settings.lion, next, std::span(&state, 1));
        break;
    }
  }
  if (f32_copy) std::memcpy(copy.data, param, n * sizeof(float));
}

void OptimizerSwapper::check_grads(std::span<const cpu_adam::Buffer> grads) const {
  if (grads.size() != groups_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("step: {} gradients given for {} sub-groups",
                                                grads.size(), groups_.size()));
  }
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (grads[g].data == nullptr || grads[g].count != groups_[g].elements) {
      throw Error(ErrorKind::invalid,
                  fmt::format("step: the gradient of sub-group '{}' has {} elements, not {}",
                              groups_[g].name, grads[g].data ? grads[g].count : 0,
                              groups_[g].elements));
    }
  }
}

void OptimizerSwapper::check_step_inputs(std::span<const cpu_adam::Buffer> copies) const {
  if (!copies.empty() && copies.size() != groups_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("step: {} param copies given for {} sub-groups",
                                                copies.size(), groups_.size()));
  }
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (!copies.empty() && copies[g].data != nullptr && copies[g].count != groups_[g].elements) {
      throw Error(ErrorKind::invalid,
                  fmt::format("step: the param copy of sub-group '{}' has {} elements, not {}",
                              groups_[g].name, copies[g].count, groups_[g].elements));
    }
  }
  if (recovery_.interrupted) {
    std::string at;
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      at += fmt::format("{}{} at {}", g == 0 ? "" : ", ", groups_[g].name, recovery_.group_steps[g]);
    }
    throw Error(ErrorKind::invalid,
                fmt::format("step {} was interrupted (sub-groups: {}); restore every sub-group "
                            "from a checkpoint with initialize() before stepping again",
                            *recovery_.interrupted, at));
  }
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (recovery_.group_steps[g] == step_) continue;
    if (recovery_.group_steps[g] < 0) {
      throw Error(ErrorKind::invalid,
                  fmt::format("sub-group '{}' has no optimizer state: initialize() it first",
                              groups_[g].name));
    }
    throw Error(ErrorKind::invalid,
                fmt::format("step {} was interrupted: sub-group '{}' is at step {} while the "
                            "last finished step is {}; restore every sub-group from a "
                            "checkpoint with initialize() before stepping again",
                            recovery_.interrupted.value_or(step_ + 1), groups_[g].name,
                            recovery_.group_steps[g], step_));
  }
}

void OptimizerSwapper::step(std::span<const cpu_adam::Buffer> grads,
                            std::span<const cpu_adam::Buffer> param_copies,
                            const std::function<void(std::size_t group)>& copied) {
  check_grads(grads);
  check_step_inputs(param_copies);
  last_stats_ = {};
  Timed timed(last_stats_.total);
  const auto copy_for = [&](std::size_t g) {
    return param_copies.empty() ? cpu_adam::Buffer{} : param_copies[g];
  };
  const bool ranged = std::any_of(group_ranges_.begin(), group_ranges_.end(),
                                  [](const auto& ranges) { return !ranges.empty(); });
  if (store_ == nullptr && (options_.moment_format != cpu_adam::MomentFormat::fp32 || ranged || copied)) {
    // One kernel call per sub-group (each may have its own param groups).
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      auto& tensors = host_[g];
      // Adagrad keeps its one state in the exp_avg_sq slot, Lion in exp_avg.
      float* first = tensors.size() > 1 ? tensors[1].data() : nullptr;
      float* second = tensors.size() > 2 ? tensors[2].data() : nullptr;
      const auto kind = options_.optimizer.kind;
      compute(g, tensors[0].data(), kind == OptimizerKind::adagrad ? nullptr : first,
              kind == OptimizerKind::adagrad ? first : second, grads[g], copy_for(g));
      if (copied) copied(g);
    }
    ++step_;
    for (auto& s : recovery_.group_steps) s = step_;
    recovery_.finished_step = step_;
    return;
  }
  if (store_ == nullptr) {
    Timed compute_time(last_stats_.compute);
    std::vector<cpu_adam::TensorState> states(groups_.size());
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const std::size_t n = groups_[g].elements;
      auto& tensors = host_[g];
      states[g].param = {tensors[0].data(), n, cpu_adam::DType::f32};
      states[g].grad = grads[g];
      const cpu_adam::Buffer copy = copy_for(g);
      if (copy.dtype != cpu_adam::DType::f32) states[g].param_copy = copy;
      const auto& settings = options_.optimizer;  // the kind
      if (settings.kind != OptimizerKind::adagrad) {
        states[g].exp_avg = {tensors[1].data(), n, cpu_adam::DType::f32};
      }
      if (settings.kind == OptimizerKind::adam) {
        states[g].exp_avg_sq = {tensors[2].data(), n, cpu_adam::DType::f32};
      } else if (settings.kind == OptimizerKind::adagrad) {
        states[g].exp_avg_sq = {tensors[1].data(), n, cpu_adam::DType::f32};
      }
    }
    const OptimizerSettings settings = base_settings();
    switch (settings.kind) {
      case OptimizerKind::adam: optimizer_.adam_step(settings.adam, step_ + 1, states); break;
      case OptimizerKind::adagrad:
        optimizer_.adagrad_step(settings.adagrad, step_ + 1, states);
        break;
      case OptimizerKind::lion: optimizer_.lion_step(settings.lion, step_ + 1, states); break;
    }
    for (std::size_t g = 0; g < groups_.size(); ++g) {
      const cpu_adam::Buffer copy = copy_for(g);
      if (copy.data != nullptr && copy.dtype == cpu_adam::DType::f32) {
        std::memcpy(copy.data, host_[g][0].data(), groups_[g].elements * sizeof(float));
      }
    }
    ++step_;
    for (auto& s : recovery_.group_steps) s = step_;
    recovery_.finished_step = step_;
    return;
  }
  step_on_store(grads, nullptr, param_copies, copied);
}

void OptimizerSwapper::step(GradientSwapper& gradients, std::span<const cpu_adam::Buffer> param_copies,
                            const std::function<void(std::size_t group)>& copied) {
  ZINF_CHECK(store_ != nullptr, "gradients on NVMe need the optimizer states on NVMe");
  const auto theirs = gradients.groups();
  ZINF_CHECK(theirs.size() == groups_.size() &&
                 std::equal(theirs.begin(), theirs.end(), groups_.begin(),
                            [](const SubGroup& a, const SubGroup& b) { return a.elements == b.elements; }),
             "the gradient swapper's sub-groups are not the optimizer's");
  // The pipeline takes a resident sub-group's gradients in place, between
  // the prefetches of the swapped ones: both must agree on which are which.
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    ZINF_CHECK(gradients.resident(g) == resident_[g],
               fmt::format("sub-group '{}' is resident in one swapper and not the other: give both the same "
                           "resident_below_bytes", groups_[g].name));
  }
  check_step_inputs(param_copies);
  last_stats_ = {};
  Timed timed(last_stats_.total);
  const std::uint64_t read_before = gradients.bytes_read();
  try {
    step_on_store({}, &gradients, param_copies, copied);
  } catch (...) {
    gradients.drain();
    throw;
  }
  last_stats_.bytes_read += gradients.bytes_read() - read_before;
}

void OptimizerSwapper::step_on_store(std::span<const cpu_adam::Buffer> grads, GradientSwapper* gradients,
                                     std::span<const cpu_adam::Buffer> copies,
                                     const std::function<void(std::size_t group)>& copied) {
  const std::int64_t next = step_ + 1;
  std::vector<std::size_t> swapped;
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (!resident_[g]) swapped.push_back(g);
  }
  const std::size_t n = swapped.size();
  // The marker is durable before any sub-group changes, so a crash from
  // here on is seen as an interrupted step.
  store_->set_attribute(options_.name + ".step_in_progress", std::to_string(next));
  store_->commit();
  recovery_.interrupted = next;

  // Steps sub-group g's tensors, at `tensors` (param, then the states).
  const auto run_group = [&](std::size_t g, const std::function<float*(std::size_t)>& tensors) {
    // Adagrad keeps its one state in the exp_avg_sq slot, Lion in exp_avg.
    float* first_state = states_.empty() ? nullptr : tensors(1);
    float* second_state = states_.size() > 1 ? tensors(2) : nullptr;
    const auto kind = options_.optimizer.kind;
    cpu_adam::Buffer grad = gradients != nullptr ? cpu_adam::Buffer{} : grads[g];
    if (gradients != nullptr) {
      Timed timed(last_stats_.read_wait);
      grad = gradients->await(g);
    }
    compute(g, tensors(0), kind == OptimizerKind::adagrad ? nullptr : first_state,
            kind == OptimizerKind::adagrad ? first_state : second_state, grad,
            copies.empty() ? cpu_adam::Buffer{} : copies[g]);
    if (copied) copied(g);
  };
  const auto run_slot = [&](std::size_t g, Slot& slot) {
    run_group(g, [&slot](std::size_t t) { return slot.floats(t); });
  };
  // The resident sub-groups before `end`, in place, in sub-group order
  // between the swapped ones (copied() sees every sub-group in order).
  std::size_t resident_next = 0;
  const auto run_resident_before = [&](std::size_t end) {
    for (; resident_next < end; ++resident_next) {
      const std::size_t g = resident_next;
      if (!resident_[g]) continue;
      if (gradients != nullptr) gradients->prefetch(g);
      run_group(g, [&](std::size_t t) { return host_[g][t].data(); });
      recovery_.group_steps[g] = next;
    }
  };
  const auto finish_writes = [&](Slot& slot) {
    const std::size_t group = *slot.writing_group;
    wait_writes(slot);
    uncommitted_.push_back(group);
    Timed timed(last_stats_.write_wait);
    commit_groups(next, false);
  };
  uncommitted_.clear();

  try {
    if (n == 0) {
      // Every sub-group is resident.
    } else if (!options_.overlap) {
      Slot& slot = *slots_[0];
      for (const std::size_t g : swapped) {
        run_resident_before(g);
        submit_reads(g, slot, gradients);
        wait_reads(slot);
        run_slot(g, slot);
        submit_writes(g, slot, next);
        finish_writes(slot);
      }
    } else {
      // i indexes the swapped sub-groups: read(i+1) ‖ step(i) ‖ write(i-1).
      run_resident_before(swapped[0]);
      submit_reads(swapped[0], *slots_[0], gradients);
      for (std::size_t i = 0; i < n; ++i) {
        const std::size_t g = swapped[i];
        Slot& slot = *slots_[i % 3];
        wait_reads(slot);
        if (i + 1 < n) {
          Slot& following = *slots_[(i + 1) % 3];
          if (following.writing_group) finish_writes(following);  // the sub-group i-2
          submit_reads(swapped[i + 1], following, gradients);
        }
        run_slot(g, slot);
        submit_writes(g, slot, next);
        // The resident ones up to the next swapped sub-group run while its
        // reads and this one's writes are in flight.
        run_resident_before(i + 1 < n ? swapped[i + 1] : groups_.size());
      }
      // The last sub-groups are still being written: finish them in order.
      std::vector<Slot*> writing;
      for (auto& slot : slots_) {
        if (slot->writing_group) writing.push_back(slot.get());
      }
      std::sort(writing.begin(), writing.end(),
                [](const Slot* a, const Slot* b) { return *a->writing_group < *b->writing_group; });
      for (Slot* slot : writing) finish_writes(*slot);
    }
    run_resident_before(groups_.size());
  } catch (...) {
    // Nothing may still be reading or writing the slots when the error
    // leaves; the manifest keeps the step marked as interrupted.
    drain_slots();
    uncommitted_.clear();
    roll_back_uncommitted(next);
    throw;
  }
  step_ = next;
  store_->set_attribute(options_.name + ".step", std::to_string(next));
  store_->set_attribute(options_.name + ".step_in_progress", "");
  {
    // The sub-groups not yet committed, with the step's end, in one commit.
    Timed timed(last_stats_.write_wait);
    commit_groups(next, true);
  }
  recovery_.finished_step = next;
  recovery_.interrupted.reset();
}

void OptimizerSwapper::read_params(std::size_t group, std::span<float> out) {
  read_state(group, "param", out);
}

void OptimizerSwapper::read_state(std::size_t group, std::string_view state,
                                  std::span<float> out) {
  ZINF_CHECK(group < groups_.size(), "sub-group index out of range");
  std::size_t index = 0;
  if (state != "param") {
    const auto it = std::find(states_.begin(), states_.end(), state);
    ZINF_CHECK(it != states_.end(), fmt::format("this optimizer keeps no '{}' state", state));
    index = 1 + static_cast<std::size_t>(it - states_.begin());
  }
  if (out.size() != groups_[group].elements) {
    throw Error(ErrorKind::invalid, fmt::format("read '{}' of sub-group '{}': {} floats given "
                                                "for {} elements",
                                                state, groups_[group].name, out.size(),
                                                groups_[group].elements));
  }
  const auto format = index == 0 ? cpu_adam::MomentFormat::fp32 : options_.moment_format;
  if (resident_[group]) {
    ZINF_CHECK(!host_[group].empty(), "sub-group has no state: initialize() it first");
    cpu_adam::decode_moment(format, index == 2, host_[group][index].data(), out);
    return;
  }
  Slot& slot = *slots_[0];
  store_->read_sync(key(group, state), slot.tensor(index));
  cpu_adam::decode_moment(format, index == 2, slot.floats(index), out);
}

std::uint64_t OptimizerSwapper::pinned_bytes() const {
  std::uint64_t bytes = 0;
  for (const auto& slot : slots_) bytes += slot->buffer.size();
  return bytes;
}

}  // namespace zinf::swap

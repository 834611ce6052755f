#include "zero3/engine.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"
#include "swap/swap_config.hpp"

namespace zinf::zero3 {

using cpu_adam::DType;


namespace {

// The engine starts each run from the model it is given (finalize), or
// from a checkpoint (load): what an earlier run left in nvme_path, maybe
// for another model or sub_group_size, is no state of this one. Forgotten
// and committed, so its layout cannot fail this run, as DeepSpeed
// overwrites its own swap files.
void start_afresh(swap::SwapStore& store) {
  if (!store.keys().empty()) {
    log().info("zero3: the swap directory held an earlier run's tensors; this run starts afresh and reuses "
               "their space");
  }
  store.clear();
  store.commit();
}

using Clock = std::chrono::steady_clock;

std::uint64_t dtype_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

DType working_dtype_of(config::Precision precision) {
  switch (precision) {
    case config::Precision::fp32: return DType::f32;
    case config::Precision::bf16: return DType::bf16;
    case config::Precision::fp16: return DType::f16;
  }
  return DType::f32;
}

// Calls piece(param, from, to) for each part [from, to) of the partition
// range [begin, end) that a param of `order` (partition order) holds; `first`
// carries the search on from one sub-group to the next.
template <class Params, class Piece>
void for_each_piece(const Params& params, std::span<const ParamIndex> order, std::uint64_t begin,
                    std::uint64_t end, std::size_t& first, const Piece& piece) {
  while (first < order.size() &&
         params[order[first]]->partition_offset + params[order[first]]->d.shard_elements <= begin) {
    ++first;
  }
  for (std::size_t k = first; k < order.size(); ++k) {
    const auto& param = *params[order[k]];
    if (param.partition_offset >= end) break;
    piece(param, std::max(begin, param.partition_offset),
          std::min(end, param.partition_offset + param.d.shard_elements));
  }
}

template <class Duration>
void add_time(std::mutex& mutex, Duration& target, Clock::time_point since) {
  std::lock_guard lock(mutex);
  target += std::chrono::duration_cast<Duration>(Clock::now() - since);
}

}  // namespace

Engine::Engine(const config::Config& config, Communicator& comm, EngineOptions options)
    : config_(config), comm_(comm), options_(std::move(options)),
      working_(working_dtype_of(config.training.precision)) {
  if (config_.zero.stage < 3 && config_.zero.offload_param.device != config::OffloadDevice::none) {
    ErrorContext ctx;
    ctx.key_path = "zero_optimization.offload_param.device";
    throw Error(ErrorKind::config,
                fmt::format("offload_param needs ZeRO stage 3 (zero_optimization.stage is {})", config_.zero.stage),
                std::move(ctx));
  }
  if (working_ == DType::f16) {
    const auto& t = config_.training;
    loss_scale_ = t.loss_scale > 0 ? t.loss_scale : std::ldexp(1.0, static_cast<int>(t.initial_scale_power));
    hysteresis_left_ = t.hysteresis;
  }
  if (!options_.copier) options_.copier = swap::make_host_copier();
  buffers_.set_copier(options_.copier.get());
  // Idle buffers up to what stage3_max_live_parameters lets be gathered at
  // once (working precision), and as much again for gradient buffers.
  const std::uint64_t live = config_.zero.max_live_parameters;
  const std::uint64_t cap_elements = live > UINT64_MAX / 16 ? UINT64_MAX / 16 : live;
  buffers_.set_cap(cap_elements * (dtype_bytes(working_) + sizeof(float)));
  worker_ = std::thread([this] { worker_loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  queued_.notify_all();
  if (worker_.joinable()) worker_.join();
  for (auto& param : params_) {
    const std::uint64_t gathered = param->d.shard_elements * comm_.world_size();
    if (param->gathered) buffers_.release(param->gathered, gathered * element_bytes());
    if (param->device_shard && !param->d.persistent) {  // a persistent one's is inside `gathered`
      buffers_.release(param->device_shard, param->d.shard_elements * element_bytes());
    }
    if (param->grad) buffers_.release(param->grad, gathered * sizeof(float));
  }
  // The swappers hold pool leases: they go before the pool.
  param_swapper_.reset();
  optimizer_.reset();
  gradient_swapper_.reset();
  param_store_.reset();
  optimizer_store_.reset();
  gradient_store_.reset();
  pool_.reset();
}

std::uint64_t Engine::element_bytes() const { return dtype_bytes(working_); }

std::size_t Engine::add_param_group(const swap::ParamGroupSettings& settings) {
  if (finalized_) throw Error(ErrorKind::invalid, "add_param_group after finalize()");
  swap::check_param_group(param_groups_.size(), settings);  // a bad value fails here, not at finalize()
  param_groups_.push_back(settings);
  return param_groups_.size() - 1;
}

void Engine::set_param_group(ParamIndex p, std::size_t group) {
  if (finalized_) throw Error(ErrorKind::invalid, "set_param_group after finalize()");
  if (group >= param_groups_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("set_param_group('{}', {}): {} param groups were added",
                                                at(p).d.name, group, param_groups_.size()));
  }
  at(p).param_group = group;
}

void Engine::set_trainable(ParamIndex p, bool trainable) {
  if (finalized_) throw Error(ErrorKind::invalid, "set_trainable after finalize()");
  at(p).d.trainable = trainable;
}

void Engine::set_param_group_settings(std::size_t group, const swap::ParamGroupSettings& settings) {
  if (group >= param_groups_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("param group {} was never added ({} are)", group,
                                                param_groups_.size()));
  }
  swap::check_param_group(group, settings);
  if (optimizer_) optimizer_->set_param_group(group, settings);  // may refuse (8-bit moment blocks)
  param_groups_[group] = settings;
}

const swap::ParamGroupSettings& Engine::param_group_settings(std::size_t group) const {
  if (group >= param_groups_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("param group {} was never added", group));
  }
  return param_groups_[group];
}

void Engine::set_param_group_ranges() {
  if (!optimizer_) return;  // every param frozen
  for (std::size_t k = 0; k < param_groups_.size(); ++k) optimizer_->set_param_group(k, param_groups_[k]);
  if (std::all_of(params_.begin(), params_.end(), [](const auto& param) { return param->param_group == 0; })) {
    return;  // the optimizer's settings for every element
  }
  // Each sub-group cut at the params' shard boundaries (params in
  // partition order; a sub-group's tail past the last shard is padding,
  // which steps in group 0).
  std::uint64_t group_begin = 0;
  std::size_t first = 0;  // in trainable_order_
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    const std::uint64_t group_end = group_begin + sub_groups_[g].elements;
    std::vector<swap::ParamGroupRange> ranges;
    const auto add = [&](std::uint64_t from, std::uint64_t to, std::size_t param_group) {
      if (from >= to) return;
      if (!ranges.empty() && ranges.back().param_group == param_group) {
        ranges.back().end = to - group_begin;
      } else {
        ranges.push_back({from - group_begin, to - group_begin, param_group});
      }
    };
    std::uint64_t at_element = group_begin;
    for_each_piece(params_, trainable_order_, group_begin, group_end, first,
                   [&](const Param& param, std::uint64_t from, std::uint64_t to) {
                     add(at_element, from, 0);
                     add(from, to, param.param_group);
                     at_element = std::max(at_element, to);
                   });
    add(at_element, group_end, 0);
    optimizer_->set_param_group_ranges(g, std::move(ranges));
    group_begin = group_end;
  }
}

void Engine::set_working(std::uint64_t offset, std::span<const float> master) {
  // The working copy is the master rounded to nearest even, as the fused
  // optimizer copy writes it after a step.
  std::vector<std::byte> staged;
  std::byte* out = nullptr;
  if (!working_in_host()) {
    staged.resize(master.size() * element_bytes());
    out = staged.data();
  } else {
    out = working_partition_.data() + offset * element_bytes();
  }
  switch (working_) {
    case DType::f32: std::memcpy(out, master.data(), master.size_bytes()); break;
    case DType::bf16: {
      auto* half = reinterpret_cast<std::uint16_t*>(out);
      for (std::size_t i = 0; i < master.size(); ++i) half[i] = cpu_adam::float_to_bf16(master[i]);
      break;
    }
    case DType::f16: {
      auto* half = reinterpret_cast<std::uint16_t*>(out);
      for (std::size_t i = 0; i < master.size(); ++i) half[i] = cpu_adam::float_to_f16(master[i]);
      break;
    }
  }
  if (!working_in_host()) store_working(offset, staged);
}

void Engine::store_working(std::uint64_t offset, std::span<const std::byte> bytes) {
  const std::uint64_t esize = element_bytes();
  if (working_in_host()) {
    std::memcpy(working_partition_.data() + offset * esize, bytes.data(), bytes.size());
    return;
  }
  const std::uint64_t end = offset + bytes.size() / esize;
  for (const auto& param : params_) {
    const std::uint64_t from = std::max(offset, param->partition_offset);
    const std::uint64_t to = std::min(end, param->partition_offset + param->d.shard_elements);
    if (from >= to) continue;
    const std::span<const std::byte> piece = bytes.subspan((from - offset) * esize, (to - from) * esize);
    if (working_on_device_) {
      copy_to_device(static_cast<std::byte*>(param->device_shard) + (from - param->partition_offset) * esize,
                     piece.data(), piece.size());
      continue;
    }
    const std::uint64_t shard_bytes = param->d.shard_elements * esize;
    if (piece.size() == shard_bytes) {
      param_swapper_->swap_out(param->key, piece);
      continue;
    }
    Assembly& assembly = assembling_[param.get()];
    if (assembly.bytes.empty()) assembly.bytes.resize(shard_bytes);
    const std::uint64_t at = (from - param->partition_offset) * esize;
    std::memcpy(assembly.bytes.data() + at, piece.data(), piece.size());
    assembly.pieces.emplace_back(at, at + piece.size());
    assembly.filled += piece.size();
    if (assembly.filled == shard_bytes) {  // the pieces of one batch never overlap
      param_swapper_->swap_out(param->key, assembly.bytes);
      assembling_.erase(param.get());
    }
  }
}

void Engine::flush_working() {
  // Shards only partly rewritten (set_master's sub-groups end inside a
  // neighbour's shard): the rest comes from the stored shard.
  for (auto& [param, assembly] : assembling_) {
    std::vector<std::byte> shard = working_shard(*param);
    for (const auto& [from, to] : assembly.pieces) {
      std::memcpy(shard.data() + from, assembly.bytes.data() + from, to - from);
    }
    param_swapper_->swap_out(param->key, shard);
  }
  assembling_.clear();
}

std::vector<std::byte> Engine::working_shard(const Param& param) {
  const std::uint64_t bytes = param.d.shard_elements * element_bytes();
  if (working_in_host()) {
    const std::byte* shard = working_partition_.data() + param.partition_offset * element_bytes();
    return {shard, shard + bytes};
  }
  if (working_on_device_) {
    std::vector<std::byte> out(bytes);
    copy_to_host(out.data(), param.device_shard, bytes);
    return out;
  }
  const auto stored = param_swapper_->fetch(param.key);
  std::vector<std::byte> out(stored.begin(), stored.end());
  param_swapper_->release(param.key);
  return out;
}

void Engine::read_working(const Param& param, std::span<float> out) {
  const std::vector<std::byte> shard = working_shard(param);
  const std::byte* in = shard.data();
  switch (working_) {
    case DType::f32: std::memcpy(out.data(), in, out.size_bytes()); return;
    case DType::bf16:
    case DType::f16: {
      const auto* half = reinterpret_cast<const std::uint16_t*>(in);
      for (std::size_t i = 0; i < out.size(); ++i) {
        out[i] = working_ == DType::bf16 ? cpu_adam::bf16_to_float(half[i]) : cpu_adam::f16_to_float(half[i]);
      }
      return;
    }
  }
}

Engine::Param& Engine::at(ParamIndex p) {
  if (p >= params_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("parameter index {} was never registered ({} are)", p,
                                                params_.size()));
  }
  return *params_[p];
}

const ParamDescription& Engine::describe(ParamIndex p) const {
  if (p >= params_.size()) throw Error(ErrorKind::invalid, fmt::format("parameter index {} was never registered", p));
  return params_[p]->d;
}

void Engine::require_finalized(const char* what) const {
  if (!finalized_) throw Error(ErrorKind::invalid, fmt::format("{} before finalize()", what));
}

ModuleIndex Engine::add_module(std::string name) {
  if (finalized_) throw Error(ErrorKind::invalid, fmt::format("add_module('{}') after finalize()", name));
  modules_.push_back(std::move(name));
  params_of_module_.emplace_back();
  return static_cast<ModuleIndex>(modules_.size() - 1);
}

ParamIndex Engine::add_param(ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
                             Initializer init) {
  if (finalized_) throw Error(ErrorKind::invalid, fmt::format("add_param('{}') after finalize()", name));
  if (module >= modules_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("add_param('{}'): module {} was never added", name, module));
  }
  std::uint64_t elements = 1;
  for (std::int64_t extent : shape) {
    if (extent <= 0) {
      throw Error(ErrorKind::invalid, fmt::format("add_param('{}'): shape extents must be positive", name));
    }
    elements *= static_cast<std::uint64_t>(extent);
  }
  auto param = std::make_unique<Param>();
  param->d.name = std::move(name);
  param->d.shape = std::move(shape);
  param->d.module = module;
  param->d.elements = elements;
  param->init = std::move(init);
  params_.push_back(std::move(param));
  const auto index = static_cast<ParamIndex>(params_.size() - 1);
  params_of_module_[module].push_back(index);
  return index;
}

ParamIndex Engine::add_param(ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
                             std::span<const float> initial) {
  std::uint64_t elements = 1;
  for (std::int64_t extent : shape) elements *= static_cast<std::uint64_t>(std::max<std::int64_t>(extent, 0));
  if (initial.size() != elements) {
    throw Error(ErrorKind::invalid, fmt::format("add_param('{}'): {} initial values for {} elements", name,
                                                initial.size(), elements));
  }
  std::vector<float> copy(initial.begin(), initial.end());
  return add_param(module, std::move(name), std::move(shape),
                   [values = std::move(copy)](std::uint64_t offset, std::span<float> out) {
                     std::copy_n(values.begin() + static_cast<std::ptrdiff_t>(offset), out.size(), out.begin());
                   });
}

void Engine::finalize() {
  if (finalized_) throw Error(ErrorKind::invalid, "finalize() called twice");
  if (params_.empty()) throw Error(ErrorKind::invalid, "finalize() with no parameters registered");
  const int world = comm_.world_size();
  const int rank = comm_.rank();

  // Shards: every param cut into `world` equal shards (the last padded).
  std::vector<std::uint64_t> gathered_elements;
  std::vector<bool> persistent;
  std::uint64_t persistent_elements = 0;
  for (auto& param : params_) {
    param->d.shard_elements = (param->d.elements + world - 1) / world;
    // Below stage 3 nothing is partitioned but the optimizer states and
    // gradients: every param stays whole on every rank. At stage 3 the
    // small params do, in registration order, until the model's
    // persistence budget is spent (a param past it stays partitioned; a
    // later smaller one may still fit: DeepSpeed's rule, though it walks
    // the params in named_parameters() order).
    const bool small = param->d.elements <= config_.zero.param_persistence_threshold &&
                       param->d.elements <= config_.zero.model_persistence_threshold - persistent_elements;
    param->d.persistent = config_.zero.stage < 3 || small;
    if (config_.zero.stage == 3 && small) persistent_elements += param->d.elements;
    gathered_elements.push_back(param->d.shard_elements * world);
    persistent.push_back(param->d.persistent);
  }
  // The partition: the trainable params' shards first, so the optimizer's
  // part of it (masters, gradients, the fused copy-out) is one range; the
  // frozen ones' after it.
  for (const bool trainable : {true, false}) {
    for (std::size_t p = 0; p < params_.size(); ++p) {
      Param& param = *params_[p];
      if (param.d.trainable != trainable) continue;
      param.partition_offset = partition_elements_;
      partition_elements_ += param.d.shard_elements;
      if (trainable) trainable_order_.push_back(static_cast<ParamIndex>(p));
    }
    if (trainable) optimizer_elements_ = partition_elements_;
  }
  CoordinatorOptions coordination;
  coordination.prefetch_bucket_elements = config_.zero.prefetch_bucket_size;
  coordination.max_live_elements = config_.zero.max_live_parameters;
  coordination.max_reuse_distance = config_.zero.max_reuse_distance;
  coordinator_ = std::make_unique<Coordinator>(params_of_module_, gathered_elements, persistent, coordination);

  // The optimizer over this rank's trainable partition, cut into sub-groups
  // (none when every param is frozen).
  if (config_.zero.sub_group_size == 0 && optimizer_elements_ > 0) {
    // DeepSpeed reads 0 as one param per sub-group (axolotl's stage-3
    // configs set it): sub-groups as large as the largest trainable
    // param's shard buffer the same. Resolved here, so the swappers and
    // the checkpoint's description see the size that ran.
    std::uint64_t largest = 1;
    for (const auto& param : params_) {
      if (param->d.trainable) largest = std::max(largest, param->d.shard_elements);
    }
    config_.zero.sub_group_size = largest;
    log().info("zero3: zero_optimization.sub_group_size 0: sub-groups of {} elements (the largest trainable "
               "param's shard)", largest);
  }
  if (optimizer_elements_ > 0) sub_groups_ = swap::sub_groups(config_, optimizer_elements_, "zero3.sub_group.");
  for (std::uint64_t begin = 0; const auto& group : sub_groups_) {
    sub_group_begin_.push_back(begin);
    begin += group.elements;
  }
  // With params on NVMe the param store holds the working copy, with
  // offload_param none on a device the CPU cannot read the device shards
  // do: no image of it in host memory (store_working).
  working_on_device_ = config_.zero.offload_param.device == config::OffloadDevice::none &&
                       !options_.copier->host_accessible();
  if (config_.zero.offload_param.device != config::OffloadDevice::nvme && !working_on_device_) {
    working_partition_.assign(partition_elements_ * element_bytes(), std::byte{0});
  }
  if (working_on_device_) {
    // Each shard's home, before the initial values are written into it
    // below: a buffer of its own, or for a persistent param (whole on every
    // rank for good) its place in the gathered buffer, which the all-gather
    // then fills around it in place: no second copy of its bytes.
    for (auto& param : params_) {
      const std::uint64_t bytes = param->d.shard_elements * element_bytes();
      if (bytes == 0) continue;
      if (param->d.persistent) {
        param->gathered = buffers_.acquire(bytes * comm_.world_size());
        param->device_shard = static_cast<std::byte*>(param->gathered) + static_cast<std::uint64_t>(comm_.rank()) * bytes;
      } else {
        param->device_shard = buffers_.acquire(bytes);
      }
    }
  }
  const std::size_t threads = options_.optimizer_threads != 0
                                  ? options_.optimizer_threads
                                  : std::max(1u, std::thread::hardware_concurrency());
  cpu_optimizer_ = std::make_unique<cpu_adam::CpuOptimizer>(threads);
  swap::OptimizerSwapperOptions optimizer_options = swap::optimizer_swapper_options(config_);
  optimizer_options.name = "zero3.optimizer";

  const bool optimizer_on_nvme =
      config_.zero.offload_optimizer.device == config::OffloadDevice::nvme && !sub_groups_.empty();
  const bool params_on_nvme = config_.zero.offload_param.device == config::OffloadDevice::nvme;
  std::uint64_t pool_bytes = 0;
  std::vector<swap::ParamSpec> specs;
  swap::ParamSwapperOptions param_options;
  if (optimizer_on_nvme) {
    optimizer_store_ = std::make_unique<swap::SwapStore>(
        swap::store_options(config_, swap::SwapRole::optimizer, rank));
    start_afresh(*optimizer_store_);
    pool_bytes += swap::OptimizerSwapper::pinned_bytes_needed(
        sub_groups_, optimizer_options.optimizer.kind, optimizer_options.overlap,
        optimizer_store_->alignment(), optimizer_options.moment_format, optimizer_options.resident_below_bytes);
  }
  // The gradient partition on NVMe too (offload_optimizer.gradients), or
  // in host memory.
  const bool gradients_on_nvme = optimizer_on_nvme && config_.zero.offload_optimizer.keeps_gradients_on_nvme();
  if (gradients_on_nvme) {
    gradient_store_ = std::make_unique<swap::SwapStore>(
        swap::store_options(config_, swap::SwapRole::gradients, rank));
    pool_bytes += swap::GradientSwapper::pinned_bytes_needed(sub_groups_, gradient_store_->alignment(),
                                                             optimizer_options.resident_below_bytes);
  } else {
    grad_partition_.assign(optimizer_elements_, 0.0f);
  }
  if (params_on_nvme) {
    param_store_ = std::make_unique<swap::SwapStore>(swap::store_options(config_, swap::SwapRole::param, rank));
    start_afresh(*param_store_);
    param_options = swap::param_swapper_options(config_, element_bytes());
    for (std::size_t p = 0; p < params_.size(); ++p) {
      params_[p]->key = fmt::format("p{}:{}", p, params_[p]->d.name);
      specs.push_back({params_[p]->key, params_[p]->d.shard_elements * element_bytes()});
    }
    pool_bytes += swap::ParamSwapper::plan(specs, param_options, param_store_->alignment()).pinned_bytes;
  }
  if (optimizer_on_nvme || params_on_nvme) {
    PinnedPoolOptions pool_options;
    // (Sub-groups that all stay resident need no buffer: a page, unused.)
    pool_options.budget_bytes = std::max<std::uint64_t>(pool_bytes, 4096);
    // pin_memory: false, or a memlock limit too low, leaves pageable memory
    // (logged by the pool); correctness does not depend on pinning.
    pool_options.allow_unpinned = true;
    // pin_memory: false (on every block that swaps) asks for no locking.
    pool_options.lock = (optimizer_on_nvme && config_.zero.offload_optimizer.pin_memory) ||
                        (params_on_nvme && config_.zero.offload_param.pin_memory);
    pool_ = std::make_unique<PinnedPool>(pool_options);
  }
  if (optimizer_on_nvme) {
    optimizer_ = std::make_unique<swap::OptimizerSwapper>(*optimizer_store_, *pool_, *cpu_optimizer_,
                                                          sub_groups_, optimizer_options);
  } else if (!sub_groups_.empty()) {
    optimizer_ = std::make_unique<swap::OptimizerSwapper>(*cpu_optimizer_, sub_groups_, optimizer_options);
  }
  if (gradients_on_nvme) {
    gradient_swapper_ = std::make_unique<swap::GradientSwapper>(*gradient_store_, *pool_, sub_groups_,
                                                                optimizer_options.resident_below_bytes);
    const auto accumulation = config_.training.gradient_accumulation_steps;
    if (accumulation > 1 && sub_groups_.size() > 2) {
      // Each extra micro-step reads back and rewrites the gradients: say
      // what keeping them in host memory would cost instead.
      log().info("zero3: the gradients accumulate on NVMe over {} micro-steps: {} read and written per extra "
                 "micro-step; zero_optimization.offload_optimizer.gradients \"cpu\" keeps them in {} of host "
                 "memory instead",
                 accumulation, format_bytes(optimizer_elements_ * sizeof(float)),
                 format_bytes(optimizer_elements_ * sizeof(float)));
    }
  }
  if (optimizer_on_nvme) {
    const std::size_t tensors = 1 + swap::OptimizerSwapper::state_names(optimizer_options.optimizer.kind).size();
    std::size_t resident = 0;
    std::uint64_t resident_bytes = 0;
    for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
      if (!optimizer_->resident(g)) continue;
      ++resident;
      for (std::size_t t = 0; t < tensors; ++t) {
        resident_bytes += swap::OptimizerSwapper::tensor_bytes(t, sub_groups_[g].elements, optimizer_options.moment_format);
      }
      if (gradients_on_nvme) resident_bytes += sub_groups_[g].elements * sizeof(float);
    }
    if (resident > 0) {
      // Each swapped tensor is an NVMe request of its own: thousands under
      // one aio block make a step bound on requests, not bytes (8.4 M
      // params in 83928 sub-groups of 100 took 28 s a step swapped). Worth
      // a warning when it holds much more host memory than the user planned.
      log().log(resident_bytes >= (1ull << 30) ? spdlog::level::warn : spdlog::level::info,
                "zero3: {} of {} sub-groups are under {} of fp32 each (max(1 MiB, aio.block_size)): their optimizer "
                "states{} stay in host memory ({} in all), as DeepSpeed keeps tensors too small to swap; "
                "zero_optimization.sub_group_size {} or more swaps them",
                resident, sub_groups_.size(), format_bytes(optimizer_options.resident_below_bytes),
                gradients_on_nvme ? " and gradients" : "", format_bytes(resident_bytes),
                optimizer_options.resident_below_bytes / sizeof(float));
    }
  }
  learning_rate_ = swap::learning_rate_of(optimizer_options.optimizer);
  if (params_on_nvme) {
    param_swapper_ = std::make_unique<swap::ParamSwapper>(*param_store_, *pool_, specs, param_options);
  }
  set_param_group_ranges();

  // Initial values: each rank builds only its own shards, sub-group by
  // sub-group, from the initializers.
  std::uint64_t group_begin = 0;
  std::size_t first_param = 0;  // in trainable_order_
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    const std::uint64_t group_end = group_begin + sub_groups_[g].elements;
    std::vector<float> master(sub_groups_[g].elements, 0.0f);
    // The part [from, to) of a param's shard inside this sub-group, and the
    // elements of the param it holds (the shard's tail past the end is padding).
    for_each_piece(params_, trainable_order_, group_begin, group_end, first_param,
                   [&](const Param& param, std::uint64_t from, std::uint64_t to) {
                     const std::uint64_t shard_start = static_cast<std::uint64_t>(rank) * param.d.shard_elements;
                     const std::uint64_t element_from = shard_start + (from - param.partition_offset);
                     const std::uint64_t element_to =
                         std::min(shard_start + (to - param.partition_offset), param.d.elements);
                     if (element_from < element_to) {
                       param.init(element_from,
                                  std::span(master.data() + (from - group_begin), element_to - element_from));
                     }
                   });
    optimizer_->initialize(g, master, 0);
    set_working(group_begin, master);
    group_begin = group_end;
  }
  // Frozen params: their working copy is all there is.
  for (auto& param : params_) {
    if (param->d.trainable) continue;
    std::vector<float> shard(param->d.shard_elements, 0.0f);
    const std::uint64_t shard_start = static_cast<std::uint64_t>(rank) * param->d.shard_elements;
    const std::uint64_t shard_end = std::min(shard_start + param->d.shard_elements, param->d.elements);
    if (shard_start < shard_end) param->init(shard_start, std::span(shard.data(), shard_end - shard_start));
    set_working(param->partition_offset, shard);
  }

  finalized_ = true;
  place_shards();
  log().info("zero3: stage {}, rank {} of {}: {} params in {} modules, {} elements in this rank's partition "
             "({} trainable), {} sub-groups; params {} ({}), optimizer states {}, gradients {}", config_.zero.stage,
             rank, world, params_.size(), modules_.size(), partition_elements_, optimizer_elements_,
             sub_groups_.size(), config::to_string(config_.zero.offload_param.device), cpu_adam::to_string(working_),
             optimizer_on_nvme ? "nvme" : "host memory", gradients_on_nvme ? "nvme" : "host memory");
}

void Engine::place_shards(bool frozen_too) {
  // The shards are where offload_param says: store_working wrote them
  // ("cpu", and "none" where device memory is host memory (the host
  // stand-in the CPU trainers use): the host partition; nvme: the param
  // store; "none" on a separate device: the device shards). Then the
  // persistent params are gathered for good. Runs with the worker idle, so
  // the collectives here are in the same order on every rank.
  const std::uint64_t esize = element_bytes();
  if (param_swapper_) {
    flush_working();
    param_swapper_->commit();
  }
  for (auto& param : params_) {
    if (!param->d.persistent || (!frozen_too && !param->d.trainable)) continue;
    if (param->gathered == nullptr) {
      param->gathered = buffers_.acquire(param->d.shard_elements * comm_.world_size() * esize);
    }
    gather_into(*param, param->gathered);
    param->state = State::available;
  }
}

void Engine::gather_into(Param& param, void* gathered) {
  // This rank's shard goes to its place in the gathered buffer, then the
  // all-gather fills the rest.
  const std::uint64_t esize = element_bytes();
  const std::uint64_t bytes = param.d.shard_elements * esize;
  auto* mine = static_cast<std::byte*>(gathered) + static_cast<std::uint64_t>(comm_.rank()) * bytes;
  const auto device = param.device_shard == nullptr && config_.zero.offload_param.device == config::OffloadDevice::none
                          ? config::OffloadDevice::cpu  // device memory is host memory: from the host partition
                          : config_.zero.offload_param.device;
  switch (device) {
    case config::OffloadDevice::none:
      device_all_gather(param.device_shard, gathered, bytes);
      return;
    case config::OffloadDevice::cpu:
      copy_to_device(mine, working_partition_.data() + param.partition_offset * esize, bytes);
      break;
    case config::OffloadDevice::nvme: {
      const auto shard = param_swapper_->fetch(param.key);
      try {
        copy_to_device(mine, shard.data(), bytes);
      } catch (...) {
        param_swapper_->release(param.key);
        throw;
      }
      param_swapper_->release(param.key);
      break;
    }
  }
  device_all_gather(mine, gathered, bytes);
}

// ---- collectives and copies ------------------------------------------------

void Engine::copy_to_device(void* device, const void* host, std::uint64_t bytes) {
  if (bytes == 0) return;
  options_.copier->wait(options_.copier->to_device(device, static_cast<const std::byte*>(host), bytes));
}

void Engine::copy_to_host(void* host, const void* device, std::uint64_t bytes) {
  if (bytes == 0) return;
  options_.copier->wait(options_.copier->to_host(static_cast<std::byte*>(host), device, bytes));
}

void Engine::device_all_gather(const void* send, void* recv, std::uint64_t bytes) {
  if (comm_.device_memory() || options_.copier->host_accessible()) {
    comm_.all_gather(send, recv, bytes);
    return;
  }
  std::vector<std::byte> mine(bytes), all(bytes * comm_.world_size());
  copy_to_host(mine.data(), send, bytes);
  comm_.all_gather(mine.data(), all.data(), bytes);
  copy_to_device(recv, all.data(), all.size());
}

void Engine::device_reduce_scatter(const float* send, float* recv, std::uint64_t count) {
  if (comm_.device_memory() || options_.copier->host_accessible()) {
    comm_.reduce_scatter(send, recv, count);
    return;
  }
  std::vector<float> all(count * comm_.world_size()), mine(count);
  copy_to_host(all.data(), send, all.size() * sizeof(float));
  comm_.reduce_scatter(all.data(), mine.data(), count);
  copy_to_device(recv, mine.data(), count * sizeof(float));
}

void Engine::host_all_gather(const void* send, void* recv, std::uint64_t bytes) {
  if (!comm_.device_memory()) {
    comm_.all_gather(send, recv, bytes);
    return;
  }
  const std::uint64_t total = bytes * comm_.world_size();
  const BufferCache::Scoped device(buffers_, total);
  auto* mine = device.get<std::byte>() + static_cast<std::uint64_t>(comm_.rank()) * bytes;
  copy_to_device(mine, send, bytes);
  comm_.all_gather(mine, device.get(), bytes);
  copy_to_host(recv, device.get(), total);
}

void Engine::host_all_reduce(float* data, std::uint64_t count, ReduceOp op) {
  if (!comm_.device_memory()) {
    comm_.all_reduce(data, count, op);
    return;
  }
  const std::uint64_t bytes = count * sizeof(float);
  const BufferCache::Scoped device(buffers_, bytes);
  copy_to_device(device.get(), data, bytes);
  comm_.all_reduce(device.get<float>(), count, op);
  copy_to_host(data, device.get(), bytes);
}

// ---- device buffers ----------------------------------------------------------

void* Engine::BufferCache::acquire(std::uint64_t bytes) {
  std::optional<Idle> reused;
  {
    std::lock_guard lock(mutex_);
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      reused = it->second.back();
      it->second.pop_back();
      idle_ -= bytes;
    }
  }
  if (reused) {
    // The trainer's kernels that used it last are done before it is reused.
    if (reused->in_use_until.valid()) {
      try {
        copier_->wait(reused->in_use_until);
      } catch (...) {
        copier_->free_device(reused->buffer);
        throw;
      }
    }
    return reused->buffer;
  }
  try {
    return copier_->allocate_device(bytes);
  } catch (const Error& error) {
    if (error.kind() != ErrorKind::resource) throw;
    // Out of device memory: idle buffers of other sizes go, then one retry.
    {
      std::lock_guard lock(mutex_);
      if (idle_ == 0) throw;
      free_idle();
    }
    return copier_->allocate_device(bytes);
  }
}

void Engine::BufferCache::release(void* buffer, std::uint64_t bytes, swap::CopyTicket in_use_until) noexcept {
  if (buffer == nullptr) return;
  try {
    std::lock_guard lock(mutex_);
    if (idle_ + bytes > cap_) {
      free_now(buffer, in_use_until);
      return;
    }
    free_[bytes].push_back(Idle{buffer, in_use_until});
    idle_ += bytes;
  } catch (...) {
    free_now(buffer, in_use_until);
  }
}

void Engine::BufferCache::free_now(void* buffer, swap::CopyTicket in_use_until) noexcept {
  try {
    if (in_use_until.valid()) copier_->wait(in_use_until);
  } catch (...) {
    // A failed stream: the buffer is freed anyway, as the device is lost.
  }
  copier_->free_device(buffer);
}

std::uint64_t Engine::BufferCache::idle_bytes() const {
  std::lock_guard lock(mutex_);
  return idle_;
}

void Engine::BufferCache::free_idle() {
  for (auto& [bytes, buffers] : free_) {
    for (const Idle& idle : buffers) free_now(idle.buffer, idle.in_use_until);
  }
  free_.clear();
  idle_ = 0;
}

void Engine::BufferCache::free_all_idle() {
  std::lock_guard lock(mutex_);
  free_idle();
}

Engine::BufferCache::~BufferCache() { free_idle(); }

// ---- the worker ----------------------------------------------------------

std::uint64_t Engine::submit(std::function<void()> body) {
  std::lock_guard lock(mutex_);
  queue_.push_back(std::move(body));
  const std::uint64_t ticket = ++submitted_;
  queued_.notify_one();
  return ticket;
}

void Engine::worker_loop() {
  std::unique_lock lock(mutex_);
  for (;;) {
    queued_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, nothing left
    std::function<void()> op = std::move(queue_.front());
    queue_.pop_front();
    // After a failure, or once the engine is being destroyed (a trainer
    // unwinding from its own error), queued collectives are dropped: the
    // other ranks may never issue their side of them.
    const bool skip = failure_ != nullptr || stopping_;
    lock.unlock();
    std::exception_ptr error;
    if (!skip) {
      try {
        op();
      } catch (...) {
        error = std::current_exception();
      }
    }
    lock.lock();
    if (error && !failure_) failure_ = error;
    ++completed_;
    finished_.notify_all();
  }
}

void Engine::throw_if_failed() {
  std::lock_guard lock(mutex_);
  if (failure_) std::rethrow_exception(failure_);
}

void Engine::wait_op(std::uint64_t ticket) {
  std::unique_lock lock(mutex_);
  finished_.wait(lock, [&] { return completed_ >= ticket || failure_ != nullptr; });
  if (failure_) std::rethrow_exception(failure_);
}

void Engine::drain() {
  std::uint64_t last = 0;
  {
    std::lock_guard lock(mutex_);
    last = submitted_;
  }
  wait_op(last);
}

// ---- fetch and release -----------------------------------------------------

std::uint64_t Engine::live_elements() const {
  std::uint64_t total = 0;
  for (const auto& param : params_) {
    if (!param->d.persistent && param->state != State::not_available) {
      total += param->d.shard_elements * comm_.world_size();
    }
  }
  return total;
}

void Engine::start_fetch(ParamIndex p, bool prefetch) {
  Param& param = *params_[p];
  if (param.d.persistent || param.state != State::not_available) return;
  param.gathered = buffers_.acquire(param.d.shard_elements * comm_.world_size() * element_bytes());
  param.state = State::in_flight;
  if (param_swapper_) {
    // The NVMe read starts now; the gather waits for it on the worker.
    const std::string key = param.key;
    param_swapper_->prefetch(std::span(&key, 1));
  }
  Param* target = &param;
  param.ready_ticket = submit(
      [this, target] {
        const auto since = Clock::now();
        gather_into(*target, target->gathered);
        add_time(stats_mutex_, stats_.fetch_busy, since);
      });
  std::lock_guard lock(stats_mutex_);
  ++stats_.gathers;
  if (prefetch) ++stats_.prefetched;
}

void Engine::wait_available(ParamIndex p) {
  Param& param = *params_[p];
  if (param.state == State::available) return;
  const auto since = Clock::now();
  wait_op(param.ready_ticket);
  add_time(stats_mutex_, stats_.fetch_wait, since);
  param.state = State::available;
}

void Engine::fetch_module(ModuleIndex module, Phase phase) {
  require_finalized(phase == Phase::forward ? "pre_forward" : "pre_backward");
  throw_if_failed();
  if (module >= modules_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("module index {} was never added", module));
  }
  const auto& own = params_of_module_[module];
  for (ParamIndex p : own) start_fetch(p, false);
  const auto ahead = coordinator_->on_pre_hook(
      ModuleEvent{module, phase}, [this](ParamIndex p) { return params_[p]->state != State::not_available; },
      live_elements());
  for (ParamIndex p : ahead) start_fetch(p, true);
  for (ParamIndex p : own) wait_available(p);
}

swap::CopyTicket Engine::trainer_work() { return options_.copier->record_stream(options_.compute_stream); }

void Engine::release(ParamIndex p) {
  Param& param = *params_[p];
  if (param.d.persistent || param.state == State::not_available) return;
  if (param.state == State::in_flight) wait_available(p);
  // The trainer's kernels queued before this hook may still read it.
  buffers_.release(param.gathered, param.d.shard_elements * comm_.world_size() * element_bytes(), trainer_work());
  param.gathered = nullptr;
  param.state = State::not_available;
}

void Engine::release_after_use(ModuleIndex module) {
  for (ParamIndex p : params_of_module_[module]) {
    if (!coordinator_->keep_after_use(p)) release(p);
  }
}

void Engine::release_all_unpersisted() {
  for (std::size_t p = 0; p < params_.size(); ++p) release(static_cast<ParamIndex>(p));
}

// ---- hooks -----------------------------------------------------------------

void Engine::pre_forward(ModuleIndex module) { fetch_module(module, Phase::forward); }

void Engine::post_forward(ModuleIndex module) {
  require_finalized("post_forward");
  release_after_use(module);
}

void Engine::pre_backward(ModuleIndex module) {
  fetch_module(module, Phase::backward);
  // A zeroed gradient buffer per param, padded to the gathered size so the
  // reduce-scatter cuts it into equal blocks.
  for (ParamIndex p : params_of_module_[module]) {
    Param& param = *params_[p];
    if (param.grad != nullptr || !param.d.trainable) continue;
    const std::uint64_t bytes = param.d.shard_elements * comm_.world_size() * sizeof(float);
    param.grad = static_cast<float*>(buffers_.acquire(bytes));
    options_.copier->wait(options_.copier->fill_zero(param.grad, bytes));
  }
}

void Engine::post_backward(ModuleIndex module) {
  require_finalized("post_backward");
  throw_if_failed();
  // The mean over ranks and micro-steps, with the loss scale taken out
  // (the micro-steps' share already, where the trainer divided the loss).
  const std::uint64_t micro_steps =
      options_.loss_divided_by_accumulation ? 1 : config_.training.gradient_accumulation_steps;
  const float scale =
      static_cast<float>(1.0 / (static_cast<double>(comm_.world_size() * micro_steps) * loss_scale_));
  // The module's params from the last registered to the first, as backward
  // goes over the modules: the reductions then walk the partition down, and
  // with the gradients on NVMe each sub-group opens about once (a bias
  // reduced after its weight would reopen the weight's last sub-group).
  const auto& module_params = params_of_module_[module];
  for (auto it = module_params.rbegin(); it != module_params.rend(); ++it) {
    Param& param = *params_[*it];
    if (!param.d.trainable) continue;  // no gradient to reduce
    if (param.grad == nullptr) {
      throw Error(ErrorKind::invalid,
                  fmt::format("post_backward: '{}' has no gradient buffer (no pre_backward for module {})",
                              param.d.name, module));
    }
    float* grad = param.grad;
    param.grad = nullptr;
    Param* target = &param;
    // The kernels writing this gradient may still be queued on the
    // trainer's stream: the reduction waits for them.
    const swap::CopyTicket written = trainer_work();
    const std::uint64_t ticket = submit(
        [this, target, grad, scale, written] {
          options_.copier->wait(written);
          const auto since = Clock::now();
          const std::uint64_t count = target->d.shard_elements;
          const std::uint64_t grad_bytes = count * comm_.world_size() * sizeof(float);
          const auto accumulate = [&](const float* reduced) {
            accumulate_gradient(target->partition_offset, std::span(reduced, count), scale);
          };
          const BufferCache::Scoped gradient(buffers_, grad, grad_bytes);
          if (options_.copier->host_accessible() && comm_.world_size() == 1) {
            // One rank with the host stand-in: the gradient is the reduction.
            accumulate(grad);
          } else {
            const BufferCache::Scoped reduced(buffers_, count * sizeof(float));
            device_reduce_scatter(grad, reduced.get<float>(), count);
            if (options_.copier->host_accessible()) {
              accumulate(reduced.get<float>());
            } else {
              // The worker's own scratch: no allocation per reduction.
              reduce_scratch_.resize(count);
              copy_to_host(reduce_scratch_.data(), reduced.get(), count * sizeof(float));
              accumulate(reduce_scratch_.data());
            }
          }
          add_time(stats_mutex_, stats_.reduce_busy, since);
        });
    pending_reductions_.push_back({ticket, param.d.shard_elements * comm_.world_size()});
    pending_reduction_elements_ += pending_reductions_.back().elements;
    std::lock_guard lock(stats_mutex_);
    ++stats_.reduce_scatters;
  }
  // Gradients waiting for their reduction hold device memory: at most
  // reduce_bucket_size elements of them (and always the newest), as
  // DeepSpeed's bucket bounds its own. A backward faster than the
  // reductions waits here instead of filling the device.
  std::uint64_t completed = 0;
  {
    std::lock_guard lock(mutex_);
    completed = completed_;
  }
  while (!pending_reductions_.empty() && pending_reductions_.front().ticket <= completed) {
    pending_reduction_elements_ -= pending_reductions_.front().elements;
    pending_reductions_.pop_front();
  }
  while (pending_reductions_.size() > 1 && pending_reduction_elements_ > config_.zero.reduce_bucket_size) {
    wait_op(pending_reductions_.front().ticket);
    pending_reduction_elements_ -= pending_reductions_.front().elements;
    pending_reductions_.pop_front();
  }
  release_after_use(module);
}

void* Engine::param(ParamIndex p) {
  Param& param = at(p);
  if (param.state != State::available) {
    throw Error(ErrorKind::invalid,
                fmt::format("'{}' is not gathered: use it between its module's pre- and post-hooks",
                            param.d.name));
  }
  return param.gathered;
}

const float* Engine::param_f32(ParamIndex p) {
  if (working_ != DType::f32) {
    throw Error(ErrorKind::invalid, fmt::format("param_f32: the working precision is {}, not fp32",
                                                cpu_adam::to_string(working_)));
  }
  return static_cast<const float*>(param(p));
}

float* Engine::grad(ParamIndex p) {
  Param& param = at(p);
  if (!param.d.trainable) {
    throw Error(ErrorKind::invalid, fmt::format("'{}' is frozen (set_trainable false): it has no gradient",
                                                param.d.name));
  }
  if (param.grad == nullptr) {
    throw Error(ErrorKind::invalid,
                fmt::format("'{}' has no gradient buffer: use it between its module's pre_backward and "
                            "post_backward", param.d.name));
  }
  return param.grad;
}

// ---- the optimizer step ------------------------------------------------------

void Engine::accumulate_gradient(std::uint64_t offset, std::span<const float> values, float scale) {
  if (!gradient_swapper_) {
    float* shard = grad_partition_.data() + offset;
    for (std::size_t i = 0; i < values.size(); ++i) shard[i] += scale * values[i];
    return;
  }
  const std::uint64_t end = offset + values.size();
  // The sub-group holding the last element, then down: a shard cut by a
  // sub-group boundary goes to the sub-group backward is already in first.
  auto g = static_cast<std::size_t>(
      std::upper_bound(sub_group_begin_.begin(), sub_group_begin_.end(), end - 1) - sub_group_begin_.begin() - 1);
  for (;; --g) {
    const std::uint64_t begin = sub_group_begin_[g];
    const std::uint64_t from = std::max(offset, begin);
    const std::uint64_t to = std::min(end, begin + sub_groups_[g].elements);
    gradient_swapper_->accumulate(g, from - begin, values.subspan(from - offset, to - from), scale);
    if (from == offset) break;
  }
}

void Engine::clear_gradients() {
  if (gradient_swapper_) {
    gradient_swapper_->clear();
  } else {
    std::fill(grad_partition_.begin(), grad_partition_.end(), 0.0f);
  }
}

void Engine::drop_gradients() {
  require_finalized("drop_gradients");
  drain();
  clear_gradients();
  accumulated_micro_steps_ = 0;
}

void Engine::empty_partition_cache() {
  require_finalized("empty_partition_cache");
  drain();
  release_all_unpersisted();
  buffers_.free_all_idle();
}

bool Engine::step(std::optional<bool> boundary_override) {
  require_finalized("step");
  // The trainer's last kernels (reading persistent params, writing
  // gradients) are done before the step rewrites or reduces them.
  options_.copier->wait(trainer_work());
  drain();
  const bool boundary = boundary_override.value_or(
      (micro_step_ + 1) % static_cast<std::int64_t>(config_.training.gradient_accumulation_steps) == 0);
  if (gradient_swapper_) gradient_swapper_->end_micro_step();
  accumulated_micro_steps_ = boundary ? 0 : accumulated_micro_steps_ + 1;
  release_all_unpersisted();
  coordinator_->begin_micro_step();
  ++micro_step_;
  {
    std::lock_guard lock(stats_mutex_);
    ++stats_.micro_steps;
    stats_.order_changes = coordinator_->divergences();
  }
  if (!boundary) return false;

  const auto since = Clock::now();
  // Global gradient norm over every rank's shards (padding is zero), summed
  // per sub-group in order wherever the gradients are (the same value).
  double local = 0.0;
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    if (gradient_swapper_) {
      local += gradient_swapper_->sum_of_squares(g);
      continue;
    }
    double sum = 0.0;
    const float* values = grad_partition_.data() + sub_group_begin_[g];
    for (std::uint64_t i = 0; i < sub_groups_[g].elements; ++i) sum += static_cast<double>(values[i]) * values[i];
    local += sum;
  }
  float total = static_cast<float>(local);
  // Through a device buffer when the communicator takes device memory
  // only: NCCL cannot read this stack float.
  host_all_reduce(&total, 1, ReduceOp::sum);
  const double norm = std::sqrt(static_cast<double>(total));
  if (!std::isfinite(norm)) {
    // An overflow (or a NaN): stepping would turn every master into NaN.
    // Skip, as DeepSpeed's fp16 optimizer does, and lower the loss scale.
    clear_gradients();
    good_steps_ = 0;
    const auto& t = config_.training;
    if (working_ == DType::f16 && t.loss_scale == 0 && --hysteresis_left_ == 0) {
      loss_scale_ = std::max(t.min_loss_scale, loss_scale_ / 2);
      hysteresis_left_ = t.hysteresis;
    }
    log().warn("zero3: gradient norm is {} at optimizer step {}: step skipped{}", norm, optimizer_step_,
               working_ == DType::f16 ? fmt::format(", loss scale now {}", loss_scale_) : std::string());
    std::lock_guard lock(stats_mutex_);
    ++stats_.skipped_steps;
    stats_.last_grad_norm = norm;
    return false;
  }
  if (working_ == DType::f16 && config_.training.loss_scale == 0 &&
      ++good_steps_ % config_.training.loss_scale_window == 0) {
    loss_scale_ *= 2;
  }
  const double clip = config_.training.gradient_clipping;
  if (clip > 0.0) {
    // torch.nn.utils.clip_grad_norm_'s rule.
    const double coefficient = clip / (norm + 1e-6);
    if (coefficient < 1.0) {
      const float c = static_cast<float>(coefficient);
      if (gradient_swapper_) {
        gradient_swapper_->set_read_scale(c);  // applied as the step reads them
      } else {
        for (float& g : grad_partition_) g *= c;
      }
    }
  }

  std::vector<cpu_adam::Buffer> grads;
  std::vector<cpu_adam::Buffer> copies;
  // Params on NVMe or on a separate device: every sub-group's working copy
  // goes through one buffer of the largest sub-group's size, to the param
  // store or the device shards as each is done.
  std::vector<std::byte> scratch;
  if (!working_in_host()) {
    std::uint64_t largest = 0;
    for (const auto& group : sub_groups_) largest = std::max(largest, group.elements);
    scratch.resize(largest * element_bytes());
  }
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    const std::uint64_t offset = sub_group_begin_[g];
    const std::uint64_t elements = sub_groups_[g].elements;
    if (!gradient_swapper_) grads.push_back({grad_partition_.data() + offset, elements, DType::f32});
    std::byte* copy = working_in_host() ? working_partition_.data() + offset * element_bytes() : scratch.data();
    copies.push_back({copy, elements, working_});
  }
  std::function<void(std::size_t)> copied;
  if (!working_in_host()) {
    copied = [&](std::size_t g) {
      store_working(sub_group_begin_[g], std::span(scratch.data(), sub_groups_[g].elements * element_bytes()));
    };
  }
  if (gradient_swapper_) {
    optimizer_->step(*gradient_swapper_, copies, copied);
  } else if (optimizer_) {
    optimizer_->step(grads, copies, copied);
  }
  ++optimizer_step_;
  clear_gradients();
  place_shards(false);  // the frozen params' shards are as they were
  std::lock_guard lock(stats_mutex_);
  ++stats_.optimizer_steps;
  stats_.last_grad_norm = norm;
  stats_.step_time = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - since);
  return true;
}

void Engine::set_learning_rate(double lr) {
  require_finalized("set_learning_rate");
  if (!(lr >= 0.0) || !std::isfinite(lr)) {
    throw Error(ErrorKind::invalid, fmt::format("set_learning_rate({}): a learning rate is finite and >= 0", lr));
  }
  learning_rate_ = lr;
  if (optimizer_) optimizer_->set_learning_rate(static_cast<float>(lr));
}

double Engine::learning_rate() const {
  require_finalized("learning_rate");
  return learning_rate_;
}

EngineStats Engine::stats() const {
  EngineStats out;
  {
    std::lock_guard lock(stats_mutex_);
    out = stats_;
  }
  for (const auto* store : {optimizer_store_.get(), param_store_.get(), gradient_store_.get()}) {
    if (store == nullptr) continue;
    const auto store_stats = store->stats();
    for (std::uint64_t bytes : store_stats.written_bytes) out.nvme_written_bytes += bytes;
    out.nvme_read_bytes += store_stats.read_bytes;
  }
  out.host_working_bytes = working_partition_.size();
  return out;
}

template <typename Visit>
void Engine::for_each_shard_piece(const Param& param, Visit visit) const {
  const std::uint64_t shard_end = param.partition_offset + param.d.shard_elements;
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    const std::uint64_t group_begin = sub_group_begin_[g];
    const std::uint64_t from = std::max(group_begin, param.partition_offset);
    const std::uint64_t to = std::min(group_begin + sub_groups_[g].elements, shard_end);
    if (from < to) visit(g, from, to);
  }
}

std::vector<std::string> Engine::optimizer_state_names() const {
  return swap::OptimizerSwapper::state_names(swap::optimizer_swapper_options(config_).optimizer.kind);
}

const Engine::Param& Engine::values_param(ParamIndex p, std::string_view what, const char* call) {
  require_finalized(call);
  drain();
  const Param& param = at(p);
  if (what != "param" && what != "grad") {
    const auto names = optimizer_state_names();
    if (std::find(names.begin(), names.end(), what) == names.end()) {
      std::string known;
      for (const auto& name : names) known += ", \"" + name + "\"";
      throw Error(ErrorKind::invalid, fmt::format("'{}': no values named '{}' (\"param\", \"grad\"{})", param.d.name,
                                                  what, known));
    }
  }
  if (what != "param" && !param.d.trainable) {
    throw Error(ErrorKind::invalid, fmt::format("'{}' is frozen: it has no {}", param.d.name,
                                                what == "grad" ? "gradient" : "optimizer state"));
  }
  return param;
}

std::vector<float> Engine::shard_from(const Param& param, std::span<const float> values, std::uint64_t first) const {
  const std::uint64_t start = static_cast<std::uint64_t>(comm_.rank()) * param.d.shard_elements;
  std::vector<float> shard(param.d.shard_elements, 0.0f);  // past the param's end: padding
  for (std::uint64_t i = 0; i < shard.size() && start + i < param.d.elements; ++i) shard[i] = values[first + i];
  return shard;
}

std::vector<float> Engine::read_shard(const Param& param, std::string_view what) {
  std::vector<float> shard(param.d.shard_elements, 0.0f);
  if (!param.d.trainable) {
    // The optimizer's partition holds no frozen param: its working copy is
    // all there is.
    read_working(param, shard);
    return shard;
  }
  std::vector<float> values;
  for_each_shard_piece(param, [&](std::size_t g, std::uint64_t from, std::uint64_t to) {
    const std::uint64_t group_begin = sub_group_begin_[g];
    values.resize(sub_groups_[g].elements);
    if (what == "param") {
      optimizer_->read_params(g, values);
    } else if (what != "grad") {
      optimizer_->read_state(g, what, values);
    } else if (gradient_swapper_) {
      gradient_swapper_->copy_out(g, values);
    } else {
      const float* partition = grad_partition_.data() + group_begin;
      std::copy(partition, partition + values.size(), values.begin());
    }
    std::copy(values.begin() + static_cast<std::ptrdiff_t>(from - group_begin),
              values.begin() + static_cast<std::ptrdiff_t>(to - group_begin),
              shard.begin() + static_cast<std::ptrdiff_t>(from - param.partition_offset));
  });
  return shard;
}

void Engine::write_shard(const Param& param, std::string_view what, std::span<const float> shard) {
  // The trainer's kernels still queued may read a persistent param, whose
  // bytes this rewrites in place: they finish first, as before a step.
  if (what == "param") options_.copier->wait(trainer_work());
  if (!param.d.trainable) {
    set_working(param.partition_offset, shard);
    place_shards();
    return;
  }
  if (what == "grad") {
    for_each_shard_piece(param, [&](std::size_t g, std::uint64_t from, std::uint64_t to) {
      const auto piece = shard.subspan(from - param.partition_offset, to - from);
      if (gradient_swapper_) {
        gradient_swapper_->overwrite(g, from - sub_group_begin_[g], piece);
      } else {
        std::copy(piece.begin(), piece.end(), grad_partition_.begin() + static_cast<std::ptrdiff_t>(from));
      }
    });
    return;
  }
  // Each sub-group holding part of the shard is rewritten whole (params and
  // moments at the current step): rare (a user editing a param), so
  // simplicity wins over the bytes.
  const auto names = optimizer_state_names();
  // 0 the master, then the states in names' order (values_param checked the name).
  const std::size_t index =
      what == "param" ? 0 : 1 + static_cast<std::size_t>(std::find(names.begin(), names.end(), what) - names.begin());
  for_each_shard_piece(param, [&](std::size_t g, std::uint64_t from, std::uint64_t to) {
    const std::uint64_t group_begin = sub_group_begin_[g];
    std::vector<float> master(sub_groups_[g].elements);
    optimizer_->read_params(g, master);
    std::vector<std::vector<float>> states(names.size(), std::vector<float>(master.size()));
    for (std::size_t s = 0; s < names.size(); ++s) optimizer_->read_state(g, names[s], states[s]);
    std::vector<float>& target = index == 0 ? master : states[index - 1];
    std::copy(shard.begin() + static_cast<std::ptrdiff_t>(from - param.partition_offset),
              shard.begin() + static_cast<std::ptrdiff_t>(to - param.partition_offset),
              target.begin() + static_cast<std::ptrdiff_t>(from - group_begin));
    std::vector<std::span<const float>> views(states.begin(), states.end());
    optimizer_->initialize(g, master, optimizer_step_, views);
    if (index == 0) set_working(group_begin, master);
  });
  if (index == 0) place_shards();
}

std::vector<float> Engine::local_values(ParamIndex p, std::string_view what) {
  if (what == "working") {
    // The shard as forward gathers it: one param's bytes wherever
    // offload_param keeps them (not the masters' whole sub-group).
    require_finalized("local_values");
    drain();
    const Param& param = at(p);
    std::vector<float> shard(param.d.shard_elements, 0.0f);
    read_working(param, shard);
    return shard;
  }
  return read_shard(values_param(p, what, "local_values"), what);
}

std::vector<float> Engine::gather_values(ParamIndex p, std::string_view what) {
  const Param& param = values_param(p, what, "gather_values");
  const std::vector<float> mine = read_shard(param, what);
  std::vector<float> whole(mine.size() * comm_.world_size());
  host_all_gather(mine.data(), whole.data(), mine.size() * sizeof(float));
  whole.resize(param.d.elements);
  return whole;
}

void Engine::set_local_values(ParamIndex p, std::string_view what, std::span<const float> shard) {
  const Param& param = values_param(p, what, "set_local_values");
  if (shard.size() != param.d.shard_elements) {
    throw Error(ErrorKind::invalid, fmt::format("set_local_values('{}', '{}'): {} values for a shard of {}",
                                                param.d.name, what, shard.size(), param.d.shard_elements));
  }
  // What the caller left past the param's end is zeroed (it would count in
  // the gradient norm).
  write_shard(param, what, shard_from(param, shard, 0));
}

void Engine::set_values(ParamIndex p, std::string_view what, std::span<const float> whole) {
  const Param& param = values_param(p, what, "set_values");
  if (whole.size() != param.d.elements) {
    throw Error(ErrorKind::invalid, fmt::format("set_values('{}', '{}'): {} values for {} elements", param.d.name,
                                                what, whole.size(), param.d.elements));
  }
  write_shard(param, what, shard_from(param, whole, static_cast<std::uint64_t>(comm_.rank()) * param.d.shard_elements));
}

}  // namespace zinf::zero3

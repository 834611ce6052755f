#include "swap/memory_plan.hpp"

#include <sys/statvfs.h>

#include <algorithm>
#include <fstream>
#include <map>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/optimizer_swapper.hpp"
#include "swap/param_swapper.hpp"
#include "swap/swap_config.hpp"

namespace zinf::swap {
namespace {

constexpr std::uint64_t kAlignment = 4096;

// Bytes of a param or grad in the training precision: 2 with fp16/bf16
// enabled, 4 for fp32 training.
std::uint64_t working_bytes(const config::Config& config) {
  return config.training.precision == config::Precision::fp32 ? 4 : 2;
}

std::uint64_t ceil_div(std::uint64_t a, std::uint64_t b) { return (a + b - 1) / b; }

struct StageResult {
  TierBytes tiers;
  std::vector<PlannedBuffer> buffers;
  std::string not_possible;
};

StageResult plan_stage(const config::Config& config, const PlanInput& input, int stage) {
  const auto& zero = config.zero;
  const std::uint64_t element = working_bytes(config);
  const std::uint64_t psi = input.params;
  const std::uint64_t world = std::max<std::uint32_t>(input.world_size, 1);
  const std::uint64_t psi_rank = ceil_div(psi, world);
  const std::uint64_t largest =
      input.largest_param != 0 ? std::min(input.largest_param, psi)
                               : std::min<std::uint64_t>(psi, 100000000);
  const OptimizerKind kind = optimizer_swapper_options(config).optimizer.kind;
  const std::uint64_t state_bytes = 4 * (1 + OptimizerSwapper::state_names(kind).size());

  const std::uint64_t params = element * (stage >= 3 ? psi_rank : psi);
  const std::uint64_t grads = element * (stage >= 2 ? psi_rank : psi);
  const std::uint64_t optimizer = state_bytes * (stage >= 1 ? psi_rank : psi);
  StageResult result;
  if (zero.offload_optimizer.device == config::OffloadDevice::nvme && stage != 3) {
    // What `zinf-config check` refuses is not planned either.
    result.not_possible = "offload_optimizer nvme needs stage 3";
    return result;
  }
  TierBytes& t = result.tiers;
  const auto host = [&](bool pinned, std::uint64_t bytes) {
    (pinned ? t.pinned : t.pageable) += bytes;
  };

  // Parameters: offload_param only exists at stage 3.
  const auto param_device = stage == 3 ? zero.offload_param.device : config::OffloadDevice::none;
  if (param_device == config::OffloadDevice::none) {
    t.gpu += params;
  } else {
    if (param_device == config::OffloadDevice::cpu) {
      host(zero.offload_param.pin_memory, params);
    } else {
      t.nvme += params;
      // The param swapper's own plan, from shards of the largest param.
      const std::uint64_t shard = ceil_div(largest, world);
      ParamSwapperOptions options;
      options.buffer_count = zero.offload_param.buffer_count;
      options.buffer_bytes = element * zero.offload_param.buffer_size;
      options.max_in_cpu_bytes = element * zero.offload_param.max_in_cpu;
      const ParamPlan plan =
          ParamSwapper::plan_for(element * shard, element * psi_rank, options, kAlignment);
      host(zero.offload_param.pin_memory, plan.pinned_bytes);
      result.buffers.push_back(
          {fmt::format("param swapper: {} shard(s) in flight + {} max_in_cpu cache",
                       format_bytes(plan.in_flight_bytes), format_bytes(plan.cache_bytes)),
           plan.pinned_bytes});
      t.nvme += element * shard;  // copy-on-write headroom for one shard
    }
  }
  if (stage == 3) {
    // Gathered layers: the largest param plus what prefetch brings ahead.
    const std::uint64_t live = std::min(
        psi, std::min(zero.max_live_parameters, largest + zero.prefetch_bucket_size));
    t.gpu += element * live;
  }

  // Gradients are produced on the GPU; with the optimizer on the CPU a
  // 16-bit partition also lives on the host for it.
  t.gpu += grads;
  const auto optimizer_device = zero.offload_optimizer.device;
  if (optimizer_device == config::OffloadDevice::none) {
    t.gpu += optimizer;
  } else {
    host(zero.offload_optimizer.pin_memory, element * psi_rank);
    if (optimizer_device == config::OffloadDevice::cpu) {
      host(zero.offload_optimizer.pin_memory, optimizer);
    } else {
      t.nvme += optimizer;
      const std::uint64_t group = std::min(zero.sub_group_size, std::max<std::uint64_t>(psi_rank, 1));
      const SubGroup sub_group{"largest", group};
      const std::uint64_t slots = OptimizerSwapper::pinned_bytes_needed(
          std::span(&sub_group, 1), kind, true, kAlignment);
      t.pinned += slots;  // the slots are page-locked whatever pin_memory says
      result.buffers.push_back(
          {fmt::format("optimizer swapper: 3 slots x {} tensors x {} elements (sub_group_size)",
                       1 + OptimizerSwapper::state_names(kind).size(), group),
           slots});
      // Copy-on-write headroom: in the pipeline two sub-groups are written
      // before the older one's commit frees its previous extents (one when
      // there is only one).
      const std::uint64_t sub_groups = ceil_div(std::max<std::uint64_t>(psi_rank, 1), group);
      t.nvme += std::min<std::uint64_t>(2, sub_groups) * state_bytes * group;
    }
  }
  return result;
}

std::string offload_text(const config::Config& config, int stage) {
  std::string text = fmt::format("optimizer {}", config::to_string(config.zero.offload_optimizer.device));
  if (stage == 3) text += fmt::format(", params {}", config::to_string(config.zero.offload_param.device));
  return text;
}

std::uint64_t mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string name;
  std::uint64_t kib = 0;
  std::string unit;
  while (in >> name >> kib >> unit) {
    if (name == "MemAvailable:") return kib * 1024;
  }
  return 0;
}

// The free bytes of the filesystem holding `path` or its nearest existing
// ancestor, and that filesystem's id (so two paths on one disk count once).
std::pair<std::uint64_t, std::uint64_t> free_space(std::filesystem::path path) {
  std::error_code error;
  path = std::filesystem::absolute(path, error);
  while (!path.empty() && !std::filesystem::exists(path, error)) {
    if (path == path.parent_path()) break;
    path = path.parent_path();
  }
  struct statvfs info {};
  if (::statvfs(path.c_str(), &info) != 0) return {0, 0};
  return {static_cast<std::uint64_t>(info.f_bavail) * info.f_frsize, info.f_fsid};
}

}  // namespace

MemoryPlan plan_memory(const config::Config& config, const PlanInput& input) {
  if (input.params == 0) throw Error(ErrorKind::invalid, "--params 0: a model has at least one parameter");
  MemoryPlan plan;
  plan.chosen_stage = std::clamp(config.zero.stage, 0, 3);
  plan.ranks_per_node = input.ranks_per_node != 0 ? input.ranks_per_node
                                                  : std::max<std::uint32_t>(input.world_size, 1);
  for (int stage = 1; stage <= 3; ++stage) {
    StageResult result = plan_stage(config, input, stage);
    plan.stages.push_back({stage, result.tiers, offload_text(config, stage), result.not_possible});
  }
  StageResult chosen = plan_stage(config, input, plan.chosen_stage);
  plan.chosen = chosen.tiers;
  plan.buffers = std::move(chosen.buffers);
  return plan;
}

FitCheck check_fit(const config::Config& config, const MemoryPlan& plan) {
  FitCheck check;
  const std::uint64_t ranks = plan.ranks_per_node;
  const std::uint64_t host = (plan.chosen.pinned + plan.chosen.pageable) * ranks;
  const std::uint64_t available = mem_available_bytes();
  const bool ram_ok = host <= available;
  check.lines.push_back(fmt::format("host RAM: {} needed on this machine ({} rank(s)), {} "
                                    "available: {}",
                                    format_bytes(host), ranks, format_bytes(available),
                                    ram_ok ? "ok" : "does not fit"));
  check.fits = check.fits && ram_ok;

  const std::uint64_t pinned = plan.chosen.pinned * ranks;
  const std::uint64_t memlock = memlock_limit_bytes();
  if (pinned > 0) {
    const bool lock_ok = memlock == UINT64_MAX || pinned <= memlock || has_ipc_lock_capability();
    check.lines.push_back(
        fmt::format("pinned: {} to page-lock, RLIMIT_MEMLOCK {}{}: {}", format_bytes(pinned),
                    memlock == UINT64_MAX ? "unlimited" : format_bytes(memlock),
                    has_ipc_lock_capability() ? " (CAP_IPC_LOCK held)" : "",
                    lock_ok ? "ok" : "does not fit (raise `ulimit -l` or set pin_memory false)"));
    check.fits = check.fits && lock_ok;
  }

  if (plan.chosen.nvme > 0) {
    std::vector<std::string> paths = config.zero.offload_optimizer.nvme_path;
    for (const auto& path : config.zero.offload_param.nvme_path) paths.push_back(path);
    std::map<std::uint64_t, std::uint64_t> free_by_filesystem;
    for (const auto& path : paths) {
      const auto [free, id] = free_space(path);
      free_by_filesystem[id] = free;
    }
    std::uint64_t free = 0;
    for (const auto& [id, bytes] : free_by_filesystem) free += bytes;
    const std::uint64_t needed = plan.chosen.nvme * ranks;
    const bool nvme_ok = needed <= free;
    check.lines.push_back(fmt::format("NVMe: {} needed under {} ({} filesystem(s)), {} free: {}",
                                      format_bytes(needed), fmt::join(paths, ", "),
                                      free_by_filesystem.size(), format_bytes(free),
                                      nvme_ok ? "ok" : "does not fit"));
    check.fits = check.fits && nvme_ok;
  }
  return check;
}

}  // namespace zinf::swap

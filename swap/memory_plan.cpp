#include "swap/memory_plan.hpp"

#include <sys/statvfs.h>

#include <algorithm>
#include <fstream>
#include <map>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/gradient_swapper.hpp"
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
  std::uint64_t transient_host = 0;
  std::vector<PlannedBuffer> buffers;
};

StageResult plan_stage(const config::Config& config, const PlanInput& input, int stage) {
  StageResult result;
  const auto& zero = config.zero;
  // offload_param means something at stage 3 only (below it the config
  // reader drops it, as DeepSpeed ignores it).
  const config::OffloadDevice param_device = stage == 3 ? zero.offload_param.device : config::OffloadDevice::none;
  const std::uint64_t element = working_bytes(config);
  const std::uint64_t psi = input.params;
  const std::uint64_t world = std::max<std::uint32_t>(input.world_size, 1);
  const std::uint64_t psi_rank = ceil_div(psi, world);
  const std::uint64_t largest =
      input.largest_param != 0 ? std::min(input.largest_param, psi)
                               : std::min<std::uint64_t>(psi, 100000000);
  const OptimizerSwapperOptions optimizer_options = optimizer_swapper_options(config);
  const OptimizerKind kind = optimizer_options.optimizer.kind;
  const std::uint64_t tensors = 1 + OptimizerSwapper::state_names(kind).size();
  // Bytes of the param and its states for n elements (the moments in
  // their state_format).
  const auto state_bytes = [&](std::uint64_t n) {
    std::uint64_t bytes = 0;
    for (std::size_t t = 0; t < tensors; ++t) {
      bytes += OptimizerSwapper::tensor_bytes(t, n, optimizer_options.moment_format);
    }
    return bytes;
  };
  const std::string formats = optimizer_options.moment_format == cpu_adam::MomentFormat::fp32
                                  ? std::string("fp32")
                                  : fmt::format("fp32 param + {} moments",
                                                cpu_adam::to_string(optimizer_options.moment_format));
  const bool optimizer_on_nvme = zero.offload_optimizer.device == config::OffloadDevice::nvme;
  const bool params_on_nvme = param_device == config::OffloadDevice::nvme;
  // The engine's pinned pool holds both swappers' buffers and is locked
  // when a block that swaps asks for pinning (see Engine::finalize).
  const bool pool_locked = (optimizer_on_nvme && zero.offload_optimizer.pin_memory) ||
                           (params_on_nvme && zero.offload_param.pin_memory);
  const Tier pool_tier = pool_locked ? Tier::pinned : Tier::pageable;
  // sub_group_size 0 (DeepSpeed: a param per sub-group): the engine's
  // sub-groups are the largest param's shard.
  const std::uint64_t sub_group_size = zero.sub_group_size != 0 ? zero.sub_group_size : ceil_div(largest, world);
  const std::uint64_t group = std::min(sub_group_size, std::max<std::uint64_t>(psi_rank, 1));

  auto add = [&](Tier tier, std::uint64_t bytes, std::string what, bool transient = false) {
    if (bytes == 0) return;
    result.buffers.push_back({std::move(what), bytes, tier, transient});
    if (transient) {
      result.transient_host += bytes;
      return;
    }
    TierBytes& t = result.tiers;
    switch (tier) {
      case Tier::gpu: t.gpu += bytes; break;
      case Tier::pinned: t.pinned += bytes; break;
      case Tier::pageable: t.pageable += bytes; break;
      case Tier::nvme: t.nvme += bytes; break;
    }
  };
  const char* precision = element == 4 ? "fp32" : "16-bit";

  const SubGroup largest_group{"largest", group};
  // With NVMe, sub-groups under min_swap_bytes stay in host memory: every
  // one when sub_group_size is that small, else at most the last, shorter
  // one.
  const std::uint64_t min_swap = resident_below_bytes(config);
  const std::uint64_t group_count = ceil_div(std::max<std::uint64_t>(psi_rank, 1), std::max<std::uint64_t>(group, 1));
  const std::uint64_t last_group = psi_rank - (group_count - 1) * group;
  const std::uint64_t resident = !optimizer_on_nvme                                   ? 0
                                 : stays_resident(largest_group, min_swap)              ? psi_rank
                                 : stays_resident(SubGroup{"last", last_group}, min_swap) ? last_group
                                                                                        : 0;
  const std::uint64_t swapped = psi_rank - resident;
  const std::uint64_t swapped_groups = ceil_div(swapped, std::max<std::uint64_t>(group, 1));
  if (optimizer_on_nvme && zero.offload_optimizer.keeps_gradients_on_nvme()) {
    // Accumulated on NVMe: two sub-groups' buffers in host memory.
    add(Tier::nvme, 4 * swapped, "gradient partition (fp32)");
    add(Tier::pageable, 4 * resident, "gradients (fp32) of the sub-groups under min_swap_bytes");
    // Accumulating micro-steps rewrite at most two sub-groups before a
    // commit frees their old copies (one when there is only one).
    add(Tier::nvme, std::min<std::uint64_t>(2, swapped_groups) * 4 * group, "copy-on-write headroom for the gradients");
    if (swapped > 0) {
      add(pool_tier, GradientSwapper::pinned_bytes_needed(std::span(&largest_group, 1), kAlignment),
          fmt::format("gradient swapper: 2 buffers x {} fp32 elements (sub_group_size)", group));
    }
  } else {
    add(Tier::pageable, 4 * psi_rank, "gradient partition (fp32)");
  }
  if (params_on_nvme) {
    // The param store holds the working copy; a step hands it over one
    // sub-group at a time.
    add(Tier::pageable, element * std::min(group, psi_rank),
        fmt::format("working copy ({}) of one sub-group on its way to the param store", precision), true);
  } else if (param_device == config::OffloadDevice::cpu || input.device_is_host) {
    add(Tier::pageable, element * psi_rank, fmt::format("param partition ({}, the working copy)", precision));
  } else {
    // offload_param none on a device: the working copy is there (below), as
    // the shards at stage 3 and inside the whole params below it; a step
    // hands it over one sub-group at a time.
    add(Tier::pageable, element * std::min(group, psi_rank),
        fmt::format("working copy ({}) of one sub-group on its way to the device", precision), true);
  }
  if (optimizer_on_nvme) {
    if (swapped > 0) {
      add(Tier::nvme, state_bytes(swapped),
          fmt::format("optimizer states: {} tensors ({}) x {} elements", tensors, formats, swapped));
      add(pool_tier,
          OptimizerSwapper::pinned_bytes_needed(std::span(&largest_group, 1), kind, optimizer_options.overlap,
                                                kAlignment, optimizer_options.moment_format),
          fmt::format("optimizer swapper: {} slot(s) x {} tensors x {} elements (sub_group_size)",
                      optimizer_options.overlap ? 3 : 1, tensors, group));
    }
    if (resident > 0) {
      add(Tier::pageable, state_bytes(resident),
          fmt::format("optimizer states of the sub-groups under min_swap_bytes ({}), in host memory: {} tensors "
                      "({}) x {} elements", format_bytes(min_swap), tensors, formats, resident));
    }
    // Copy-on-write headroom: in the pipeline two sub-groups are written
    // before the older one's commit frees its previous extents (one when
    // there is only one).
    add(Tier::nvme, std::min<std::uint64_t>(2, swapped_groups) * state_bytes(group),
        "copy-on-write headroom for the optimizer states");
  } else {
    add(Tier::pageable, state_bytes(psi_rank),
        fmt::format("optimizer states in host memory: {} tensors ({}) x {} elements", tensors, formats, psi_rank));
  }
  add(Tier::pageable, 4 * group, "fp32 masters of one sub-group while finalize() builds them", true);

  if (stage < 3) {
    // Nothing partitions the params: each is whole on every rank, for good.
    add(Tier::gpu, element * psi, fmt::format("params, whole on every rank: {} elements", psi));
  } else {
    switch (param_device) {
      case config::OffloadDevice::none:
        // Where device memory is host memory the partition above is the
        // shards: no second copy.
        if (!input.device_is_host) add(Tier::gpu, element * psi_rank, "param shards on the device (the working copy)");
        break;
      case config::OffloadDevice::cpu:
        break;  // gathers read the working partition above
      case config::OffloadDevice::nvme: {
        add(Tier::nvme, element * psi_rank, "param shards");
        const std::uint64_t shard = ceil_div(largest, world);
        ParamSwapperOptions options;
        options.buffer_count = zero.offload_param.buffer_count;
        options.buffer_bytes = element * zero.offload_param.buffer_size;
        options.max_in_cpu_bytes = element * zero.offload_param.max_in_cpu;
        const ParamPlan plan = ParamSwapper::plan_for(element * shard, element * psi_rank, options, kAlignment);
        add(pool_tier, plan.pinned_bytes,
            fmt::format("param swapper: {} shard(s) in flight + {} max_in_cpu cache",
                        format_bytes(plan.in_flight_bytes), format_bytes(plan.cache_bytes)));
        add(Tier::nvme, element * shard, "copy-on-write headroom for one param shard");
        break;
      }
    }
    // Gathered layers. A param used again within stage3_max_reuse_distance
    // elements stays gathered: in forward then backward order, the last
    // layers, whose params are about R/2 elements apart from their reuse
    // (at least the largest param). On top of those, prefetch brings up to
    // stage3_prefetch_bucket_size ahead while stage3_max_live_parameters
    // allows.
    const std::uint64_t kept = std::min(psi, zero.max_reuse_distance / 2 + largest);
    const std::uint64_t room = zero.max_live_parameters > kept ? zero.max_live_parameters - kept : 0;
    const std::uint64_t live = std::min(psi, kept + std::min(zero.prefetch_bucket_size, room));
    add(Tier::gpu, element * live, fmt::format("gathered layers: {} elements (reuse distance, prefetch)", live));
  }
  // fp32 gradients: the layer in backward, plus those waiting for their
  // reduction (up to reduce_bucket_size elements), plus the reduced block.
  const std::uint64_t waiting = std::min(psi, largest + std::max(largest, zero.reduce_bucket_size));
  add(Tier::gpu, 4 * waiting, fmt::format("fp32 gradients in backward and awaiting reduction: {} elements", waiting));
  add(Tier::gpu, 4 * ceil_div(largest, world), "reduce-scatter output of one gradient");
  // Gloo has no reduce-scatter: it all-reduces a host copy (NCCL needs none).
  add(Tier::pageable, 4 * largest, "collective scratch (Gloo: one gradient; NCCL needs none)");
  return result;
}

std::string offload_text(const config::Config& config, int stage) {
  const auto& zero = config.zero;
  if (stage < 3) {
    return fmt::format("optimizer states {}on {}, params whole on device",
                       zero.offload_optimizer.keeps_gradients_on_nvme() ? "and gradients " : "",
                       zero.offload_optimizer.device == config::OffloadDevice::nvme ? "NVMe" : "host");
  }
  const char* params = zero.offload_param.device == config::OffloadDevice::none  ? "device"
                       : zero.offload_param.device == config::OffloadDevice::cpu ? "host"
                                                                                 : "NVMe";
  const bool gradients_on_nvme = zero.offload_optimizer.keeps_gradients_on_nvme();
  return fmt::format("optimizer states {}on {}, param shards on {}", gradients_on_nvme ? "and gradients " : "",
                     zero.offload_optimizer.device == config::OffloadDevice::nvme ? "NVMe" : "host", params);
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

const char* to_string(Tier tier) {
  switch (tier) {
    case Tier::gpu: return "device";
    case Tier::pinned: return "pinned host";
    case Tier::pageable: return "pageable host";
    case Tier::nvme: return "NVMe";
  }
  return "?";
}

MemoryPlan plan_memory(const config::Config& config, const PlanInput& input) {
  if (input.params == 0) throw Error(ErrorKind::invalid, "--params 0: a model has at least one parameter");
  MemoryPlan plan;
  plan.chosen_stage = std::clamp(config.zero.stage, 0, 3);  // 0 runs as 1
  plan.ranks_per_node = input.ranks_per_node != 0 ? input.ranks_per_node
                                                  : std::max<std::uint32_t>(input.world_size, 1);
  for (int stage = 1; stage <= 3; ++stage) {
    StageResult result = plan_stage(config, input, stage);
    plan.stages.push_back({stage, result.tiers, offload_text(config, stage)});
  }
  StageResult chosen = plan_stage(config, input, plan.chosen_stage);
  plan.chosen = chosen.tiers;
  plan.transient_host = chosen.transient_host;
  plan.buffers = std::move(chosen.buffers);
  return plan;
}

FitCheck check_fit(const config::Config& config, const MemoryPlan& plan) {
  FitCheck check;
  const std::uint64_t ranks = plan.ranks_per_node;
  const std::uint64_t host = (plan.chosen.pinned + plan.chosen.pageable + plan.transient_host) * ranks;
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

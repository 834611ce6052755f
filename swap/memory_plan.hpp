// Where a model's states live for a DeepSpeed config, before anything runs:
// bytes per tier (GPU, pinned host, pageable host, NVMe) per rank for ZeRO
// stages 1-3 with the config's offloads, the buffers zinf will allocate, and
// whether this machine's RAM and the nvme_path's free space hold it.
//
// The model (Ψ params, W ranks, Ψr = ceil(Ψ/W)):
//   params and grads 2 B with fp16/bf16 enabled, 4 B in fp32 training;
//   optimizer states 4 B x (1 + moments)
//   (fp32 master + 2 moments for Adam = 12 B, Adagrad and Lion 8 B);
//   stage 1 partitions optimizer states, 2 also grads, 3 also params.
//   offload_optimizer cpu/nvme moves the optimizer states to host/NVMe and
//   keeps a 16-bit grad partition on the host for the CPU optimizer;
//   offload_param (stage 3) moves the param partition to host/NVMe, and the
//   GPU holds the layers being gathered (largest param + prefetch bucket).
//   NVMe also needs copy-on-write headroom: two sub-groups' states (the
//   pipeline writes two before the older commit frees the old copies; one
//   when there is only one) and
//   one largest shard (more if the trainer rewrites many shards between
//   commits). The free-space check adds the free space of every filesystem
//   under the nvme_paths; the volume stripes evenly, so with disks of very
//   different sizes the smallest fills first (not modelled).
// Activations, temporary buffers and the framework are not counted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "core/config.hpp"

namespace zinf::swap {

struct PlanInput {
  std::uint64_t params = 0;
  std::uint32_t world_size = 1;
  std::uint64_t largest_param = 0;   // elements; 0: min(params, 1e8)
  std::uint32_t ranks_per_node = 0;  // 0: every rank on this machine
};

struct TierBytes {
  std::uint64_t gpu = 0;
  std::uint64_t pinned = 0;
  std::uint64_t pageable = 0;
  std::uint64_t nvme = 0;
};

struct StagePlan {
  int stage = 0;
  TierBytes per_rank;
  std::string offloads;  // "optimizer nvme, params nvme", for display
  std::string not_possible;  // why the config's offloads cannot run at this stage ("" when they can)
};

struct PlannedBuffer {
  std::string what;
  std::uint64_t bytes = 0;  // per rank
};

struct MemoryPlan {
  std::vector<StagePlan> stages;  // 1, 2 and 3
  int chosen_stage = 0;
  TierBytes chosen;               // per rank, the config's own stage
  std::vector<PlannedBuffer> buffers;
  std::uint32_t ranks_per_node = 1;
};

// Throws Error{invalid} for params == 0.
MemoryPlan plan_memory(const config::Config& config, const PlanInput& input);

struct FitCheck {
  bool fits = true;
  std::vector<std::string> lines;  // one per tier checked, "ok"/"does not fit" with numbers
};

// Checks a plan's per-node host and NVMe needs against this machine: RAM
// (MemAvailable), RLIMIT_MEMLOCK for the pinned part, and the free space of
// the filesystems under the nvme_path(s). The GPU is not checked here.
FitCheck check_fit(const config::Config& config, const MemoryPlan& plan);

}  // namespace zinf::swap

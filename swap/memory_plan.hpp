// What zinf's engine will allocate for a DeepSpeed config, before anything
// runs: bytes per tier (device, pinned host, pageable host, NVMe) per rank,
// each buffer by name, and whether this machine's RAM and the nvme_path's
// free space hold it. The model is zinf's, not DeepSpeed's: zinf runs the
// optimizer on the CPU whatever offload_optimizer says, so "none" and "cpu"
// both keep the states in host memory (DeepSpeed keeps them on the GPU with
// "none").
//
// Per rank, for Ψ params over W ranks (Ψr = ceil(Ψ/W)), e bytes per element
// in the working precision (2 with fp16/bf16, 4 in fp32 training), k fp32
// state tensors (master + moments: 3 for Adam, 2 for Adagrad and Lion) and L
// elements in the largest param, at ZeRO stage 3:
//   host: the fp32 gradient partition (4 Ψr) unless offload_optimizer is
//     "nvme" (then on NVMe, with two sub-groups of copy-on-write room, and
//     two sub-group buffers in the pinned pool; "gradients": "cpu" keeps
//     it in host memory), and the partition in the working precision (e
//     Ψr) with offload_param "cpu", which gathers from it ("nvme" keeps it
//     in the param store, "none" on the device (below), each with one
//     sub-group passing through host memory at a step; "none" where device
//     memory is host memory (PlanInput::device_is_host) in the partition);
//     while finalize() builds the masters, one sub-group of fp32 values
//     more (MemoryPlan::transient_host);
//   optimizer states: in host memory (4k Ψr) unless offload_optimizer is
//     "nvme", which puts them on NVMe and takes the optimizer swapper's
//     three slots of one sub-group from the pinned pool;
//   params: offload_param "none" keeps the shard on the device (e Ψr; a
//     persistent param's is its place in the whole param, with no copy),
//     "nvme" puts it on NVMe and takes the param swapper's buffers and
//     max_in_cpu cache from the pinned pool;
//   the pinned pool is page-locked when pin_memory is true on a block that
//     swaps (and RLIMIT_MEMLOCK allows it), pageable otherwise;
//   device: the gathered layers: those kept for their reuse (a param used
//     again within stage3_max_reuse_distance R elements stays: about R/2 +
//     L of the last layers) plus what prefetch brings ahead (up to
//     stage3_prefetch_bucket_size, within stage3_max_live_parameters), x e;
//     fp32 gradients: the layer in backward and those awaiting their
//     reduction (reduce_bucket_size elements), and one reduced block;
//   collective scratch: Gloo all-reduces a host copy of one gradient (4 L);
//   NVMe: the stored partitions plus copy-on-write headroom: one largest
//     shard, and two sub-groups' states (the pipeline writes two before the
//     older commit frees the old copies; one when there is only one).
// The free-space check adds the free space of every filesystem under the
// nvme_paths; the volume stripes evenly, so with disks of very different
// sizes the smallest fills first (not modelled). Not counted: activations,
// the framework, params at or below stage3_param_persistence_threshold
// (whole on every rank; a few per layer in a transformer), thread stacks
// and io_uring rings. Below stage 3 the params are whole on the device (e
// Ψ) instead of shards and gathered layers; stage 0 runs as stage 1, and
// both as stage 2 (gradients reduce-scattered per param).
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
  // The engine's device memory is host memory: zinf.initialize's engine
  // (and any built without a CUDA copier) keeps the working copy of
  // offload_param none in a host partition and no device shards.
  bool device_is_host = false;
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
};

enum class Tier { gpu, pinned, pageable, nvme };
const char* to_string(Tier tier);

struct PlannedBuffer {
  std::string what;
  std::uint64_t bytes = 0;  // per rank
  Tier tier = Tier::pageable;
  bool transient = false;   // held only while finalize() runs: in MemoryPlan::transient_host, not the tiers
};

struct MemoryPlan {
  std::vector<StagePlan> stages;  // 1, 2 and 3 (the engine runs 0 as 1)
  int chosen_stage = 0;
  TierBytes chosen;               // per rank, the config's own stage, held for the whole run
  // Host bytes held on top of `chosen` while finalize() builds the masters
  // (before any layer is gathered): the host peak is pinned + pageable +
  // transient_host, the device's is gpu.
  std::uint64_t transient_host = 0;
  std::vector<PlannedBuffer> buffers;  // the config's stage, every allocation counted in `chosen`
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

// The swap layer configured by a DeepSpeed JSON: options for the store, the
// param swapper and the optimizer swapper from zero_optimization's
// offload_param / offload_optimizer blocks, the "aio" block and the
// "optimizer" block, with DeepSpeed's meaning of each key.
#pragma once

#include <cstdint>

#include "core/config.hpp"
#include "swap/optimizer_swapper.hpp"
#include "swap/param_swapper.hpp"
#include "swap/swap_store.hpp"

namespace zinf::swap {

// The gradient store lives under offload_optimizer's nvme_path.
enum class SwapRole { param, optimizer, gradients };

// The role's nvme_path list, each joined with "zinf/rank<R>/<role>" so the
// roles and every rank get their own locked directories. Throws
// Error{config} naming the key when the role's device is not "nvme". The
// gradient store does not flush (sync false): gradients live for one step
// and no restart reads them.
SwapStoreOptions store_options(const config::Config& config, SwapRole role, int rank = 0);

// buffer_count, buffer_size and max_in_cpu (elements) in bytes of
// `element_bytes` (2 for fp16/bf16 shards).
ParamSwapperOptions param_swapper_options(const config::Config& config,
                                          std::uint64_t element_bytes = 2);

// The "optimizer" block (AdamW when absent) as kernel options; overlap is on
// (pipeline_read / pipeline_write only force what is already on); sub-groups
// under resident_below_bytes stay in host memory.
OptimizerSwapperOptions optimizer_swapper_options(const config::Config& config);

// Bytes of fp32 below which a sub-group's optimizer states and gradients
// stay in host memory rather than swap: offload_optimizer.min_swap_bytes,
// else max(1 MiB, aio.block_size) as DeepSpeed's swappers decide (their
// min_aio_bytes).
std::uint64_t resident_below_bytes(const config::Config& config);

// Cuts `elements` into sub-groups of `size` (the last one shorter), named
// "<prefix><index>"; the first form takes zero_optimization.sub_group_size.
std::vector<SubGroup> sub_groups(const config::Config& config, std::uint64_t elements,
                                 std::string_view prefix = "sub_group.");
std::vector<SubGroup> sub_groups(std::uint64_t elements, std::uint64_t size,
                                 std::string_view prefix);

}  // namespace zinf::swap

#include "swap/swap_config.hpp"

#include <algorithm>
#include <cctype>

#include <fmt/format.h>

#include "core/error.hpp"

namespace zinf::swap {

SwapStoreOptions store_options(const config::Config& config, SwapRole role, int rank) {
  const bool param = role == SwapRole::param;
  const auto device = param ? config.zero.offload_param.device : config.zero.offload_optimizer.device;
  const auto& paths = param ? config.zero.offload_param.nvme_path : config.zero.offload_optimizer.nvme_path;
  const std::string key = param ? "zero_optimization.offload_param" : "zero_optimization.offload_optimizer";
  if (device != config::OffloadDevice::nvme || paths.empty()) {
    ErrorContext context;
    context.key_path = key + ".device";
    throw Error(ErrorKind::config,
                fmt::format("{}.device is \"{}\": a swap store needs \"nvme\" and a nvme_path", key,
                            config::to_string(device)),
                std::move(context));
  }
  SwapStoreOptions options;
  const char* role_directory = param ? "param" : role == SwapRole::optimizer ? "optimizer" : "gradients";
  for (const auto& path : paths) {
    options.directories.push_back(std::filesystem::path(path) / "zinf" / fmt::format("rank{}", rank) /
                                  role_directory);
  }
  options.sync = role != SwapRole::gradients;
  options.aio.block_size = config.aio.block_size;
  options.aio.queue_depth = config.aio.queue_depth;
  options.aio.intra_op_parallelism = config.aio.intra_op_parallelism;
  options.aio.single_submit = config.aio.single_submit;
  options.aio.overlap_events = config.aio.overlap_events;
  return options;
}

namespace {

// elements x bytes per element, or Error{config} naming the key when the
// product does not fit in 64 bits (a config value of 1e19, say).
std::uint64_t bytes_of(std::uint64_t elements, std::uint64_t element_bytes, const char* key) {
  std::uint64_t bytes = 0;
  if (__builtin_mul_overflow(elements, element_bytes, &bytes)) {
    ErrorContext context;
    context.key_path = key;
    throw Error(ErrorKind::config,
                fmt::format("{} is {} elements: x {} bytes each does not fit in 64 bits", key, elements,
                            element_bytes),
                std::move(context));
  }
  return bytes;
}

}  // namespace

ParamSwapperOptions param_swapper_options(const config::Config& config, std::uint64_t element_bytes) {
  const auto& block = config.zero.offload_param;
  ParamSwapperOptions options;
  options.buffer_count = block.buffer_count;
  options.buffer_bytes = bytes_of(block.buffer_size, element_bytes, "zero_optimization.offload_param.buffer_size");
  options.max_in_cpu_bytes = bytes_of(block.max_in_cpu, element_bytes, "zero_optimization.offload_param.max_in_cpu");
  return options;
}

std::uint64_t resident_below_bytes(const config::Config& config) {
  return config.zero.offload_optimizer.min_swap_bytes.value_or(std::max<std::uint64_t>(1ull << 20, config.aio.block_size));
}

OptimizerSwapperOptions optimizer_swapper_options(const config::Config& config) {
  OptimizerSwapperOptions options;
  options.overlap = true;
  options.resident_below_bytes = resident_below_bytes(config);
  switch (config.zero.offload_optimizer.state_format) {
    case config::StateFormat::fp32: options.moment_format = cpu_adam::MomentFormat::fp32; break;
    case config::StateFormat::bf16: options.moment_format = cpu_adam::MomentFormat::bf16; break;
    case config::StateFormat::int8: options.moment_format = cpu_adam::MomentFormat::int8; break;
  }
  if (!config.optimizer) return options;  // AdamW with the kernel defaults
  const auto& block = *config.optimizer;
  std::string type = block.type;
  std::transform(type.begin(), type.end(), type.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  auto& settings = options.optimizer;
  if (type == "adagrad") {
    settings.kind = OptimizerKind::adagrad;
    settings.adagrad.lr = static_cast<float>(block.lr);
    settings.adagrad.eps = static_cast<float>(block.eps);
    settings.adagrad.weight_decay = static_cast<float>(block.weight_decay);
  } else if (type == "lion") {
    settings.kind = OptimizerKind::lion;
    settings.lion.lr = static_cast<float>(block.lr);
    settings.lion.beta1 = static_cast<float>(block.beta1);
    settings.lion.beta2 = static_cast<float>(block.beta2);
    settings.lion.weight_decay = static_cast<float>(block.weight_decay);
  } else {
    settings.kind = OptimizerKind::adam;
    settings.adam.lr = static_cast<float>(block.lr);
    settings.adam.beta1 = static_cast<float>(block.beta1);
    settings.adam.beta2 = static_cast<float>(block.beta2);
    settings.adam.eps = static_cast<float>(block.eps);
    settings.adam.weight_decay = static_cast<float>(block.weight_decay);
    settings.adam.adamw_mode = type == "adamw" || block.adam_w_mode;
    settings.adam.bias_correction = block.bias_correction;
  }
  return options;
}

std::vector<SubGroup> sub_groups(const config::Config& config, std::uint64_t elements,
                                 std::string_view prefix) {
  return sub_groups(elements, config.zero.sub_group_size, prefix);
}

std::vector<SubGroup> sub_groups(std::uint64_t elements, std::uint64_t size,
                                 std::string_view prefix) {
  size = std::max<std::uint64_t>(size, 1);
  std::vector<SubGroup> groups;
  for (std::uint64_t done = 0; done < elements; done += size) {
    groups.push_back({fmt::format("{}{}", prefix, groups.size()), std::min(size, elements - done)});
  }
  return groups;
}

}  // namespace zinf::swap

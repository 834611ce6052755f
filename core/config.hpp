// DeepSpeed JSON configs as users already write them, loaded into typed
// option structs. zinf owns the top-level "aio" block, "optimizer",
// gradient_clipping, gradient_accumulation_steps, the "bf16"/"fp16" blocks'
// "enabled", and under
// "zero_optimization" the stage, offload_param, offload_optimizer and the
// ZeRO-3 keys; everything else in a DeepSpeed config belongs to the trainer
// and is ignored. Inside the owned sections:
//   - DeepSpeed's defaults; "auto" means the default;
//   - integers may be written as floats (1e8), never with a fraction;
//   - deprecated spellings load with a warning (cpu_offload,
//     cpu_offload_param, aio.thread_count / aio.num_threads);
//   - stage3_ keys may be written without the prefix;
//   - nvme_path may be a string or a list of paths (striped);
//   - unknown keys, wrong types and out-of-range values are problems that
//     name the key path and the rule, with the nearest known key suggested;
//   - cross-key rules (nvme needs nvme_path, offload_param below stage 3 is ignored, ...).
// Every problem is collected, so a checker can report them all at once.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace zinf::config {

enum class OffloadDevice { none, cpu, nvme };
std::string_view to_string(OffloadDevice device);

struct AioConfig {
  std::uint64_t block_size = 1048576;
  std::uint32_t queue_depth = 8;
  std::uint32_t intra_op_parallelism = 1;
  bool single_submit = false;
  bool overlap_events = true;
  bool use_gds = false;
};

struct OffloadParamConfig {
  OffloadDevice device = OffloadDevice::none;
  std::vector<std::string> nvme_path;
  std::uint64_t buffer_count = 5;
  std::uint64_t buffer_size = 100000000;  // elements
  std::uint64_t max_in_cpu = 1000000000;  // elements
  bool pin_memory = true;
};

// How the optimizer's moments are kept (zinf's key, not DeepSpeed's):
// fp32, bf16, or 8-bit block-wise codes (docs/swap.md, "State formats").
enum class StateFormat { fp32, bf16, int8 };
std::string_view to_string(StateFormat format);

struct OffloadOptimizerConfig {
  OffloadDevice device = OffloadDevice::none;
  StateFormat state_format = StateFormat::fp32;
  // Where the fp32 gradient partition accumulates between steps (zinf's
  // key "gradients"): with device "nvme" on NVMe unless "cpu" is asked for
  // (DeepSpeed swaps them too: host memory then does not grow with the
  // model), in host memory otherwise. Unset: the default.
  std::optional<bool> gradients_on_nvme;
  bool keeps_gradients_on_nvme() const { return device == OffloadDevice::nvme && gradients_on_nvme.value_or(true); }
  // With device "nvme": sub-groups whose fp32 params take fewer bytes keep
  // their states (and gradients) in host memory (zinf's key
  // "min_swap_bytes"). Unset: max(1 MiB, aio.block_size), DeepSpeed's
  // rule; 0 swaps every sub-group.
  std::optional<std::uint64_t> min_swap_bytes;
  std::vector<std::string> nvme_path;
  std::uint64_t buffer_count = 4;
  bool pin_memory = true;
  bool pipeline_read = false;
  bool pipeline_write = false;
  bool fast_init = false;
  double ratio = 1.0;
};

struct ZeroConfig {
  int stage = 0;
  OffloadParamConfig offload_param;
  OffloadOptimizerConfig offload_optimizer;
  std::uint64_t sub_group_size = 1000000000;  // 0: the largest trainable shard (DeepSpeed: a param per sub-group)
  std::uint64_t prefetch_bucket_size = 50000000;
  std::uint64_t param_persistence_threshold = 100000;
  // At most this many elements persist in all (DeepSpeed's
  // stage3_model_persistence_threshold): params that would pass it stay
  // partitioned, the next smaller ones may still persist.
  std::uint64_t model_persistence_threshold = UINT64_MAX;
  std::uint64_t max_live_parameters = 1000000000;
  std::uint64_t max_reuse_distance = 1000000000;
  bool gather_16bit_weights_on_model_save = false;
  bool overlap_comm = true;
  bool contiguous_gradients = true;
  std::uint64_t reduce_bucket_size = 500000000;
  std::uint64_t allgather_bucket_size = 500000000;
};

struct OptimizerConfig {
  std::string type = "AdamW";  // as written: Adam, AdamW, Adagrad, Lion (case-insensitive)
  // DeepSpeed's defaults for Adam, AdamW and Lion; parse_config gives
  // Adagrad torch's (lr 1e-2, eps 1e-10).
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool adam_w_mode = true;  // plain "Adam" means decoupled decay unless false
  bool bias_correction = true;
};

// The working precision of the parameters the trainer computes with (the
// "bf16" / "fp16" blocks' "enabled"); master weights are always fp32.
enum class Precision { fp32, bf16, fp16 };
std::string_view to_string(Precision precision);

// Top-level training keys the partitioner acts on.
struct TrainingConfig {
  double gradient_clipping = 0.0;               // global-norm clip; 0 = off
  std::uint64_t gradient_accumulation_steps = 1;  // micro-steps per optimizer step
  Precision precision = Precision::fp32;
  // fp16's loss scaling (DeepSpeed's fp16 block): loss_scale 0 is dynamic,
  // starting at 2^initial_scale_power, halved after `hysteresis` overflows
  // (not below min_loss_scale), doubled after loss_scale_window good steps.
  double loss_scale = 0.0;
  std::uint64_t initial_scale_power = 16;
  std::uint64_t loss_scale_window = 1000;
  std::uint64_t hysteresis = 2;
  double min_loss_scale = 1.0;
};

struct Config {
  TrainingConfig training;
  AioConfig aio;
  ZeroConfig zero;
  std::optional<OptimizerConfig> optimizer;
};

struct Problem {
  std::string key_path;  // "zero_optimization.offload_param.buffer_size"
  std::string message;   // the rule broken, with a suggestion where there is one
  std::string line() const { return key_path + ": " + message; }
};

struct ParseResult {
  Config config;
  std::vector<Problem> problems;
  std::vector<std::string> warnings;  // deprecated spellings and the like
};

// Never throws for content problems; a text that is not JSON is one problem
// (key path "<json>").
ParseResult parse_config(std::string_view json_text);

// Throw Error{config} naming the first problem's key path, with every
// problem in the message; warnings are logged.
Config load_config_string(std::string_view json_text);
Config load_config_file(const std::filesystem::path& path);

}  // namespace zinf::config

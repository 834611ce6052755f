#include "core/config.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <initializer_list>
#include <span>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.hpp"
#include "core/log.hpp"

namespace zinf::config {

std::string_view to_string(StateFormat format) {
  switch (format) {
    case StateFormat::fp32: return "fp32";
    case StateFormat::bf16: return "bf16";
    case StateFormat::int8: return "int8";
  }
  return "unknown";
}

std::string_view to_string(OffloadDevice device) {
  switch (device) {
    case OffloadDevice::none: return "none";
    case OffloadDevice::cpu: return "cpu";
    case OffloadDevice::nvme: return "nvme";
  }
  return "unknown";
}

std::string_view to_string(Precision precision) {
  switch (precision) {
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
    case Precision::fp16: return "fp16";
  }
  return "unknown";
}

namespace {

using nlohmann::json;

// Edits (insert, delete, substitute, swap two neighbours) from a to b: the
// swap counts once so "aoi" is one edit from "aio".
std::size_t edit_distance(std::string_view a, std::string_view b) {
  const std::size_t width = b.size() + 1;
  std::vector<std::size_t> d((a.size() + 1) * width);
  const auto at = [&](std::size_t i, std::size_t j) -> std::size_t& { return d[i * width + j]; };
  for (std::size_t i = 0; i <= a.size(); ++i) at(i, 0) = i;
  for (std::size_t j = 0; j <= b.size(); ++j) at(0, j) = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      at(i, j) = std::min({at(i - 1, j) + 1, at(i, j - 1) + 1, at(i - 1, j - 1) + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        at(i, j) = std::min(at(i, j), at(i - 2, j - 2) + 1);
      }
    }
  }
  return at(a.size(), b.size());
}

// The candidate fewest edits from `key`, and how many.
std::pair<std::string_view, std::size_t> nearest_key(std::string_view key,
                                                     std::span<const std::string_view> candidates) {
  std::string_view nearest;
  std::size_t best = SIZE_MAX;
  for (std::string_view candidate : candidates) {
    const std::size_t d = edit_distance(key, candidate);
    if (d < best) {
      best = d;
      nearest = candidate;
    }
  }
  return {nearest, best};
}

// DeepSpeed's top-level keys (deepspeed/runtime/config.py and the configs
// of its subsystems). Others are ignored, as DeepSpeed ignores them, unless
// they are a typo of one of these.
constexpr std::string_view kDeepSpeedTopLevelKeys[] = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "bfloat16", "amp", "zero_optimization", "aio", "gradient_clipping",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "communication_data_type", "seq_parallel_communication_data_type",
    "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "elasticity", "pipeline", "checkpoint", "data_types", "autotuning",
    "compression_training", "data_efficiency", "curriculum_learning", "quantize_training", "sparse_attention",
    "nebula", "eigenvalue", "progressive_layer_drop", "hybrid_engine", "weight_quantization",
    "disable_allgather", "dataloader_drop_last", "compile", "timers", "use_data_before_expert_parallelism",
    "torch_autocast", "tensor_parallel", "sequence_parallel_size", "graph_harvesting", "monitor_config",
    "zero_quantized_weights", "zero_quantized_gradients", "zero_hpz_partition_size", "mics_shard_size",
    "fp8", "expert_parallel"};

std::string describe(const json& value) {
  switch (value.type()) {
    case json::value_t::string: return fmt::format("the string \"{}\"", value.get<std::string>());
    case json::value_t::boolean: return value.get<bool>() ? "true" : "false";
    case json::value_t::null: return "null";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "a list";
    default: return value.dump();
  }
}

bool is_auto(const json& value) { return value.is_string() && value.get<std::string>() == "auto"; }

class Reader {
 public:
  explicit Reader(ParseResult& out) : out_(out) {}

  void problem(const std::string& path, std::string message) {
    out_.problems.push_back(Problem{path, std::move(message)});
  }
  void warn(std::string message) { out_.warnings.push_back(std::move(message)); }

  // Reports keys of `section` that are in neither `known` nor `ignored`,
  // suggesting the nearest known key.
  void check_keys(const json& section, const std::string& path,
                  std::initializer_list<std::string_view> known,
                  std::span<const std::string_view> ignored = {}) {
    for (const auto& [key, value] : section.items()) {
      const bool found = std::find(known.begin(), known.end(), key) != known.end() ||
                         std::find(ignored.begin(), ignored.end(), key) != ignored.end();
      if (found) continue;
      if (!path.empty() && std::find(std::begin(kDeepSpeedTopLevelKeys), std::end(kDeepSpeedTopLevelKeys), key) !=
                               std::end(kDeepSpeedTopLevelKeys)) {
        // Some guides print the "aio" block inside zero_optimization.
        problem(join(path, key), fmt::format("the \"{}\" block belongs at the top level of the config, not inside "
                                             "{}: move it out", key, path));
        continue;
      }
      const auto [nearest, best] = nearest_key(key, std::span(known.begin(), known.size()));
      const std::size_t allowed = std::max<std::size_t>(2, key.size() / 3);
      problem(join(path, key),
              best <= allowed ? fmt::format("unknown key; did you mean \"{}\"?", nearest)
                              : std::string("unknown key"));
    }
  }

  static std::string join(const std::string& path, std::string_view key) {
    return path.empty() ? std::string(key) : fmt::format("{}.{}", path, key);
  }

  void read_bool(const json& section, std::string_view key, const std::string& path, bool& target) {
    if (!section.contains(key)) return;
    const json& value = section.at(std::string(key));
    if (is_auto(value)) return;
    if (!value.is_boolean()) {
      problem(join(path, key), fmt::format("must be true or false, not {}", describe(value)));
      return;
    }
    target = value.get<bool>();
  }

  template <class T>
  void read_uint(const json& section, std::string_view key, const std::string& path, T& target,
                 std::uint64_t min = 0, std::uint64_t max = UINT64_MAX) {
    if (!section.contains(key)) return;
    const json& value = section.at(std::string(key));
    if (is_auto(value)) return;
    std::uint64_t number = 0;
    bool ok = false;
    if (value.is_number_unsigned()) {
      number = value.get<std::uint64_t>();
      ok = true;
    } else if (value.is_number_integer()) {
      ok = value.get<std::int64_t>() >= 0;
      number = ok ? static_cast<std::uint64_t>(value.get<std::int64_t>()) : 0;
    } else if (value.is_number_float()) {
      const double d = value.get<double>();
      ok = std::isfinite(d) && d >= 0 && d == std::floor(d) && d < 1.8e19;
      number = ok ? static_cast<std::uint64_t>(d) : 0;
    }
    if (!ok) {
      problem(join(path, key), fmt::format("must be a non-negative whole number, not {}", describe(value)));
      return;
    }
    if (number < min || number > max) {
      problem(join(path, key), max == UINT64_MAX
                                   ? fmt::format("is {}: must be at least {}", number, min)
                                   : fmt::format("is {}: must be between {} and {}", number, min, max));
      return;
    }
    target = static_cast<T>(number);
  }

  void read_double(const json& section, std::string_view key, const std::string& path, double& target,
                   double min, double max, const char* range) {
    if (!section.contains(key)) return;
    const json& value = section.at(std::string(key));
    if (is_auto(value)) return;
    if (!value.is_number() || !std::isfinite(value.get<double>())) {
      problem(join(path, key), fmt::format("must be a number, not {}", describe(value)));
      return;
    }
    const double number = value.get<double>();
    if (number < min || number > max) {
      problem(join(path, key), fmt::format("is {}: must be {}", number, range));
      return;
    }
    target = number;
  }

  void read_device(const json& section, const std::string& path, OffloadDevice& target) {
    if (!section.contains("device")) return;
    const json& value = section.at("device");
    if (value.is_null()) return;
    const std::string text = value.is_string() ? value.get<std::string>() : std::string();
    if (text == "none") target = OffloadDevice::none;
    else if (text == "cpu") target = OffloadDevice::cpu;
    else if (text == "nvme") target = OffloadDevice::nvme;
    else problem(join(path, "device"), fmt::format("must be \"none\", \"cpu\" or \"nvme\", not {}", describe(value)));
  }

  void read_paths(const json& section, const std::string& path, std::vector<std::string>& target) {
    if (!section.contains("nvme_path")) return;
    const json& value = section.at("nvme_path");
    const std::string where = join(path, "nvme_path");
    if (value.is_null()) return;
    if (value.is_string()) {
      if (value.get<std::string>().empty()) {
        problem(where, "is empty");
        return;
      }
      target = {value.get<std::string>()};
      return;
    }
    if (value.is_array() && !value.empty()) {
      std::vector<std::string> paths;
      for (const json& item : value) {
        if (!item.is_string() || item.get<std::string>().empty()) {
          problem(where, fmt::format("must list directory paths, found {}", describe(item)));
          return;
        }
        paths.push_back(item.get<std::string>());
      }
      target = paths;
      return;
    }
    problem(where, fmt::format("must be a directory path or a list of them, not {}", describe(value)));
  }

 private:
  ParseResult& out_;
};

// zero_optimization keys DeepSpeed knows that zinf's C++ engine does not
// act on: they load silently so a whole DeepSpeed config loads
// (ignore_unused_parameters is read by the Python engine).
constexpr std::string_view kZeroIgnored[] = {
    "allgather_partitions", "reduce_scatter", "round_robin_gradients", "load_from_fp32_weights",
    "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1", "memory_efficient_linear",
    "mics_shard_size", "mics_hierarchical_params_gather", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
    "stage3_module_granularity_threshold", "module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params", "use_all_reduce_for_fetch_params",
    "use_multi_rank_bucket_allreduce", "cpu_offload_use_pin_memory", "log_trace_cache_warnings",
    "zeropp_loco_param", "pipeline_loading_checkpoint", "override_module_apply",
    "offload_param_nvme_path", "offload_optimizer_nvme_path", "sub_group_buffer_size"};

constexpr std::string_view kAioDeprecated[] = {"thread_count", "num_threads"};
constexpr std::string_view kOptimizerOffloadDeprecated[] = {"pipeline"};
// Optimizer parameters DeepSpeed's optimizers accept that zinf's CPU
// optimizers have no use for.
constexpr std::string_view kOptimizerParamsIgnored[] = {
    "amsgrad", "torch_adam", "fp32_optimizer_states", "max_coeff", "min_coeff",
    "freeze_step", "cuda_aware", "comm_backend_name", "momentum"};

void read_aio(Reader& r, const json& root, AioConfig& aio) {
  if (!root.contains("aio")) return;
  const json& section = root.at("aio");
  if (!section.is_object()) {
    r.problem("aio", fmt::format("must be an object, not {}", describe(section)));
    return;
  }
  r.check_keys(section, "aio",
               {"block_size", "queue_depth", "intra_op_parallelism", "single_submit", "overlap_events", "use_gds"},
               kAioDeprecated);
  r.read_uint(section, "block_size", "aio", aio.block_size, 1024, 1ull << 30);
  if (aio.block_size % 1024 != 0) {
    r.problem("aio.block_size", fmt::format("is {}: must be a multiple of 1024 (I/O pieces are rounded up to "
                                            "whole 4 KiB)", aio.block_size));
  }
  r.read_uint(section, "queue_depth", "aio", aio.queue_depth, 1, 4096);
  for (const char* old : {"thread_count", "num_threads"}) {
    if (section.contains(old)) {
      r.warn(fmt::format("aio.{} is a deprecated spelling of aio.intra_op_parallelism (DeepSpeed's "
                         "runtime ignores it; zinf honours it)", old));
      if (!section.contains("intra_op_parallelism")) r.read_uint(section, old, "aio", aio.intra_op_parallelism, 1, 256);
    }
  }
  r.read_uint(section, "intra_op_parallelism", "aio", aio.intra_op_parallelism, 1, 256);
  r.read_bool(section, "single_submit", "aio", aio.single_submit);
  r.read_bool(section, "overlap_events", "aio", aio.overlap_events);
  r.read_bool(section, "use_gds", "aio", aio.use_gds);
  if (aio.use_gds) {
    r.warn("aio.use_gds is true: zinf has no GPUDirect Storage path; NVMe traffic goes through pinned host "
           "memory (io_uring), as with false");
  }
}

void read_offload_param(Reader& r, const json& section, const std::string& path, OffloadParamConfig& c) {
  r.check_keys(section, path, {"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory"});
  r.read_device(section, path, c.device);
  r.read_paths(section, path, c.nvme_path);
  r.read_uint(section, "buffer_count", path, c.buffer_count);
  r.read_uint(section, "buffer_size", path, c.buffer_size);
  r.read_uint(section, "max_in_cpu", path, c.max_in_cpu);
  r.read_bool(section, "pin_memory", path, c.pin_memory);
}

void read_offload_optimizer(Reader& r, const json& section, const std::string& path,
                            OffloadOptimizerConfig& c) {
  r.check_keys(section, path,
               {"device", "nvme_path", "buffer_count", "pin_memory", "pipeline_read", "pipeline_write",
                "fast_init", "ratio", "state_format", "gradients", "min_swap_bytes"},
               kOptimizerOffloadDeprecated);
  if (section.contains("state_format") && !is_auto(section.at("state_format"))) {
    const json& value = section.at("state_format");
    const std::string text = value.is_string() ? value.get<std::string>() : std::string();
    if (text == "fp32") c.state_format = StateFormat::fp32;
    else if (text == "bf16") c.state_format = StateFormat::bf16;
    else if (text == "int8") c.state_format = StateFormat::int8;
    else r.problem(path + ".state_format", fmt::format("must be \"fp32\", \"bf16\" or \"int8\", not {}", describe(value)));
  }
  r.read_device(section, path, c.device);
  if (section.contains("gradients") && !is_auto(section.at("gradients"))) {
    const json& value = section.at("gradients");
    const std::string text = value.is_string() ? value.get<std::string>() : std::string();
    if (text == "cpu") {
      c.gradients_on_nvme = false;
    } else if (text != "nvme") {
      r.problem(path + ".gradients", fmt::format("must be \"nvme\" or \"cpu\", not {}", describe(value)));
    } else if (c.device != OffloadDevice::nvme) {
      r.problem(path + ".gradients",
                fmt::format("\"nvme\" needs {}.device \"nvme\" (it is \"{}\")", path, to_string(c.device)));
    } else {
      c.gradients_on_nvme = true;
    }
  }
  r.read_paths(section, path, c.nvme_path);
  r.read_uint(section, "buffer_count", path, c.buffer_count);
  if (section.contains("min_swap_bytes") && !is_auto(section.at("min_swap_bytes"))) {
    std::uint64_t bytes = 0;
    r.read_uint(section, "min_swap_bytes", path, bytes);
    c.min_swap_bytes = bytes;
  }
  r.read_bool(section, "pin_memory", path, c.pin_memory);
  if (section.contains("pipeline")) {
    r.warn(fmt::format("{}.pipeline is deprecated: it sets pipeline_read and pipeline_write", path));
    bool both = false;
    r.read_bool(section, "pipeline", path, both);
    c.pipeline_read = c.pipeline_write = both;
  }
  r.read_bool(section, "pipeline_read", path, c.pipeline_read);
  r.read_bool(section, "pipeline_write", path, c.pipeline_write);
  for (const char* key : {"pipeline_read", "pipeline_write"}) {
    if (section.contains(key) && section.at(key).is_boolean() && !section.at(key).get<bool>()) {
      // Said, not silently ignored: false cannot turn the overlap off.
      r.warn(fmt::format("{}.{} is false: zinf always overlaps optimizer reads, steps and writes (true only "
                         "forces what is already on)", path, key));
    }
  }
  r.read_bool(section, "fast_init", path, c.fast_init);
  r.read_double(section, "ratio", path, c.ratio, 0.0, 1.0, "between 0 and 1");
}

// Reads `name` or `stage3_<name>`; both at once is a problem.
template <class T>
void read_stage3_uint(Reader& r, const json& zero, std::string_view name, T& target) {
  const std::string prefixed = fmt::format("stage3_{}", name);
  if (zero.contains(prefixed) && zero.contains(name)) {
    r.problem(fmt::format("zero_optimization.{}", name),
              fmt::format("given twice, as {} and as {}", name, prefixed));
  }
  r.read_uint(zero, prefixed, "zero_optimization", target);
  r.read_uint(zero, name, "zero_optimization", target);
}

void read_zero(Reader& r, const json& root, ZeroConfig& zero) {
  if (!root.contains("zero_optimization")) return;
  const json& section = root.at("zero_optimization");
  const std::string path = "zero_optimization";
  if (!section.is_object()) {
    r.problem(path, fmt::format("must be an object, not {}", describe(section)));
    return;
  }
  r.check_keys(section, path,
               {"stage", "offload_param", "offload_optimizer", "sub_group_size",
                "stage3_prefetch_bucket_size", "prefetch_bucket_size",
                "stage3_param_persistence_threshold", "param_persistence_threshold",
                "stage3_model_persistence_threshold", "model_persistence_threshold",
                "stage3_max_live_parameters", "max_live_parameters", "stage3_max_reuse_distance",
                "max_reuse_distance", "stage3_gather_16bit_weights_on_model_save",
                "gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
                "overlap_comm", "contiguous_gradients", "reduce_bucket_size", "allgather_bucket_size",
                "cpu_offload", "cpu_offload_param"},
               kZeroIgnored);
  r.read_uint(section, "stage", path, zero.stage, 0, 3);
  if (section.contains("offload_param") && !section.at("offload_param").is_null()) {
    if (section.at("offload_param").is_object()) {
      read_offload_param(r, section.at("offload_param"), path + ".offload_param", zero.offload_param);
    } else {
      r.problem(path + ".offload_param", fmt::format("must be an object, not {}", describe(section.at("offload_param"))));
    }
  }
  if (section.contains("offload_optimizer") && !section.at("offload_optimizer").is_null()) {
    if (section.at("offload_optimizer").is_object()) {
      read_offload_optimizer(r, section.at("offload_optimizer"), path + ".offload_optimizer", zero.offload_optimizer);
    } else {
      r.problem(path + ".offload_optimizer",
                fmt::format("must be an object, not {}", describe(section.at("offload_optimizer"))));
    }
  }
  bool legacy = false;
  if (section.contains("cpu_offload")) {
    r.read_bool(section, "cpu_offload", path, legacy);
    r.warn("zero_optimization.cpu_offload is deprecated: use offload_optimizer.device \"cpu\"");
    if (legacy && zero.offload_optimizer.device == OffloadDevice::none) {
      zero.offload_optimizer.device = OffloadDevice::cpu;
    }
  }
  if (section.contains("cpu_offload_param")) {
    legacy = false;
    r.read_bool(section, "cpu_offload_param", path, legacy);
    r.warn("zero_optimization.cpu_offload_param is deprecated: use offload_param.device \"cpu\"");
    if (legacy && zero.offload_param.device == OffloadDevice::none) zero.offload_param.device = OffloadDevice::cpu;
  }
  if (const auto mics = section.find("mics_shard_size");
      mics != section.end() && mics->is_number() && mics->get<double>() > 0) {
    // DeepSpeed's MiCS: a whole replica per group of that many ranks. The
    // trained values do not depend on it; memory and traffic do.
    r.warn(fmt::format("zero_optimization.mics_shard_size ({}): zinf shards every parameter over all ranks; "
                       "MiCS's groups are not made (the same values are trained)", mics->dump()));
  }
  // 0 is DeepSpeed's "one param per sub-group": the engine resolves it.
  r.read_uint(section, "sub_group_size", path, zero.sub_group_size);
  read_stage3_uint(r, section, "prefetch_bucket_size", zero.prefetch_bucket_size);
  read_stage3_uint(r, section, "param_persistence_threshold", zero.param_persistence_threshold);
  read_stage3_uint(r, section, "model_persistence_threshold", zero.model_persistence_threshold);
  read_stage3_uint(r, section, "max_live_parameters", zero.max_live_parameters);
  read_stage3_uint(r, section, "max_reuse_distance", zero.max_reuse_distance);
  if (section.contains("stage3_gather_fp16_weights_on_model_save")) {
    r.warn("zero_optimization.stage3_gather_fp16_weights_on_model_save is deprecated: use "
           "stage3_gather_16bit_weights_on_model_save");
    r.read_bool(section, "stage3_gather_fp16_weights_on_model_save", path, zero.gather_16bit_weights_on_model_save);
  }
  r.read_bool(section, "stage3_gather_16bit_weights_on_model_save", path, zero.gather_16bit_weights_on_model_save);
  r.read_bool(section, "gather_16bit_weights_on_model_save", path, zero.gather_16bit_weights_on_model_save);
  zero.overlap_comm = zero.stage == 3;  // DeepSpeed's default depends on the stage
  r.read_bool(section, "overlap_comm", path, zero.overlap_comm);
  r.read_bool(section, "contiguous_gradients", path, zero.contiguous_gradients);
  // 0 is valid, as in DeepSpeed: each gradient is reduced on its own.
  r.read_uint(section, "reduce_bucket_size", path, zero.reduce_bucket_size);
  r.read_uint(section, "allgather_bucket_size", path, zero.allgather_bucket_size, 1);
}

void read_optimizer(Reader& r, const json& root, std::optional<OptimizerConfig>& target) {
  if (!root.contains("optimizer") || root.at("optimizer").is_null()) return;
  const json& section = root.at("optimizer");
  if (!section.is_object()) {
    r.problem("optimizer", fmt::format("must be an object, not {}", describe(section)));
    return;
  }
  // DeepSpeed reads "type" and "params" and ignores the rest of the block
  // (its tests put "torch_adam" here): ignored with a warning, a near miss
  // of the two refused as the typo it is.
  constexpr std::string_view kOptimizerKeys[] = {"type", "params"};
  for (const auto& [key, value] : section.items()) {
    if (key == "type" || key == "params") continue;
    const auto [nearest, distance] = nearest_key(key, kOptimizerKeys);
    if (distance <= std::max<std::size_t>(1, key.size() / 3)) {
      r.problem("optimizer." + key, fmt::format("unknown key; did you mean \"{}\"?", nearest));
    } else {
      r.warn(fmt::format("optimizer.{}: DeepSpeed reads only optimizer.type and optimizer.params; ignored{}", key,
                         key == "torch_adam" ? " (DeepSpeed takes torch_adam from optimizer.params)" : ""));
    }
  }
  OptimizerConfig c;
  if (!section.contains("type") || !section.at("type").is_string()) {
    r.problem("optimizer.type", "is required: a name such as \"AdamW\"");
  } else {
    c.type = section.at("type").get<std::string>();
  }
  std::string lower = c.type;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (lower == "adamw") c.adam_w_mode = true;
  if (lower == "adagrad") {
    // DeepSpeed builds torch's Adagrad (or DeepSpeedCPUAdagrad), whose
    // defaults differ from Adam's: a config that names neither must train
    // the same here.
    c.lr = 1e-2;
    c.eps = 1e-10;
  }
  if (section.contains("params")) {
    const json& params = section.at("params");
    if (!params.is_object()) {
      r.problem("optimizer.params", fmt::format("must be an object, not {}", describe(params)));
    } else {
      r.check_keys(params, "optimizer.params",
                   {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "bias_correction"},
                   kOptimizerParamsIgnored);
      r.read_double(params, "lr", "optimizer.params", c.lr, 0.0, 1e9, "non-negative");
      r.read_double(params, "eps", "optimizer.params", c.eps, 0.0, 1.0, "between 0 and 1");
      r.read_double(params, "weight_decay", "optimizer.params", c.weight_decay, 0.0, 1e9, "non-negative");
      r.read_bool(params, "adam_w_mode", "optimizer.params", c.adam_w_mode);
      r.read_bool(params, "bias_correction", "optimizer.params", c.bias_correction);
      if (params.contains("amsgrad") && params.at("amsgrad") == true) {
        r.problem("optimizer.params.amsgrad", "true is not supported: zinf's CPU optimizers have no AMSGrad variant");
      }
      if (params.contains("betas") && !is_auto(params.at("betas"))) {
        const json& betas = params.at("betas");
        if (!betas.is_array() || betas.size() != 2 || !betas[0].is_number() || !betas[1].is_number()) {
          r.problem("optimizer.params.betas", fmt::format("must be a list of two numbers, not {}", describe(betas)));
        } else {
          c.beta1 = betas[0].get<double>();
          c.beta2 = betas[1].get<double>();
          for (double b : {c.beta1, c.beta2}) {
            if (!(b >= 0 && b < 1)) r.problem("optimizer.params.betas", fmt::format("{} is not in [0, 1)", b));
          }
        }
      }
    }
  }
  target = c;
}

void read_training(Reader& r, const json& root, TrainingConfig& training) {
  r.read_double(root, "gradient_clipping", "", training.gradient_clipping, 0.0, 1e30,
                "non-negative (0 turns clipping off)");
  r.read_uint(root, "gradient_accumulation_steps", "", training.gradient_accumulation_steps, 1,
              1u << 30);
  bool bf16 = false;
  bool fp16 = false;
  // "bfloat16" is DeepSpeed's other spelling of the bf16 block.
  for (const char* block : {"bf16", "bfloat16", "fp16"}) {
    if (!root.contains(block) || root.at(block).is_null()) continue;
    const json& section = root.at(block);
    if (!section.is_object()) {
      r.problem(block, fmt::format("must be an object, not {}", describe(section)));
      continue;
    }
    // Loss scaling and the like belong to the trainer; only "enabled" is zinf's.
    if (section.contains("enabled") && is_auto(section.at("enabled"))) {
      // Hugging Face's Trainer fills "auto" in before DeepSpeed reads the
      // config; read as-is it would silently train in fp32.
      r.problem(fmt::format("{}.enabled", block),
                "is \"auto\": zinf cannot tell what your trainer picks; write true or false (Hugging Face's "
                "Trainer replaces \"auto\" only in the config it hands to DeepSpeed itself)");
      continue;
    }
    bool enabled = false;
    r.read_bool(section, "enabled", block, enabled);
    (std::string_view(block) == "fp16" ? fp16 : bf16) |= enabled;
    if (std::string_view(block) == "fp16") {
      r.read_double(section, "loss_scale", block, training.loss_scale, 0.0, 1e30, "non-negative (0: dynamic)");
      r.read_uint(section, "initial_scale_power", block, training.initial_scale_power, 0, 100);
      r.read_uint(section, "loss_scale_window", block, training.loss_scale_window, 1, 1u << 30);
      r.read_uint(section, "hysteresis", block, training.hysteresis, 1, 1u << 20);
      r.read_double(section, "min_loss_scale", block, training.min_loss_scale, 0.0, 1e30, "non-negative");
    }
  }
  if (bf16 && fp16) {
    r.problem("fp16.enabled", "cannot be true together with bf16.enabled");
  }
  training.precision = bf16 ? Precision::bf16 : fp16 ? Precision::fp16 : Precision::fp32;
}

void cross_checks(Reader& r, Config& c) {
  ZeroConfig& z = c.zero;
  const std::string param = "zero_optimization.offload_param";
  const std::string optim = "zero_optimization.offload_optimizer";
  if (z.offload_param.device != OffloadDevice::none && z.stage != 3) {
    // DeepSpeed reads offload_param at stage 3 only and ignores it below;
    // configs copied from a stage-3 one keep the block. Said, not refused.
    r.warn(fmt::format("{}.device: \"{}\" is ignored below ZeRO stage 3 (zero_optimization.stage is {}): params "
                       "stay whole on every rank, as DeepSpeed keeps them",
                       param, to_string(z.offload_param.device), z.stage));
    z.offload_param = OffloadParamConfig{};
  }
  if (z.offload_param.device == OffloadDevice::nvme && z.offload_param.nvme_path.empty()) {
    r.problem(param + ".nvme_path", "is required when device is \"nvme\"");
  }
  if (z.offload_optimizer.device == OffloadDevice::nvme && z.offload_optimizer.nvme_path.empty()) {
    r.problem(optim + ".nvme_path", "is required when device is \"nvme\"");
  }
  if (z.offload_optimizer.ratio < 1.0 && z.stage != 3) {
    r.problem(optim + ".ratio", fmt::format("below 1 needs ZeRO stage 3 (zero_optimization.stage is {})", z.stage));
  } else if (z.offload_optimizer.ratio < 1.0) {
    r.problem(optim + ".ratio",
              fmt::format("is {}: zinf steps every sub-group on the CPU; a ratio below 1 (part of the optimizer "
                          "on the GPU, DeepSpeed's ZeRO-Offload++) is not supported: remove it or set 1",
                          z.offload_optimizer.ratio));
  }
  if (c.optimizer) {
    // zinf runs the optimizer itself (on the CPU) whatever offload_optimizer
    // says: a type it does not have must not train as AdamW.
    std::string lower = c.optimizer->type;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
    if (lower != "adam" && lower != "adamw" && lower != "adagrad" && lower != "lion" && lower != "cpuadam") {
      r.problem("optimizer.type", fmt::format("\"{}\" is not an optimizer zinf runs (it has no CPU "
                                              "implementation); zinf steps Adam, AdamW, Adagrad and Lion",
                                              c.optimizer->type));
    } else if ((lower == "adagrad" || lower == "lion") && z.offload_optimizer.state_format != StateFormat::fp32) {
      r.problem(optim + ".state_format",
                fmt::format("is {}: compressed states are Adam's two moments; {} keeps fp32 states",
                            to_string(z.offload_optimizer.state_format), c.optimizer->type));
    }
  }
}

}  // namespace

ParseResult parse_config(std::string_view json_text) {
  ParseResult result;
  Reader reader(result);
  json root;
  try {
    root = json::parse(json_text.begin(), json_text.end(), nullptr, true, /*ignore_comments=*/true);
  } catch (const json::exception& error) {
    // parse_error, and out_of_range for a number beyond a double (5E455:
    // found by fuzzing).
    reader.problem("<json>", fmt::format("not valid JSON: {}", error.what()));
    return result;
  }
  if (!root.is_object()) {
    reader.problem("<root>", fmt::format("a DeepSpeed config is a JSON object, not {}", describe(root)));
    return result;
  }
  for (const auto& [key, value] : root.items()) {
    if (key == "zinf") {
      // zinf's own block (read by the Python engine): checked here so a
      // typo in it is as loud as one in a DeepSpeed block.
      if (!value.is_object()) {
        reader.problem("zinf", fmt::format("must be an object, not {}", describe(value)));
        continue;
      }
      reader.check_keys(value, "zinf", {"timeout_s", "optimizer_threads", "tbw", "collectives"});
      double number = 0;
      std::uint64_t count = 0;
      reader.read_double(value, "timeout_s", "zinf", number, 1e-3, 1e9, "a positive number of seconds");
      reader.read_uint(value, "optimizer_threads", "zinf", count, 0, 4096);
      reader.read_double(value, "tbw", "zinf", number, 1e-6, 1e12, "the drive's rating in TB written, > 0");
      if (value.contains("collectives")) {
        const json& collectives = value.at("collectives");
        if (!collectives.is_string() || (collectives != "auto" && collectives != "host")) {
          reader.problem("zinf.collectives", fmt::format("must be \"auto\" or \"host\", not {}", describe(collectives)));
        }
      }
      continue;
    }
    if (std::find(std::begin(kDeepSpeedTopLevelKeys), std::end(kDeepSpeedTopLevelKeys), key) !=
        std::end(kDeepSpeedTopLevelKeys)) {
      continue;
    }
    const auto [nearest, best] = nearest_key(key, kDeepSpeedTopLevelKeys);
    // Short keys only one edit away ("aoi"), longer ones a few.
    const std::size_t allowed = key.size() <= 4 ? 1 : std::max<std::size_t>(2, key.size() / 4);
    if (best <= allowed) {
      reader.problem(key, fmt::format("unknown key (DeepSpeed would ignore it); did you mean \"{}\"?", nearest));
    } else {
      reader.warn(fmt::format("{}: not a DeepSpeed key; ignored", key));
    }
  }
  read_training(reader, root, result.config.training);
  read_aio(reader, root, result.config.aio);
  read_zero(reader, root, result.config.zero);
  read_optimizer(reader, root, result.config.optimizer);
  cross_checks(reader, result.config);
  return result;
}

Config load_config_string(std::string_view json_text) {
  ParseResult result = parse_config(json_text);
  for (const std::string& warning : result.warnings) log_once(warning, spdlog::level::warn, warning);
  if (!result.problems.empty()) {
    std::string message = result.problems.front().line();
    for (std::size_t i = 1; i < result.problems.size(); ++i) message += "; " + result.problems[i].line();
    ErrorContext ctx;
    ctx.key_path = result.problems.front().key_path;
    throw Error(ErrorKind::config, message, std::move(ctx));
  }
  return result.config;
}

Config load_config_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw_path_error("open", path.string(), errno);
  std::stringstream text;
  text << in.rdbuf();
  try {
    return load_config_string(text.str());
  } catch (const Error& error) {
    ErrorContext ctx = error.context();
    ctx.path = path.string();
    throw Error(ErrorKind::config, fmt::format("{}: {}", path.string(), error.message()), std::move(ctx));
  }
}

}  // namespace zinf::config

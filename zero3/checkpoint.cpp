// Engine::save_checkpoint / load_checkpoint.
//
// <dir>/zinf_checkpoint.json                  the description, written last
//                                             by rank 0: its presence marks
//                                             a complete checkpoint
// <dir>/zero3_rank<R>_group<G>.safetensors    rank R's sub-group G: fp32
//                                             master params and optimizer
//                                             states (one file per sub-group
//                                             bounds the memory a save needs)
// <dir>/zero3_rank<R>_frozen.safetensors      rank R's shards of the frozen
//                                             params, in the working precision
//                                             (all they have)
// <dir>/zinf_model_weights.safetensors        with stage3_gather_16bit_weights_
//                                             on_model_save: every param whole,
//                                             in the working precision
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "zero3/engine.hpp"
#include "swap/swap_config.hpp"
#include "zero3/safetensors.hpp"

namespace zinf::zero3 {

using json = nlohmann::json;

namespace {

constexpr const char* kDescription = "zinf_checkpoint.json";
constexpr const char* kWeights = "zinf_model_weights.safetensors";
constexpr const char* kFormat = "zinf-zero3-checkpoint";
constexpr int kVersion = 1;

std::filesystem::path group_file(const std::filesystem::path& dir, int rank, std::size_t group) {
  return dir / fmt::format("zero3_rank{:05}_group{:05}.safetensors", rank, group);
}

std::filesystem::path frozen_file(const std::filesystem::path& dir, int rank) {
  return dir / fmt::format("zero3_rank{:05}_frozen.safetensors", rank);
}

std::string frozen_key(std::size_t index, const std::string& name) { return fmt::format("{}:{}", index, name); }

std::string safetensors_dtype(cpu_adam::DType dtype) {
  switch (dtype) {
    case cpu_adam::DType::f32: return "F32";
    case cpu_adam::DType::bf16: return "BF16";
    case cpu_adam::DType::f16: return "F16";
  }
  return "F32";
}

template <class T>
std::span<const std::byte> as_bytes_of(const std::vector<T>& values) {
  return std::as_bytes(std::span(values));
}

[[noreturn]] void mismatch(const std::filesystem::path& path, const std::string& what) {
  ErrorContext ctx;
  ctx.path = path.string();
  throw Error(ErrorKind::invalid, fmt::format("{}: {}", path.string(), what), std::move(ctx));
}

}  // namespace

void Engine::save_checkpoint(const std::filesystem::path& dir) {
  require_finalized("save_checkpoint");
  drain();
  if (micro_step_ % static_cast<std::int64_t>(config_.training.gradient_accumulation_steps) != 0) {
    throw Error(ErrorKind::invalid,
                fmt::format("save_checkpoint at micro-step {} is inside a gradient accumulation of {}: "
                            "save after the step() that runs the optimizer",
                            micro_step_, config_.training.gradient_accumulation_steps));
  }
  const int rank = comm_.rank();
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) throw_path_error("mkdir", dir.string(), error.value());
  if (rank == 0) std::filesystem::remove(dir / kDescription, error);
  comm_.barrier();  // nobody writes shards while an old description says "complete"

  const auto states = swap::OptimizerSwapper::state_names(swap::optimizer_swapper_options(config_).optimizer.kind);
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    const std::uint64_t n = sub_groups_[g].elements;
    std::vector<std::vector<float>> tensors(1 + states.size(), std::vector<float>(n));
    optimizer_->read_params(g, tensors[0]);
    for (std::size_t s = 0; s < states.size(); ++s) optimizer_->read_state(g, states[s], tensors[1 + s]);
    std::vector<TensorToWrite> entries;
    entries.push_back({"param", "F32", {static_cast<std::int64_t>(n)}, as_bytes_of(tensors[0])});
    for (std::size_t s = 0; s < states.size(); ++s) {
      entries.push_back({states[s], "F32", {static_cast<std::int64_t>(n)}, as_bytes_of(tensors[1 + s])});
    }
    write_safetensors(group_file(dir, rank, g), entries,
                      {{"format", kFormat},
                       {"rank", std::to_string(rank)},
                       {"group", std::to_string(g)},
                       {"optimizer_step", std::to_string(optimizer_->step_count())}});
  }

  if (optimizer_elements_ < partition_elements_) {
    const std::uint64_t esize = element_bytes();
    std::vector<TensorToWrite> entries;
    for (std::size_t p = 0; p < params_.size(); ++p) {
      const Param& param = *params_[p];
      if (param.d.trainable) continue;
      entries.push_back({frozen_key(p, param.d.name), safetensors_dtype(working_),
                         {static_cast<std::int64_t>(param.d.shard_elements)},
                         std::span(working_partition_.data() + param.partition_offset * esize,
                                   param.d.shard_elements * esize)});
    }
    write_safetensors(frozen_file(dir, rank), entries,
                      {{"format", kFormat}, {"rank", std::to_string(rank)},
                       {"optimizer_step", std::to_string(optimizer_step_)}});
  }

  if (config_.zero.gather_16bit_weights_on_model_save) {
    // Every param whole, from the working shards every rank holds in memory.
    const std::uint64_t esize = element_bytes();
    std::vector<std::vector<std::byte>> whole(rank == 0 ? params_.size() : 0);
    std::vector<std::byte> gathered;
    for (std::size_t p = 0; p < params_.size(); ++p) {
      const Param& param = *params_[p];
      const std::uint64_t bytes = param.d.shard_elements * esize;
      gathered.resize(bytes * comm_.world_size());
      host_all_gather(working_partition_.data() + param.partition_offset * esize, gathered.data(), bytes);
      if (rank == 0) whole[p].assign(gathered.begin(), gathered.begin() + static_cast<std::ptrdiff_t>(param.d.elements * esize));
    }
    if (rank == 0) {
      std::vector<TensorToWrite> entries;
      for (std::size_t p = 0; p < params_.size(); ++p) {
        entries.push_back({params_[p]->d.name, safetensors_dtype(working_), params_[p]->d.shape, whole[p]});
      }
      write_safetensors(dir / kWeights, entries, {{"format", "pt"}, {"optimizer_step", std::to_string(optimizer_step_)}});
    }
  }
  comm_.barrier();  // every shard is on disk

  if (rank == 0) {
    json description;
    description["format"] = kFormat;
    description["version"] = kVersion;
    description["world_size"] = comm_.world_size();
    description["optimizer_step"] = optimizer_step_;
    description["precision"] = config::to_string(config_.training.precision);
    description["sub_group_size"] = config_.zero.sub_group_size;
    description["persistence_threshold"] = config_.zero.param_persistence_threshold;
    description["weights_16bit"] = config_.zero.gather_16bit_weights_on_model_save ? kWeights : "";
    json params = json::array();
    for (const auto& param : params_) {
      params.push_back({{"name", param->d.name}, {"shape", param->d.shape}, {"module", modules_[param->d.module]},
                        {"trainable", param->d.trainable}});
    }
    description["params"] = params;
    replace_file(dir / kDescription, description.dump(2) + "\n", true);
  }
  comm_.barrier();
  log().info("zero3: rank {} saved step {} to {}", rank, optimizer_step_, dir.string());
}

void Engine::load_checkpoint(const std::filesystem::path& dir) {
  require_finalized("load_checkpoint");
  drain();
  const std::filesystem::path description_path = dir / kDescription;
  std::ifstream in(description_path);
  if (!in) {
    ErrorContext ctx = ErrorContext::with_errno(errno);
    ctx.path = description_path.string();
    throw Error(ErrorKind::io,
                fmt::format("{}: cannot open ({}); a directory without it holds no complete checkpoint",
                            description_path.string(), errno_name(errno)),
                std::move(ctx));
  }
  json description;
  try {
    in >> description;
  } catch (const json::exception& error) {
    ErrorContext ctx;
    ctx.path = description_path.string();
    throw Error(ErrorKind::corrupt, fmt::format("{}: not JSON: {}", description_path.string(), error.what()),
                std::move(ctx));
  }
  std::int64_t step = 0;
  try {
    if (description.at("format") != kFormat || description.at("version") != kVersion) {
      mismatch(description_path, "not a zinf zero3 checkpoint of a version this build reads");
    }
    const int world = description.at("world_size").get<int>();
    if (world != comm_.world_size()) {
      mismatch(description_path, fmt::format("saved by {} ranks, loaded by {}: the sharded state only "
                                             "reloads at the same world size (the 16-bit weights file "
                                             "does at any)", world, comm_.world_size()));
    }
    if (description.at("sub_group_size").get<std::uint64_t>() != config_.zero.sub_group_size) {
      mismatch(description_path,
               fmt::format("saved with zero_optimization.sub_group_size {}, this run has {}",
                           description.at("sub_group_size").get<std::uint64_t>(), config_.zero.sub_group_size));
    }
    const json& params = description.at("params");
    if (params.size() != params_.size()) {
      mismatch(description_path, fmt::format("holds {} params, this model registered {}", params.size(),
                                             params_.size()));
    }
    for (std::size_t p = 0; p < params_.size(); ++p) {
      const auto name = params[p].at("name").get<std::string>();
      const auto shape = params[p].at("shape").get<std::vector<std::int64_t>>();
      if (name != params_[p]->d.name || shape != params_[p]->d.shape) {
        mismatch(description_path, fmt::format("param {} is '{}' {} in the checkpoint, '{}' {} here", p, name,
                                               json(shape).dump(), params_[p]->d.name, json(params_[p]->d.shape).dump()));
      }
      // The sharded optimizer state holds the trainable params only.
      const bool trainable = params[p].value("trainable", true);
      if (trainable != params_[p]->d.trainable) {
        mismatch(description_path,
                 fmt::format("param {} '{}' is {} in the checkpoint and {} here: the sharded state reloads with the "
                             "same params frozen (the 16-bit weights file reloads either way)",
                             p, name, trainable ? "trainable" : "frozen", params_[p]->d.trainable ? "trainable" : "frozen"));
      }
    }
    step = description.at("optimizer_step").get<std::int64_t>();
  } catch (const json::exception& error) {
    ErrorContext ctx;
    ctx.path = description_path.string();
    throw Error(ErrorKind::corrupt, fmt::format("{}: malformed: {}", description_path.string(), error.what()),
                std::move(ctx));
  }

  const int rank = comm_.rank();
  const auto states = swap::OptimizerSwapper::state_names(swap::optimizer_swapper_options(config_).optimizer.kind);
  const auto read_file_of_step = [step](const std::filesystem::path& path) {
    auto file = read_safetensors(path);
    if (file.metadata.count("optimizer_step") == 0 || file.metadata.at("optimizer_step") != std::to_string(step)) {
      ErrorContext ctx;
      ctx.path = file.path.string();
      throw Error(ErrorKind::corrupt, fmt::format("{}: not from step {} of this checkpoint", file.path.string(), step),
                  std::move(ctx));
    }
    return file;
  };
  std::uint64_t group_begin = 0;
  for (std::size_t g = 0; g < sub_groups_.size(); ++g) {
    const std::uint64_t n = sub_groups_[g].elements;
    const auto file = read_file_of_step(group_file(dir, rank, g));
    const auto read_floats = [&](const std::string& name) {
      const auto bytes = file.bytes(name, "F32", n * sizeof(float));
      std::vector<float> values(n);
      std::memcpy(values.data(), bytes.data(), bytes.size());
      return values;
    };
    const std::vector<float> master = read_floats("param");
    std::vector<std::vector<float>> state_values;
    std::vector<std::span<const float>> state_spans;
    for (const auto& state : states) state_values.push_back(read_floats(state));
    for (const auto& values : state_values) state_spans.emplace_back(values);
    optimizer_->initialize(g, master, step, state_spans);
    set_working(group_begin, master);
    group_begin += n;
  }
  if (optimizer_elements_ < partition_elements_) {
    const auto file = read_file_of_step(frozen_file(dir, rank));
    const std::uint64_t esize = element_bytes();
    for (std::size_t p = 0; p < params_.size(); ++p) {
      const Param& param = *params_[p];
      if (param.d.trainable) continue;
      const auto bytes = file.bytes(frozen_key(p, param.d.name), safetensors_dtype(working_),
                                    param.d.shard_elements * esize);
      std::memcpy(working_partition_.data() + param.partition_offset * esize, bytes.data(), bytes.size());
    }
  }
  optimizer_step_ = step;
  micro_step_ = step * static_cast<std::int64_t>(config_.training.gradient_accumulation_steps);
  std::fill(grad_partition_.begin(), grad_partition_.end(), 0.0f);
  release_all_unpersisted();
  place_shards();
  comm_.barrier();
  log().info("zero3: rank {} resumed at step {} from {}", rank, step, dir.string());
}

}  // namespace zinf::zero3

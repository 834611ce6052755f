// Engine::save_checkpoint / load_checkpoint.
//
// <dir>/zinf_checkpoint.json                  the description, written last
//                                             by rank 0: its presence marks
//                                             a complete checkpoint
// <dir>/zero3_rank<R>_group<G>.safetensors    rank R's sub-groups G, G+1, ...:
//                                             fp32 master params and optimizer
//                                             states. Consecutive sub-groups
//                                             share a file up to
//                                             kGroupFileElements (a file in
//                                             memory at a time bounds what a
//                                             save needs; thousands of small
//                                             sub-groups are not thousands of
//                                             files, each synced); a larger
//                                             one has its own file. In a file
//                                             of one sub-group the tensors are
//                                             "param", "exp_avg", ...; of
//                                             several, "<g>/param", ...
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

#include "zero3/checkpoint.hpp"

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
// Elements of consecutive sub-groups one file holds (checkpoints without
// "group_file_elements" in their description, written before, hold one
// sub-group a file: 0).
constexpr std::uint64_t kGroupFileElements = 4ull << 20;

// The files' sub-groups [begin, end), consecutive sub-groups together up
// to `budget` elements (each at least one; 0: one each).
std::vector<std::pair<std::size_t, std::size_t>> group_files(std::span<const std::uint64_t> elements,
                                                             std::uint64_t budget) {
  std::vector<std::pair<std::size_t, std::size_t>> files;
  for (std::size_t g = 0; g < elements.size();) {
    std::size_t end = g + 1;
    std::uint64_t total = elements[g];
    while (end < elements.size() && total + elements[end] <= budget) total += elements[end++];
    files.emplace_back(g, end);
    g = end;
  }
  return files;
}

std::vector<std::uint64_t> elements_of(std::span<const swap::SubGroup> groups) {
  std::vector<std::uint64_t> elements;
  for (const auto& group : groups) elements.push_back(group.elements);
  return elements;
}

// A sub-group's tensor in a file holding `count` sub-groups.
std::string group_tensor(std::size_t group, std::size_t count, const std::string& tensor) {
  return count == 1 ? tensor : fmt::format("{}/{}", group, tensor);
}

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

[[noreturn]] void corrupt(const std::filesystem::path& path, const std::string& what) {
  ErrorContext ctx;
  ctx.path = path.string();
  throw Error(ErrorKind::corrupt, fmt::format("{}: {}", path.string(), what), std::move(ctx));
}

// The description of the checkpoint in `dir`, of a format and version this
// build reads: its presence marks a complete checkpoint.
json read_description(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / kDescription;
  std::ifstream in(path);
  if (!in) {
    ErrorContext ctx = ErrorContext::with_errno(errno);
    ctx.path = path.string();
    throw Error(ErrorKind::io,
                fmt::format("{}: cannot open ({}); a directory without it holds no complete checkpoint",
                            path.string(), errno_name(errno)),
                std::move(ctx));
  }
  json description;
  try {
    in >> description;
  } catch (const json::exception& error) {
    corrupt(path, fmt::format("not JSON: {}", error.what()));
  }
  if (!description.is_object() || description.value("format", "") != kFormat ||
      description.value("version", 0) != kVersion) {
    mismatch(path, "not a zinf zero3 checkpoint of a version this build reads");
  }
  return description;
}

// A rank's file of the checkpoint of optimizer step `step`.
SafetensorsFile read_file_of_step(const std::filesystem::path& path, std::int64_t step) {
  SafetensorsFile file = read_safetensors(path);
  if (file.metadata.count("optimizer_step") == 0 || file.metadata.at("optimizer_step") != std::to_string(step)) {
    corrupt(file.path, fmt::format("not from step {} of this checkpoint", step));
  }
  return file;
}

}  // namespace

void Engine::save_checkpoint(const std::filesystem::path& dir) {
  require_finalized("save_checkpoint");
  drain();
  if (accumulated_micro_steps_ != 0) {
    throw Error(ErrorKind::invalid,
                fmt::format("save_checkpoint at micro-step {} is inside a gradient accumulation ({} micro-steps "
                            "accumulated): save after the step() that runs the optimizer",
                            micro_step_, accumulated_micro_steps_));
  }
  const int rank = comm_.rank();
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) throw_path_error("mkdir", dir.string(), error.value());
  if (rank == 0) std::filesystem::remove(dir / kDescription, error);
  comm_.barrier();  // nobody writes shards while an old description says "complete"

  const auto states = optimizer_state_names();
  std::vector<std::string> names{"param"};
  names.insert(names.end(), states.begin(), states.end());
  for (const auto& [first, end] : group_files(elements_of(sub_groups_), kGroupFileElements)) {
    std::vector<std::vector<float>> tensors;
    std::vector<TensorToWrite> entries;
    tensors.reserve((end - first) * names.size());  // entries point into it
    for (std::size_t g = first; g < end; ++g) {
      const std::uint64_t n = sub_groups_[g].elements;
      for (std::size_t t = 0; t < names.size(); ++t) {
        auto& values = tensors.emplace_back(n);
        if (t == 0) {
          optimizer_->read_params(g, values);
        } else {
          optimizer_->read_state(g, names[t], values);
        }
        entries.push_back({group_tensor(g, end - first, names[t]), "F32", {static_cast<std::int64_t>(n)},
                           as_bytes_of(values)});
      }
    }
    write_safetensors(group_file(dir, rank, first), entries,
                      {{"format", kFormat},
                       {"rank", std::to_string(rank)},
                       {"group", std::to_string(first)},
                       {"groups", std::to_string(end - first)},
                       {"optimizer_step", std::to_string(optimizer_->step_count())}});
  }

  if (optimizer_elements_ < partition_elements_) {
    const std::uint64_t esize = element_bytes();
    std::vector<TensorToWrite> entries;
    // In host memory the shards are written from where they are; from the
    // param store (params on NVMe) or the device they are read back for the
    // file (this rank's frozen partition, for the length of the save).
    std::vector<std::vector<std::byte>> stored;
    stored.reserve(params_.size());
    for (std::size_t p = 0; p < params_.size(); ++p) {
      const Param& param = *params_[p];
      if (param.d.trainable) continue;
      std::span<const std::byte> shard;
      if (!working_in_host()) {
        shard = stored.emplace_back(working_shard(param));
      } else {
        shard = std::span(working_partition_.data() + param.partition_offset * esize, param.d.shard_elements * esize);
      }
      entries.push_back({frozen_key(p, param.d.name), safetensors_dtype(working_),
                         {static_cast<std::int64_t>(param.d.shard_elements)}, shard});
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
      const std::vector<std::byte> shard = working_shard(param);
      host_all_gather(shard.data(), gathered.data(), bytes);
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
    description["group_file_elements"] = kGroupFileElements;
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

void Engine::load_checkpoint(const std::filesystem::path& dir, bool optimizer_states) {
  require_finalized("load_checkpoint");
  drain();
  options_.copier->wait(trainer_work());  // persistent params are rewritten in place: their readers finish first
  const std::filesystem::path description_path = dir / kDescription;
  const json description = read_description(dir);
  std::int64_t step = 0;
  std::uint64_t file_elements = 0;
  try {
    const int world = description.at("world_size").get<int>();
    if (world != comm_.world_size()) {
      mismatch(description_path, fmt::format("saved by {} ranks, loaded by {}: the sharded state only "
                                             "reloads at the same world size (the 16-bit weights file "
                                             "does at any)", world, comm_.world_size()));
    }
    if (description.at("sub_group_size").get<std::uint64_t>() != config_.zero.sub_group_size) {
      mismatch(description_path,
               fmt::format("saved with zero_optimization.sub_group_size {}, this run has {} (a configured 0 "
                           "runs as the largest trainable param's shard)",
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
    file_elements = description.value("group_file_elements", std::uint64_t{0});
  } catch (const json::exception& error) {
    corrupt(description_path, fmt::format("malformed: {}", error.what()));
  }

  const int rank = comm_.rank();
  const auto states = optimizer_state_names();
  std::uint64_t group_begin = 0;
  for (const auto& [first, end] : group_files(elements_of(sub_groups_), file_elements)) {
    const auto file = read_file_of_step(group_file(dir, rank, first), step);
    for (std::size_t g = first; g < end; ++g) {
      const std::uint64_t n = sub_groups_[g].elements;
      const auto read_floats = [&](const std::string& name) {
        const auto bytes = file.bytes(group_tensor(g, end - first, name), "F32", n * sizeof(float));
        std::vector<float> values(n);
        std::memcpy(values.data(), bytes.data(), bytes.size());
        return values;
      };
      const std::vector<float> master = read_floats("param");
      std::vector<std::vector<float>> state_values;
      std::vector<std::span<const float>> state_spans;
      if (optimizer_states) {
        for (const auto& state : states) state_values.push_back(read_floats(state));
        for (const auto& values : state_values) state_spans.emplace_back(values);
      }
      optimizer_->initialize(g, master, optimizer_states ? step : 0, state_spans);
      set_working(group_begin, master);
      group_begin += n;
    }
  }
  if (optimizer_elements_ < partition_elements_) {
    const auto file = read_file_of_step(frozen_file(dir, rank), step);
    const std::uint64_t esize = element_bytes();
    for (std::size_t p = 0; p < params_.size(); ++p) {
      const Param& param = *params_[p];
      if (param.d.trainable) continue;
      const auto bytes = file.bytes(frozen_key(p, param.d.name), safetensors_dtype(working_),
                                    param.d.shard_elements * esize);
      store_working(param.partition_offset, bytes);
    }
  }
  if (!optimizer_states) step = 0;  // a fresh optimizer over the loaded weights
  optimizer_step_ = step;
  micro_step_ = step * static_cast<std::int64_t>(config_.training.gradient_accumulation_steps);
  accumulated_micro_steps_ = 0;
  clear_gradients();
  release_all_unpersisted();
  place_shards();
  comm_.barrier();
  log().info("zero3: rank {} resumed at step {} from {}", rank, step, dir.string());
}

std::vector<ConsolidatedParam> consolidate_checkpoint(const std::filesystem::path& dir) {
  const std::filesystem::path description_path = dir / kDescription;
  const json description = read_description(dir);
  std::vector<ConsolidatedParam> out;
  int world = 0;
  std::uint64_t sub_group_size = 0;
  std::int64_t step = 0;
  std::uint64_t file_elements = 0;
  cpu_adam::DType working = cpu_adam::DType::f32;
  try {
    world = description.at("world_size").get<int>();
    sub_group_size = description.at("sub_group_size").get<std::uint64_t>();
    step = description.at("optimizer_step").get<std::int64_t>();
    file_elements = description.value("group_file_elements", std::uint64_t{0});
    const auto precision = description.at("precision").get<std::string>();
    if (precision != "fp32" && precision != "bf16" && precision != "fp16") {
      mismatch(description_path, fmt::format("precision '{}' is not fp32, bf16 or fp16", precision));
    }
    working = cpu_adam::parse_dtype(precision);
    for (const json& param : description.at("params")) {
      ConsolidatedParam p;
      p.name = param.at("name").get<std::string>();
      p.shape = param.at("shape").get<std::vector<std::int64_t>>();
      p.trainable = param.value("trainable", true);
      std::uint64_t elements = 1;
      for (const std::int64_t extent : p.shape) {
        if (extent <= 0) mismatch(description_path, fmt::format("param '{}' has a shape extent of {}", p.name, extent));
        elements *= static_cast<std::uint64_t>(extent);
      }
      p.values.assign(elements, 0.0f);
      out.push_back(std::move(p));
    }
    if (world < 1 || sub_group_size < 1) mismatch(description_path, "world_size and sub_group_size must be positive");
  } catch (const json::exception& error) {
    corrupt(description_path, fmt::format("malformed: {}", error.what()));
  }
  const auto shard_of = [world](const ConsolidatedParam& p) {
    return (p.values.size() + static_cast<std::uint64_t>(world) - 1) / static_cast<std::uint64_t>(world);
  };
  // Each rank's trainable partition is its trainable params' shards in
  // registration order, cut into sub-groups of sub_group_size elements.
  std::uint64_t trainable_elements = 0;
  bool any_frozen = false;
  for (const auto& p : out) {
    if (p.trainable) trainable_elements += shard_of(p);
    any_frozen = any_frozen || !p.trainable;
  }
  std::vector<std::uint64_t> group_elements;
  for (std::uint64_t begin = 0; begin < trainable_elements; begin += sub_group_size) {
    group_elements.push_back(std::min(sub_group_size, trainable_elements - begin));
  }
  const auto files = group_files(group_elements, file_elements);
  for (int rank = 0; rank < world; ++rank) {
    std::size_t param = 0;       // the trainable param being filled
    std::uint64_t in_param = 0;  // its shard elements filled so far
    const auto next_trainable = [&] {
      while (param < out.size() && !out[param].trainable) ++param;
    };
    next_trainable();
    // Sub-group values in partition order, into the params they shard.
    const auto fill = [&](const float* values, std::uint64_t n) {
      for (std::uint64_t i = 0; i < n;) {
        ConsolidatedParam& p = out[param];
        const std::uint64_t shard = shard_of(p);
        const std::uint64_t take = std::min(shard - in_param, n - i);
        // Rank r's shard holds elements [r * shard, (r + 1) * shard); past the end: padding.
        const std::uint64_t at = static_cast<std::uint64_t>(rank) * shard + in_param;
        for (std::uint64_t k = 0; k < take && at + k < p.values.size(); ++k) p.values[at + k] = values[i + k];
        i += take;
        in_param += take;
        if (in_param == shard) {
          in_param = 0;
          ++param;
          next_trainable();
        }
      }
    };
    for (const auto& [first, end] : files) {
      const auto file = read_file_of_step(group_file(dir, rank, first), step);
      for (std::size_t g = first; g < end; ++g) {
        const std::uint64_t n = group_elements[g];
        const auto bytes = file.bytes(group_tensor(g, end - first, "param"), "F32", n * sizeof(float));
        fill(reinterpret_cast<const float*>(bytes.data()), n);
      }
    }
    if (any_frozen) {
      const auto file = read_file_of_step(frozen_file(dir, rank), step);
      const std::uint64_t esize = working == cpu_adam::DType::f32 ? 4 : 2;
      for (std::size_t p = 0; p < out.size(); ++p) {
        ConsolidatedParam& frozen = out[p];
        if (frozen.trainable) continue;
        const std::uint64_t shard = shard_of(frozen);
        const auto bytes = file.bytes(frozen_key(p, frozen.name), safetensors_dtype(working), shard * esize);
        const std::uint64_t first = static_cast<std::uint64_t>(rank) * shard;
        for (std::uint64_t k = 0; k < shard && first + k < frozen.values.size(); ++k) {
          std::uint16_t half = 0;
          switch (working) {
            case cpu_adam::DType::f32: std::memcpy(&frozen.values[first + k], bytes.data() + k * 4, 4); break;
            case cpu_adam::DType::bf16:
              std::memcpy(&half, bytes.data() + k * 2, 2);
              frozen.values[first + k] = cpu_adam::bf16_to_float(half);
              break;
            case cpu_adam::DType::f16:
              std::memcpy(&half, bytes.data() + k * 2, 2);
              frozen.values[first + k] = cpu_adam::f16_to_float(half);
              break;
          }
        }
      }
    }
  }
  return out;
}

}  // namespace zinf::zero3

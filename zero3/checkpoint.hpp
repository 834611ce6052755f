// Reading a zero3 checkpoint without an engine (checkpoint.cpp writes it:
// Engine::save_checkpoint): every param whole in fp32, consolidated from
// every rank's shards, as DeepSpeed's zero_to_fp32 does for its own.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace zinf::zero3 {

struct ConsolidatedParam {
  std::string name;
  std::vector<std::int64_t> shape;
  bool trainable = true;      // false: a frozen param, widened from its working precision
  std::vector<float> values;  // the whole param, row-major
};

// The params of the complete checkpoint in `dir` (the directory holding
// zinf_checkpoint.json), in registration order: trainable ones from their
// fp32 masters, frozen ones from their working copies. One sub-group file
// is in memory at a time besides the result. Error{io} or Error{corrupt}
// naming the file when one is missing or does not match the description.
std::vector<ConsolidatedParam> consolidate_checkpoint(const std::filesystem::path& dir);

}  // namespace zinf::zero3

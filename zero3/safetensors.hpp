// Checkpoint files in the safetensors layout (a little-endian u64 header
// length, a JSON header naming each tensor's dtype, shape and byte range,
// then the raw data), so the weights zinf saves open with the safetensors
// library and the tools around it. zinf adds an XXH3-64 of the data section
// to the header's "__metadata__" ("zinf.xxh3") and checks it on read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace zinf::zero3 {

struct TensorToWrite {
  std::string name;
  std::string dtype;  // "F32", "BF16", "F16"
  std::vector<std::int64_t> shape;
  std::span<const std::byte> data;
};

// Written atomically (temporary file, rename); durable when `sync`.
void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata, bool sync = true);

struct SafetensorsFile {
  struct Tensor {
    std::string dtype;
    std::vector<std::int64_t> shape;
    std::uint64_t begin = 0;
    std::uint64_t end = 0;
  };
  std::filesystem::path path;
  std::map<std::string, std::string> metadata;
  std::map<std::string, Tensor> tensors;
  std::vector<std::byte> data;

  // The tensor's bytes; Error{corrupt} naming the file when it is missing
  // or not `dtype` with `bytes` bytes.
  std::span<const std::byte> bytes(const std::string& name, const std::string& dtype,
                                   std::uint64_t bytes) const;
};

// Error{io} naming the path when it cannot be read, Error{corrupt} when the
// header does not parse, a range falls outside the data, or the checksum
// does not match.
SafetensorsFile read_safetensors(const std::filesystem::path& path);

}  // namespace zinf::zero3

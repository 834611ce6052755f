#include "zero3/safetensors.hpp"

#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "core/atomic_file.hpp"
#include "core/error.hpp"

namespace zinf::zero3 {

using json = nlohmann::json;

namespace {

[[noreturn]] void corrupt(const std::filesystem::path& path, const std::string& what) {
  ErrorContext ctx;
  ctx.path = path.string();
  throw Error(ErrorKind::corrupt, fmt::format("{}: {}", path.string(), what), std::move(ctx));
}

}  // namespace

void write_safetensors(const std::filesystem::path& path, std::span<const TensorToWrite> tensors,
                       const std::map<std::string, std::string>& metadata, bool sync) {
  json header = json::object();
  std::uint64_t offset = 0;
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (const auto& tensor : tensors) {
    header[tensor.name] = {{"dtype", tensor.dtype},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + tensor.data.size()}}};
    offset += tensor.data.size();
    XXH3_64bits_update(state, tensor.data.data(), tensor.data.size());
  }
  const std::uint64_t checksum = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  json meta(metadata);
  meta["zinf.xxh3"] = fmt::format("{:016x}", checksum);
  header["__metadata__"] = meta;
  std::string text = header.dump();
  // The data section starts 8-byte aligned, as the format recommends.
  text.append((8 - text.size() % 8) % 8, ' ');
  std::byte length[8];
  const std::uint64_t size = text.size();
  for (int i = 0; i < 8; ++i) length[i] = static_cast<std::byte>((size >> (8 * i)) & 0xff);
  std::vector<std::span<const std::byte>> pieces;
  pieces.emplace_back(length, 8);
  pieces.emplace_back(reinterpret_cast<const std::byte*>(text.data()), text.size());
  for (const auto& tensor : tensors) pieces.push_back(tensor.data);
  replace_file(path, pieces, sync);
}

SafetensorsFile read_safetensors(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_path_error("open", path.string(), errno);
  SafetensorsFile file;
  file.path = path;
  unsigned char length[8];
  if (!in.read(reinterpret_cast<char*>(length), 8)) corrupt(path, "shorter than a safetensors header");
  std::uint64_t size = 0;
  for (int i = 7; i >= 0; --i) size = (size << 8) | length[i];
  const auto total = std::filesystem::file_size(path);
  if (size > total - 8 || size > (100u << 20)) corrupt(path, fmt::format("header length {} is impossible", size));
  std::string text(size, '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(size))) corrupt(path, "truncated header");
  json header;
  try {
    header = json::parse(text);
  } catch (const json::exception& error) {
    corrupt(path, fmt::format("header is not JSON: {}", error.what()));
  }
  if (!header.is_object()) corrupt(path, "header is not a JSON object");
  const std::uint64_t data_bytes = total - 8 - size;
  file.data.resize(data_bytes);
  if (data_bytes > 0 && !in.read(reinterpret_cast<char*>(file.data.data()), static_cast<std::streamsize>(data_bytes))) {
    corrupt(path, "truncated data");
  }
  try {
    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        for (const auto& [key, entry] : value.items()) file.metadata[key] = entry.get<std::string>();
        continue;
      }
      SafetensorsFile::Tensor tensor;
      tensor.dtype = value.at("dtype").get<std::string>();
      tensor.shape = value.at("shape").get<std::vector<std::int64_t>>();
      tensor.begin = value.at("data_offsets").at(0).get<std::uint64_t>();
      tensor.end = value.at("data_offsets").at(1).get<std::uint64_t>();
      if (tensor.begin > tensor.end || tensor.end > data_bytes) {
        corrupt(path, fmt::format("tensor '{}' spans bytes {}..{} of a {}-byte data section", name,
                                  tensor.begin, tensor.end, data_bytes));
      }
      file.tensors[name] = std::move(tensor);
    }
  } catch (const json::exception& error) {
    corrupt(path, fmt::format("malformed tensor entry: {}", error.what()));
  }
  if (const auto it = file.metadata.find("zinf.xxh3"); it != file.metadata.end()) {
    const std::string actual = fmt::format("{:016x}", XXH3_64bits(file.data.data(), file.data.size()));
    if (actual != it->second) {
      corrupt(path, fmt::format("data checksum {} does not match the header's {}", actual, it->second));
    }
  }
  return file;
}

std::span<const std::byte> SafetensorsFile::bytes(const std::string& name, const std::string& dtype,
                                                  std::uint64_t count) const {
  const auto it = tensors.find(name);
  if (it == tensors.end()) corrupt(path, fmt::format("tensor '{}' is missing", name));
  if (it->second.dtype != dtype || it->second.end - it->second.begin != count) {
    corrupt(path, fmt::format("tensor '{}' is {} bytes of {}, expected {} bytes of {}", name,
                              it->second.end - it->second.begin, it->second.dtype, count, dtype));
  }
  return std::span(data.data() + it->second.begin, count);
}

}  // namespace zinf::zero3

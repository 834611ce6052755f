// libFuzzer target: a swap directory's metadata files, which can be damaged
// or planted. ZINF_FUZZ_FILE selects which file takes the input: the
// manifest (zinf.manifest, next to a valid identity and a 1 MiB volume) or
// the store identity (zinf.store). Opening must succeed or throw
// zinf::Error, in bounded time, without a crash.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.hpp"
#include "core/log.hpp"
#include "swap/swap_store.hpp"

namespace {

std::filesystem::path scratch() {
  static const std::filesystem::path dir = [] {
    const char* base = std::getenv("ZINF_TEST_DIR");
    auto path = std::filesystem::path(base != nullptr ? base : "/var/tmp") / ("zinf-fuzz." + std::to_string(::getpid()));
    std::filesystem::create_directories(path);
    return path;
  }();
  return dir;
}

void write(const std::filesystem::path& path, const void* data, std::size_t size) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  zinf::log().set_level(spdlog::level::err);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const char* which = std::getenv("ZINF_FUZZ_FILE");
  const bool identity = which != nullptr && std::string(which) == "identity";
  const auto dir = scratch();
  std::filesystem::remove(dir / "zinf.manifest");
  if (identity) {
    write(dir / "zinf.store", data, size);
  } else {
    const std::string valid = R"({"store": "fuzz", "index": 0, "paths": 1})";
    write(dir / "zinf.store", valid.data(), valid.size());
    write(dir / "zinf.manifest", data, size);
  }
  {
    std::ofstream volume(dir / "zinf.volume", std::ios::binary | std::ios::app);
  }
  std::filesystem::resize_file(dir / "zinf.volume", 1 << 20);
  zinf::swap::SwapStoreOptions options;
  options.directories = {dir};
  options.sync = false;
  options.grow_bytes = 1 << 20;
  try {
    zinf::swap::SwapStore store(options);
  } catch (const zinf::Error&) {
  }
  return 0;
}

// libFuzzer target: safetensors checkpoints (16-bit model weights files
// users load and move around). Reading must return or throw zinf::Error.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/error.hpp"
#include "zero3/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::filesystem::path path = [] {
    const char* base = std::getenv("ZINF_TEST_DIR");
    return std::filesystem::path(base != nullptr ? base : "/var/tmp") /
           ("zinf-fuzz-safetensors." + std::to_string(::getpid()));
  }();
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    const auto file = zinf::zero3::read_safetensors(path);
    for (const auto& [name, tensor] : file.tensors) {
      try {
        (void)file.bytes(name, tensor.dtype, tensor.end - tensor.begin);
      } catch (const zinf::Error&) {
      }
    }
  } catch (const zinf::Error&) {
  }
  return 0;
}

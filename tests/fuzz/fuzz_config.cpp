// libFuzzer target: the DeepSpeed JSON parser (outside bytes: users'
// configs). Every input must give a ParseResult, never a crash, a hang or
// an escaped exception.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "core/config.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto result = zinf::config::parse_config(std::string_view(reinterpret_cast<const char*>(data), size));
  (void)result;
  return 0;
}

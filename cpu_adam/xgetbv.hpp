// XGETBV(0): which register states the OS saves (XCR0). Header-only so the
// freestanding emulator guest (tests/emulated) probes exactly as
// cpu_features.cpp does.
#pragma once

#include <cstdint>

namespace zinf::cpu_adam {

inline std::uint64_t xgetbv0() {
  std::uint32_t eax = 0;
  std::uint32_t edx = 0;
  // Encoded directly: the intrinsic needs -mxsave on the including file.
  __asm__ volatile(".byte 0x0f, 0x01, 0xd0" : "=a"(eax), "=d"(edx) : "c"(0));
  return (std::uint64_t{edx} << 32) | eax;
}

}  // namespace zinf::cpu_adam

// Byte units, alignment arithmetic and human-readable sizes. Names carry
// their unit last (offset_bytes, latency_us) across the code base.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace zinf {

inline constexpr std::uint64_t KiB = 1024;
inline constexpr std::uint64_t MiB = 1024 * KiB;
inline constexpr std::uint64_t GiB = 1024 * MiB;

constexpr bool is_power_of_two(std::uint64_t value) {
  return value != 0 && (value & (value - 1)) == 0;
}
constexpr std::uint64_t align_up(std::uint64_t value, std::uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}
constexpr std::uint64_t align_down(std::uint64_t value, std::uint64_t alignment) {
  return value / alignment * alignment;
}
constexpr bool is_aligned(std::uint64_t value, std::uint64_t alignment) {
  return value % alignment == 0;
}
inline bool is_aligned(const void* pointer, std::uint64_t alignment) {
  return reinterpret_cast<std::uintptr_t>(pointer) % alignment == 0;
}

// Parses "4096", "64K", "16M", "16MiB", "4g", "1.5G" (binary units,
// case-insensitive). Throws Error{invalid} naming the text on bad input.
std::uint64_t parse_bytes(std::string_view text);

// Parses element counts with decimal suffixes: "1000", "100k", "10M", "1.5G"
// or "7B", "1T" (1e3, 1e6, 1e9, 1e9, 1e12). Throws Error{invalid} naming the text on bad input.
std::uint64_t parse_count(std::string_view text);

// "512 B", "4 KiB", "1.5 GiB".
std::string format_bytes(std::uint64_t bytes);

}  // namespace zinf

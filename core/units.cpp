#include "core/units.hpp"

#include <cctype>
#include <charconv>
#include <cmath>
#include <string>

#include <fmt/format.h>

#include "core/error.hpp"

namespace zinf {

std::uint64_t parse_bytes(std::string_view text) {
  const auto bad = [&] {
    return Error(ErrorKind::invalid,
                 fmt::format("'{}' is not a byte size (examples: 4096, 64K, 16M, 4G)",
                             text));
  };
  std::string_view rest = text;
  while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.front()))) rest.remove_prefix(1);
  while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.back()))) rest.remove_suffix(1);
  std::size_t digits = 0;
  while (digits < rest.size() &&
         (std::isdigit(static_cast<unsigned char>(rest[digits])) || rest[digits] == '.')) {
    ++digits;
  }
  if (digits == 0) throw bad();
  double number = 0;
  const auto parsed = std::from_chars(rest.data(), rest.data() + digits, number);
  if (parsed.ec != std::errc() || parsed.ptr != rest.data() + digits || number < 0) throw bad();

  std::string suffix;
  for (char c : rest.substr(digits)) {
    if (!std::isspace(static_cast<unsigned char>(c))) suffix += static_cast<char>(std::tolower(c));
  }
  std::uint64_t scale = 1;
  if (suffix.empty() || suffix == "b") scale = 1;
  else if (suffix == "k" || suffix == "kb" || suffix == "kib") scale = KiB;
  else if (suffix == "m" || suffix == "mb" || suffix == "mib") scale = MiB;
  else if (suffix == "g" || suffix == "gb" || suffix == "gib") scale = GiB;
  else if (suffix == "t" || suffix == "tb" || suffix == "tib") scale = 1024 * GiB;
  else throw bad();

  const double bytes = number * static_cast<double>(scale);
  if (bytes != std::floor(bytes) || bytes > 1.8e19) throw bad();
  return static_cast<std::uint64_t>(bytes);
}

std::uint64_t parse_count(std::string_view text) {
  std::string_view rest = text;
  while (!rest.empty() && std::isspace(static_cast<unsigned char>(rest.back()))) rest.remove_suffix(1);
  double scale = 1;
  if (!rest.empty()) {
    switch (std::tolower(static_cast<unsigned char>(rest.back()))) {
      case 'k': scale = 1e3; break;
      case 'm': scale = 1e6; break;
      case 'g':
      case 'b': scale = 1e9; break;  // "7B" params, as model names say
      case 't': scale = 1e12; break;
      default: break;
    }
    if (scale != 1) rest.remove_suffix(1);
  }
  double number = 0;
  const auto parsed = std::from_chars(rest.data(), rest.data() + rest.size(), number);
  // "4.1G" is 4.1 x 1e9 in binary floating point: round what the suffix
  // scaled, but a plain count must be a whole number as written.
  double count = number * scale;
  if (scale != 1 && std::fabs(count - std::round(count)) < 1e-3) count = std::round(count);
  if (rest.empty() || parsed.ec != std::errc() || parsed.ptr != rest.data() + rest.size() ||
      count < 0 || count != std::floor(count) || count > 1e18) {
    throw Error(ErrorKind::invalid,
                fmt::format("'{}' is not a count (examples: 1000, 100k, 10M, 1G or 7B, 1T)", text));
  }
  return static_cast<std::uint64_t>(count);
}

std::string format_bytes(std::uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  if (unit == 0) return fmt::format("{} B", bytes);
  if (value == std::floor(value)) return fmt::format("{:.0f} {}", value, kUnits[unit]);
  return fmt::format("{:.1f} {}", value, kUnits[unit]);
}

}  // namespace zinf

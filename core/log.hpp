// Logging through spdlog with one named logger ("zinf"). The level comes
// from ZINF_LOG_LEVEL (trace, debug, info, warn, error, off; default info).
// log_once() is for facts worth saying once per process: a fallback taken,
// a capability missing.
#pragma once

#include <memory>
#include <string_view>

#include <spdlog/spdlog.h>

namespace zinf {

spdlog::logger& log();

// Logs `message` at `level` the first time `key` is seen in this process;
// returns whether it logged.
bool log_once(std::string_view key, spdlog::level::level_enum level,
              std::string_view message);

}  // namespace zinf

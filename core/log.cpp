#include "core/log.hpp"

#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

#include <spdlog/sinks/stdout_color_sinks.h>

namespace zinf {

spdlog::logger& log() {
  static std::shared_ptr<spdlog::logger> logger = [] {
    // stderr: stdout belongs to the tools' results (tables, JSON).
    auto created = spdlog::stderr_color_mt("zinf");
    created->set_pattern("[zinf %^%l%$] %v");
    const char* level = std::getenv("ZINF_LOG_LEVEL");
    created->set_level(level != nullptr ? spdlog::level::from_str(level)
                                        : spdlog::level::info);
    return created;
  }();
  return *logger;
}

bool log_once(std::string_view key, spdlog::level::level_enum level,
              std::string_view message) {
  static std::mutex mutex;
  static std::set<std::string, std::less<>> seen;
  {
    std::lock_guard lock(mutex);
    if (seen.contains(key)) return false;
    seen.emplace(key);
  }
  log().log(level, "{}", message);
  return true;
}

}  // namespace zinf

#include "core/error.hpp"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>

namespace zinf {

std::string_view to_string(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::config: return "config";
    case ErrorKind::invalid: return "invalid";
    case ErrorKind::io: return "io";
    case ErrorKind::no_space: return "no_space";
    case ErrorKind::alignment: return "alignment";
    case ErrorKind::unsupported: return "unsupported";
    case ErrorKind::resource: return "resource";
    case ErrorKind::timeout: return "timeout";
    case ErrorKind::cancelled: return "cancelled";
    case ErrorKind::corrupt: return "corrupt";
    case ErrorKind::in_use: return "in_use";
    case ErrorKind::comm: return "comm";
    case ErrorKind::internal: return "internal";
  }
  return "unknown";
}

namespace {

std::string with_context(const std::string& message, const ErrorContext& ctx) {
  // Context already spelled out by the message is not repeated; this only
  // adds the key path for config errors built without it.
  if (!ctx.key_path.empty() && message.find(ctx.key_path) == std::string::npos) {
    return fmt::format("{}: {}", ctx.key_path, message);
  }
  return message;
}

}  // namespace

Error::Error(ErrorKind kind, const std::string& message, ErrorContext context)
    : std::runtime_error(with_context(message, context)),
      kind_(kind),
      message_(message),
      context_(std::move(context)) {}

std::string errno_name(int error_number) {
  // strerrorname_np is glibc >= 2.32; it returns null for unknown values.
  const char* name = strerrorname_np(error_number);
  if (name != nullptr) return name;
  return fmt::format("errno {}", error_number);
}

ErrorKind kind_for_errno(int error_number) {
  switch (error_number) {
    case ENOSPC:
    case EDQUOT: return ErrorKind::no_space;
    case ENOMEM: return ErrorKind::resource;
    case EOPNOTSUPP:
    case ENOSYS: return ErrorKind::unsupported;
    default: return ErrorKind::io;
  }
}

Error io_error(std::string_view op, const std::string& path, std::uint64_t offset_bytes,
               std::uint64_t length_bytes, int error_number, std::string_view reason) {
  ErrorContext ctx;
  ctx.path = path;
  ctx.offset_bytes = offset_bytes;
  ctx.length_bytes = length_bytes;
  ctx.error_number = error_number;
  return Error(kind_for_errno(error_number),
               fmt::format("{} failed: {} offset {} length {}: {} ({})", op, path,
                           offset_bytes, length_bytes,
                           reason.empty() ? std::string_view(std::strerror(error_number)) : reason,
                           errno_name(error_number)),
               std::move(ctx));
}

void throw_io_error(std::string_view op, const std::string& path,
                    std::uint64_t offset_bytes, std::uint64_t length_bytes,
                    int error_number) {
  throw io_error(op, path, offset_bytes, length_bytes, error_number);
}

void throw_path_error(std::string_view op, const std::string& path,
                      int error_number) {
  ErrorContext ctx;
  ctx.path = path;
  ctx.error_number = error_number;
  throw Error(kind_for_errno(error_number),
              fmt::format("{} failed: {}: {} ({})", op, path,
                          std::strerror(error_number), errno_name(error_number)),
              std::move(ctx));
}

void abort_internal(const char* file, int line, const char* expr,
                    std::string_view message) noexcept {
  std::fprintf(stderr, "zinf internal error at %s:%d: %s (%.*s)\n", file, line,
               expr, static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
  std::abort();
}

}  // namespace zinf

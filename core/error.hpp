// One error vocabulary for the whole library. Every failure that reaches a
// caller is a zinf::Error with a kind (what went wrong, in a closed set) and
// the context needed to act on it: path, offset, length and errno for I/O,
// the JSON key path for configuration. The faces (CLI, bindings) map kinds
// to exit codes and exceptions; nothing below them prints.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace zinf {

enum class ErrorKind {
  config,       // bad configuration value or combination
  invalid,      // bad argument from the caller (contract violation)
  io,           // an I/O system call failed
  no_space,     // ENOSPC / EDQUOT, or a directory too full for the job
  alignment,    // an O_DIRECT request not aligned to the file's block size
  unsupported,  // the kernel, filesystem or sandbox lacks a capability
  resource,     // memory, pinned budget, memlock limit
  timeout,      // a wait ran past its deadline
  cancelled,    // the run was interrupted (Ctrl-C)
  corrupt,      // stored data or metadata fails its checksum or does not parse
  in_use,       // a swap directory is locked by another live run
  comm,         // a collective failed: a peer rank died or did not answer in time
  internal,     // a broken invariant inside zinf (a bug)
};

std::string_view to_string(ErrorKind kind);

struct ErrorContext {
  std::string path;
  std::optional<std::uint64_t> offset_bytes;
  std::optional<std::uint64_t> length_bytes;
  int error_number = 0;   // errno, 0 when not from a system call
  std::string key_path;   // config key path, e.g. "aio.block_size"

  static ErrorContext with_errno(int error_number) {
    ErrorContext context;
    context.error_number = error_number;
    return context;
  }
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message, ErrorContext context = {});

  ErrorKind kind() const noexcept { return kind_; }
  const ErrorContext& context() const noexcept { return context_; }
  int error_number() const noexcept { return context_.error_number; }
  // The message without the context suffix.
  const std::string& message() const noexcept { return message_; }

 private:
  ErrorKind kind_;
  std::string message_;
  ErrorContext context_;
};

// The symbolic name of an errno value ("EIO"), or "errno N" when unknown.
std::string errno_name(int error_number);

// ErrorKind for a failed system call: ENOSPC/EDQUOT are no_space, EINVAL on
// an O_DIRECT transfer is usually alignment, the rest are io.
ErrorKind kind_for_errno(int error_number);

// "<op> failed: <path> offset <o> length <l>: <reason> (<ENAME>)"; the
// reason defaults to strerror(errno).
Error io_error(std::string_view op, const std::string& path, std::uint64_t offset_bytes,
               std::uint64_t length_bytes, int error_number, std::string_view reason = {});

[[noreturn]] void throw_io_error(std::string_view op, const std::string& path,
                                 std::uint64_t offset_bytes,
                                 std::uint64_t length_bytes, int error_number);

// For calls with a path but no offset (open, fallocate, mkdir...).
[[noreturn]] void throw_path_error(std::string_view op, const std::string& path,
                                   int error_number);

[[noreturn]] void abort_internal(const char* file, int line, const char* expr,
                                 std::string_view message) noexcept;

}  // namespace zinf

// A broken invariant inside zinf: abort with file and line, even in release
// builds. Never used for bad input or a failed system call.
#define ZINF_ASSERT(expr, msg)                                         \
  do {                                                                 \
    if (!(expr)) [[unlikely]]                                          \
      ::zinf::abort_internal(__FILE__, __LINE__, #expr, (msg));        \
  } while (0)

// A contract check on caller input: throws Error{invalid}.
#define ZINF_CHECK(expr, msg)                                          \
  do {                                                                 \
    if (!(expr)) [[unlikely]]                                          \
      throw ::zinf::Error(::zinf::ErrorKind::invalid, (msg));          \
  } while (0)

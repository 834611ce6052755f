#include "aio/handle.hpp"

#include <exception>
#include <optional>

#include <fmt/format.h>

#include "core/error.hpp"

namespace zinf::aio {

struct Handle::Transfer {
  std::optional<File> direct;    // the O_DIRECT body
  std::optional<File> buffered;  // the tail, or everything when misaligned
  Ticket ticket;
};

Handle::Handle(const HandleOptions& options)
    : options_(options), engine_(make_engine(options.engine, options.aio)) {}

Handle::~Handle() {
  try {
    wait();
  } catch (...) {
    // Errors of transfers nobody waited for: the buffers are free, nothing
    // else to do in a destructor.
  }
}

std::unique_ptr<Handle::Transfer> Handle::start(Op op, std::byte* buffer, std::uint64_t bytes,
                                                const std::filesystem::path& path,
                                                std::uint64_t file_offset) {
  if (buffer == nullptr && bytes > 0) {
    throw Error(ErrorKind::invalid, fmt::format("{} of {}: null buffer", to_string(op), path.string()));
  }
  auto transfer = std::make_unique<Transfer>();
  const OpenMode mode = op == Op::read ? OpenMode::read_only : OpenMode::create;
  std::vector<Request> requests;
  std::uint64_t body = 0;
  if (options_.direct != DirectMode::off) {
    File file = File::open(path, mode, options_.direct);
    const std::uint64_t offset_alignment = file.offset_alignment();
    const bool aligned = file_offset % offset_alignment == 0 &&
                         reinterpret_cast<std::uintptr_t>(buffer) % file.memory_alignment() == 0;
    if (aligned) body = bytes / offset_alignment * offset_alignment;
    if (body > 0) {
      requests.push_back(Request{op, nullptr, file_offset, buffer, body});
      transfer->direct.emplace(std::move(file));
    } else if (!file.direct() && bytes > 0) {
      // The filesystem refused O_DIRECT: the file is already buffered.
      transfer->buffered.emplace(std::move(file));
    }
  }
  if (body < bytes) {
    if (!transfer->buffered) transfer->buffered.emplace(File::open(path, mode, DirectMode::off));
    requests.push_back(Request{op, nullptr, file_offset + body, buffer + body, bytes - body});
  }
  // Files are placed now that the optionals no longer move.
  std::size_t next = 0;
  if (body > 0) requests[next++].file = &*transfer->direct;
  if (body < bytes) requests[next++].file = &*transfer->buffered;
  if (!requests.empty()) transfer->ticket = engine_->submit(requests);
  return transfer;
}

void Handle::pread(std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
                   std::uint64_t file_offset) {
  auto transfer = start(Op::read, buffer, bytes, path, file_offset);
  if (transfer->ticket.valid()) engine_->wait(transfer->ticket);
}

void Handle::pwrite(const std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
                    std::uint64_t file_offset) {
  auto transfer = start(Op::write, const_cast<std::byte*>(buffer), bytes, path, file_offset);
  if (transfer->ticket.valid()) engine_->wait(transfer->ticket);
}

void Handle::async_pread(std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
                         std::uint64_t file_offset) {
  auto transfer = start(Op::read, buffer, bytes, path, file_offset);
  std::lock_guard lock(mutex_);
  queued_.push_back(std::move(transfer));
}

void Handle::async_pwrite(const std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
                          std::uint64_t file_offset) {
  auto transfer = start(Op::write, const_cast<std::byte*>(buffer), bytes, path, file_offset);
  std::lock_guard lock(mutex_);
  queued_.push_back(std::move(transfer));
}

std::uint64_t Handle::wait() {
  std::vector<std::unique_ptr<Transfer>> transfers;
  {
    std::lock_guard lock(mutex_);
    transfers.swap(queued_);
  }
  std::exception_ptr first;
  for (auto& transfer : transfers) {
    if (!transfer->ticket.valid()) continue;
    try {
      engine_->wait(transfer->ticket);
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
  return transfers.size();
}

std::size_t Handle::pending() const {
  std::lock_guard lock(mutex_);
  return queued_.size();
}

}  // namespace zinf::aio

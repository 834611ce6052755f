// DeepSpeed's aio_handle, on zinf's engine: whole-buffer reads and writes of
// named files at a file offset, synchronous or queued until wait(), for any
// buffer address and any length. The O_DIRECT-aligned body of a transfer
// goes through the engine on an O_DIRECT file; a tail shorter than the
// file's alignment, or a whole transfer from a misaligned buffer or offset,
// goes through the same engine on a buffered descriptor of the same file, so
// a tensor of any size round-trips exactly (DeepSpeed's "buffer nbytes !=
// file bytes" failure). Errors are thrown with path, offset, length and
// errno; a queued transfer's error is thrown by wait(), after every queued
// transfer has finished, so no buffer is still in use.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <vector>

#include "aio/engine.hpp"
#include "aio/file.hpp"

namespace zinf::aio {

struct HandleOptions {
  AioOptions aio;
  EngineKind engine = EngineKind::automatic;
  DirectMode direct = DirectMode::prefer;
};

class Handle {
 public:
  explicit Handle(const HandleOptions& options);
  ~Handle();  // waits for queued transfers, ignoring their errors
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  // Synchronous: done (or thrown) when they return.
  void pread(std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
             std::uint64_t file_offset = 0);
  void pwrite(const std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
              std::uint64_t file_offset = 0);
  // Queued: the buffer must stay valid until wait(). A file to write is
  // created (0600) if missing, never truncated.
  void async_pread(std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
                   std::uint64_t file_offset = 0);
  void async_pwrite(const std::byte* buffer, std::uint64_t bytes, const std::filesystem::path& path,
                    std::uint64_t file_offset = 0);
  // Waits for every queued transfer; returns how many there were. Throws the
  // first error (after all of them finished).
  std::uint64_t wait();
  std::size_t pending() const;

  const AioOptions& options() const { return options_.aio; }
  std::string_view engine_name() const { return engine_->name(); }

 private:
  struct Transfer;
  std::unique_ptr<Transfer> start(Op op, std::byte* buffer, std::uint64_t bytes,
                                  const std::filesystem::path& path, std::uint64_t file_offset);

  HandleOptions options_;
  std::unique_ptr<Engine> engine_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Transfer>> queued_;
};

}  // namespace zinf::aio

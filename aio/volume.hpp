// A volume is one logical byte space striped over one or more directories
// (DeepSpeed's nvme_path, here also a list): stripe k lives in directory
// k mod n, so n NVMe drives are used at once without RAID. Each directory
// has its own file and its own engine, i.e. its own queue. The stripe size
// is a multiple of the engine's block_size so pieces never straddle drives.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "aio/engine.hpp"
#include "aio/file.hpp"

namespace zinf::aio {

struct VolumeTicket {
  std::vector<std::pair<std::size_t, Ticket>> parts;  // (path index, ticket)
};

struct VolumeOptions {
  std::vector<std::filesystem::path> directories;
  std::string file_name = "zinf.volume";
  std::uint64_t stripe_bytes = 0;  // 0: the engine's block_size
  DirectMode direct = DirectMode::prefer;
  OpenMode open_mode = OpenMode::create;
};

class Volume {
 public:
  using EngineFactory = std::function<std::unique_ptr<Engine>(std::size_t path_index)>;

  // Opens (creating if asked) one file per directory and one engine per file.
  Volume(const VolumeOptions& options, const EngineFactory& make_engine);
  ~Volume();
  Volume(const Volume&) = delete;
  Volume& operator=(const Volume&) = delete;

  // Preallocates every file for a logical size of `bytes`.
  void reserve(std::uint64_t bytes);
  // fdatasync on every member file: what was written is on the disk.
  void sync_data();

  VolumeTicket submit(Op op, std::uint64_t offset_bytes, std::byte* buffer,
                      std::uint64_t length_bytes);
  // Waits for every part; throws the first error after all parts are done.
  std::uint64_t wait(const VolumeTicket& ticket);

  void register_buffers(std::span<const MemoryRegion> regions);
  void unregister_buffers();

  std::size_t path_count() const { return files_.size(); }
  std::uint64_t stripe_bytes() const { return stripe_bytes_; }
  // The largest alignment any member file needs.
  std::uint32_t alignment() const { return alignment_; }
  const File& file(std::size_t index) const { return files_[index]; }
  Engine& engine(std::size_t index) { return *engines_[index]; }

  // Where a logical offset lives: (path index, offset in that path's file).
  std::pair<std::size_t, std::uint64_t> locate(std::uint64_t logical_offset) const;
  // Bytes of writes submitted to path `index`'s file since the volume
  // opened (what the drive behind it is asked to write: its wear).
  std::uint64_t bytes_written(std::size_t index) const { return written_[index].load(std::memory_order_relaxed); }

 private:
  std::unique_ptr<std::atomic<std::uint64_t>[]> written_;
  std::vector<File> files_;
  std::vector<std::unique_ptr<Engine>> engines_;
  std::uint64_t stripe_bytes_ = 0;
  std::uint32_t alignment_ = 1;
};

}  // namespace zinf::aio

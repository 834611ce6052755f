// The swap store: tensors kept on NVMe under stable caller-given keys
// ("layers.3.mlp.weight/exp_avg"), each in one extent of a volume striped
// over the nvme_path directories. The store owns layout and padding: it
// rounds every extent to the O_DIRECT alignment, reuses freed space, keeps an
// xxHash (XXH3-64) of every extent's payload and verifies it on every read,
// and describes itself in a manifest so a later run finds every tensor.
//
// Durability is copy-on-write: a write never overwrites the extent a key
// currently names. It goes to free space, and only when it has completed does
// the key move to the new extent; the old one is freed at the next commit().
// commit() makes the data durable (fdatasync), writes the manifest atomically
// (write a temporary, fsync, rename, fsync the directory) and only then lets
// freed extents be reused. So at every instant the last committed manifest
// names extents that nothing has overwritten: a crash, a kill, an EIO or a
// full disk during a write leaves the previous copy of every key readable.
// Extents written after the last commit are unreferenced on reopen and
// become free space again.
//
// Each directory holds zinf.volume (its stripe of the data), zinf.lock and
// zinf.store (which store it belongs to, at which position); the first also
// holds zinf.manifest. The lock (flock, held while the store
// is open) stops two live runs from sharing a directory.
//
// Thread safety: every method may be called from any thread; one ticket is
// waited on once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "aio/engine.hpp"
#include "aio/file.hpp"
#include "aio/volume.hpp"

namespace zinf::swap {

struct SwapStoreOptions {
  std::vector<std::filesystem::path> directories;  // nvme_path (one or more)
  aio::AioOptions aio;
  aio::EngineKind engine = aio::EngineKind::automatic;
  aio::DirectMode direct = aio::DirectMode::prefer;
  std::uint64_t stripe_bytes = 0;            // 0: aio.block_size
  std::uint64_t grow_bytes = 256ull << 20;   // preallocation step of the volume files
  // commit() flushes data and manifest to the disk (fdatasync, fsync), so a
  // power loss or kernel crash also finds the last committed state. false
  // keeps the atomic rename but skips the flushes: still safe against a
  // killed or crashed process (the kernel holds every finished write), not
  // against power loss, and much faster where flushes are slow.
  bool sync = true;
};

// Where a key's bytes are and what they must hash to.
struct ExtentInfo {
  std::uint64_t offset_bytes = 0;  // logical offset in the volume
  std::uint64_t size_bytes = 0;    // payload
  std::uint64_t padded_bytes = 0;  // on disk, a multiple of alignment()
  std::uint64_t checksum = 0;      // XXH3-64 of the payload
  std::int64_t version = 0;        // the caller's tag (an optimizer step, say)
};

struct SwapStoreStats {
  std::uint64_t keys = 0;
  std::uint64_t live_bytes = 0;          // padded bytes named by keys
  std::uint64_t volume_bytes = 0;        // logical high-water mark of the volume
  std::uint64_t free_bytes = 0;          // reusable now, below the high-water mark
  std::uint64_t pending_free_bytes = 0;  // freed, reusable after the next commit
  std::uint64_t commits = 0;
  // Write accounting (what the drives are asked to write, their wear):
  // bytes submitted to each directory's file since this store opened, in
  // the order of the directories, and the running total over every run on
  // this store (the manifest keeps it; commit() updates it).
  std::vector<std::uint64_t> written_bytes;
  std::uint64_t written_total = 0;
  // Bytes submitted for reads since this store opened (padded).
  std::uint64_t read_bytes = 0;
};

struct SwapTicket {
  std::uint64_t id = 0;
  bool valid() const { return id != 0; }
};

class SwapStore {
 public:
  // Opens (creating missing directories and files) and locks every
  // directory, and loads the manifest when there is one. Throws
  // Error{in_use} when another live run holds a directory, Error{corrupt}
  // when the manifest does not parse or does not match the volume.
  explicit SwapStore(const SwapStoreOptions& options);
  // The same with the caller's engines (tests inject faults through it).
  SwapStore(const SwapStoreOptions& options, const aio::Volume::EngineFactory& make_engine);
  // Waits out any I/O still in flight. Does not commit: what was not
  // committed is not described by the manifest.
  ~SwapStore();
  SwapStore(const SwapStore&) = delete;
  SwapStore& operator=(const SwapStore&) = delete;

  // Buffers handed to read() and write() must start at a multiple of
  // alignment() and hold padded_size(bytes).
  std::uint64_t alignment() const { return alignment_; }
  std::uint64_t padded_size(std::uint64_t bytes) const;

  // Starts writing `bytes` bytes from `buffer` as the new content of `key`.
  // The buffer's bytes past `bytes` (padding, up to padded_size) are zeroed;
  // the buffer must stay untouched until wait(). Throws before anything is
  // queued for a bad buffer (Error{invalid}/{alignment}), a second write of
  // a key already being written, or a volume that cannot grow
  // (Error{no_space}).
  SwapTicket write(std::string_view key, std::span<std::byte> buffer, std::uint64_t bytes,
                   std::int64_t version = 0);
  // Starts reading `key` into `buffer` (at least padded_size of its size).
  // Throws Error{invalid} naming the key when it is unknown.
  SwapTicket read(std::string_view key, std::span<std::byte> buffer);
  // Waits for one ticket. A finished write makes the key name the new
  // extent; a failed one leaves the key on its previous content and throws
  // the I/O error (path, offset, errno) with the key named. A read returns
  // the payload size after checking its checksum: a mismatch throws
  // Error{corrupt} naming key, file and offset.
  std::uint64_t wait(SwapTicket ticket);

  // Synchronous forms of the two.
  void write_sync(std::string_view key, std::span<std::byte> buffer, std::uint64_t bytes,
                  std::int64_t version = 0);
  std::uint64_t read_sync(std::string_view key, std::span<std::byte> buffer);

  // Forgets `key`; its extent is reusable after the next commit.
  void remove(std::string_view key);
  // Forgets every key and attribute (but the running count of bytes
  // written): an engine starting a run afresh over what an earlier run
  // left. The space is reusable after the next commit.
  void clear();
  // Undoes what finished writes and removes did to `key` since the last
  // commit: the key names what the manifest says again (or nothing). For
  // callers that must not commit half of a group of tensors.
  void revert(std::string_view key);
  std::optional<ExtentInfo> find(std::string_view key) const;
  std::vector<std::string> keys() const;

  // Free-form attributes kept in the manifest (the optimizer swapper records
  // its step here); written by the next commit.
  void set_attribute(std::string_view name, std::string_view value);
  std::optional<std::string> attribute(std::string_view name) const;

  // Makes every finished write durable and describes the store in the
  // manifest, atomically; then recycles extents freed before it. Writes
  // still in flight are not included (their keys keep the previous extent
  // in the manifest).
  void commit();
  // commit() once the writes finished since the last commit add up to at
  // least `written_bytes` (padded), else nothing; returns whether it
  // committed. For callers that would commit after each of many small
  // writes, where a commit's fixed cost (the manifest, the flushes) would
  // outweigh the writes. What it bounds: the work a crash loses, and the
  // disk space superseded extents hold until the next commit. 0 always
  // commits.
  bool commit_after(std::uint64_t written_bytes);

  // The volume's engines use `regions` as registered buffers (io_uring).
  void register_buffers(std::span<const aio::MemoryRegion> regions);
  void unregister_buffers();

  SwapStoreStats stats() const;
  const std::filesystem::path& manifest_path() const { return manifest_path_; }
  aio::Volume& volume() { return *volume_; }
  std::size_t in_flight() const;

 private:
  struct Operation;
  struct Extent {
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
  };

  void lock_directories(const std::vector<std::filesystem::path>& directories);
  void check_identity(const std::vector<std::filesystem::path>& directories);
  void load_manifest(const SwapStoreOptions& options);
  std::string manifest_text() const;
  Extent allocate(std::uint64_t length);  // under mutex_
  void release(Extent extent);           // under mutex_
  void recycle(const std::vector<Extent>& extents);  // under mutex_
  std::string files_at(std::uint64_t offset, std::uint64_t length) const;

  std::uint64_t written_since_open() const;

  std::vector<int> lock_fds_;
  std::uint64_t written_before_ = 0;  // the manifest's running total when this store opened
  std::uint64_t read_bytes_ = 0;
  std::unique_ptr<aio::Volume> volume_;
  std::filesystem::path manifest_path_;
  std::uint64_t alignment_ = 4096;
  std::uint64_t grow_bytes_ = 0;
  bool sync_ = true;

  mutable std::mutex mutex_;
  std::map<std::string, ExtentInfo, std::less<>> entries_;
  std::map<std::string, ExtentInfo, std::less<>> committed_;  // what the manifest names
  std::string sync_error_;  // a failed flush: no later commit may claim its data
  std::map<std::string, std::string, std::less<>> attributes_;
  std::map<std::uint64_t, std::uint64_t> free_;  // offset -> length, coalesced
  std::vector<Extent> pending_free_;
  std::uint64_t written_since_commit_ = 0;  // padded bytes of writes finished since the last commit
  std::multiset<std::uint64_t> reads_in_flight_;  // extent offsets being read
  std::set<std::string, std::less<>> writes_in_flight_;
  std::unordered_map<std::uint64_t, std::unique_ptr<Operation>> operations_;
  std::uint64_t next_ticket_ = 1;
  std::uint64_t end_ = 0;       // logical high-water mark
  std::uint64_t reserved_ = 0;  // preallocated logical bytes
  std::uint64_t generation_ = 0;
  std::uint64_t commits_ = 0;
  std::mutex commit_mutex_;     // one commit at a time
};

}  // namespace zinf::swap

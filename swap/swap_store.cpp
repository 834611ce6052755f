#include "swap/swap_store.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <xxhash.h>

#include "core/atomic_file.hpp"
#include "core/error.hpp"
#include "core/log.hpp"
#include "core/units.hpp"

namespace zinf::swap {
namespace {

// The manifest attribute holding the bytes written over every run.
constexpr const char* kWrittenAttribute = "zinf.bytes_written";

constexpr const char* kManifestName = "zinf.manifest";
constexpr const char* kLockName = "zinf.lock";
constexpr const char* kVolumeName = "zinf.volume";
constexpr const char* kIdentityName = "zinf.store";
constexpr const char* kFormat = "zinf-swap-manifest";
constexpr int kFormatVersion = 1;

std::string hex64(std::uint64_t value) { return fmt::format("{:016x}", value); }

Error corrupt(const std::filesystem::path& path, const std::string& message) {
  ErrorContext context;
  context.path = path.string();
  return Error(ErrorKind::corrupt, fmt::format("{}: {}", path.string(), message),
               std::move(context));
}

// The same error with the key in its message, kind and context kept.
Error with_key(const Error& error, std::string_view what, std::string_view key) {
  return Error(error.kind(), fmt::format("{} of key '{}' failed: {}", what, key, error.message()),
               error.context());
}

}  // namespace

struct SwapStore::Operation {
  aio::Op op = aio::Op::read;
  std::string key;
  ExtentInfo extent;  // for a write: the new extent; for a read: the one read
  std::byte* buffer = nullptr;
  aio::VolumeTicket ticket;
};

SwapStore::SwapStore(const SwapStoreOptions& options)
    : SwapStore(options, [&options](std::size_t) {
        return aio::make_engine(options.engine, options.aio);
      }) {}

SwapStore::SwapStore(const SwapStoreOptions& options,
                     const aio::Volume::EngineFactory& make_engine)
    : grow_bytes_(options.grow_bytes), sync_(options.sync) {
  if (options.directories.empty()) {
    throw Error(ErrorKind::config, "a swap store needs at least one directory (nvme_path)");
  }
  for (const auto& directory : options.directories) {
    std::error_code error;
    if (!std::filesystem::exists(directory, error)) {
      std::filesystem::create_directories(directory, error);
      if (error) throw_path_error("create directory", directory.string(), error.value());
      log_once("swap-mkdir:" + directory.string(), spdlog::level::info,
               fmt::format("created swap directory {}", directory.string()));
    } else if (!std::filesystem::is_directory(directory, error)) {
      throw_path_error("open directory", directory.string(), ENOTDIR);
    }
  }
  try {
    lock_directories(options.directories);
    aio::VolumeOptions volume_options;
    volume_options.directories = options.directories;
    volume_options.file_name = kVolumeName;
    volume_options.stripe_bytes = options.stripe_bytes;
    volume_options.direct = options.direct;
    volume_options.open_mode = aio::OpenMode::create;
    volume_ = std::make_unique<aio::Volume>(volume_options, make_engine);
    alignment_ = std::max<std::uint64_t>(4096, volume_->alignment());
    manifest_path_ = options.directories.front() / kManifestName;
    check_identity(options.directories);
    load_manifest(options);
    if (const auto it = attributes_.find(kWrittenAttribute); it != attributes_.end()) {
      // A damaged count must not stop the run: the store's data is intact.
      std::uint64_t total = 0;
      const auto parsed = std::from_chars(it->second.data(), it->second.data() + it->second.size(), total);
      if (parsed.ec == std::errc() && parsed.ptr == it->second.data() + it->second.size()) written_before_ = total;
    }
  } catch (...) {
    volume_.reset();
    for (const int fd : lock_fds_) ::close(fd);
    lock_fds_.clear();
    throw;
  }
}

SwapStore::~SwapStore() {
  // The volume waits out unwaited tickets before closing its files.
  volume_.reset();
  for (const int fd : lock_fds_) ::close(fd);
}

void SwapStore::lock_directories(const std::vector<std::filesystem::path>& directories) {
  for (const auto& directory : directories) {
    const std::filesystem::path path = directory / kLockName;
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (fd < 0) throw_path_error("open", path.string(), errno);
    lock_fds_.push_back(fd);
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int error = errno;
      if (error != EWOULDBLOCK) throw_path_error("flock", path.string(), error);
      char holder[32] = {};
      const ssize_t n = ::pread(fd, holder, sizeof holder - 1, 0);
      std::string pid = n > 0 ? std::string(holder, static_cast<std::size_t>(n)) : "unknown";
      pid.erase(pid.find_last_not_of(" \n") + 1);
      ErrorContext context;
      context.path = directory.string();
      context.error_number = error;
      throw Error(ErrorKind::in_use,
                  fmt::format("swap directory {} is in use by another zinf run (pid {}): two "
                              "runs must not share an nvme_path; give each its own directory",
                              directory.string(), pid),
                  std::move(context));
    }
    const std::string pid = fmt::format("{}\n", ::getpid());
    if (::ftruncate(fd, 0) != 0 ||
        ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
      throw_path_error("write", path.string(), errno);
    }
  }
}

void SwapStore::check_identity(const std::vector<std::filesystem::path>& directories) {
  // Each directory says which store it belongs to and at which position,
  // so a reordered or mixed nvme_path list is refused instead of opening
  // as an empty store (the manifest lives in the first directory only).
  std::string id;
  std::vector<bool> missing(directories.size(), false);
  for (std::size_t i = 0; i < directories.size(); ++i) {
    const auto path = directories[i] / kIdentityName;
    std::ifstream in(path);
    if (!in) {
      missing[i] = true;
      continue;
    }
    std::string this_id;
    std::size_t index = 0;
    std::size_t paths = 0;
    try {
      const nlohmann::json identity = nlohmann::json::parse(in);
      this_id = identity.at("store").get<std::string>();
      index = identity.at("index").get<std::size_t>();
      paths = identity.at("paths").get<std::size_t>();
    } catch (const nlohmann::json::exception& error) {
      throw corrupt(path, fmt::format("the store identity does not parse: {}", error.what()));
    }
    if ((!id.empty() && this_id != id) || index != i || paths != directories.size()) {
      ErrorContext context;
      context.path = directories[i].string();
      throw Error(ErrorKind::config,
                  fmt::format("{} is path {} of {} of a swap store, not path {} of {}: open the "
                              "store with the same nvme_path list, in the same order",
                              directories[i].string(), index + 1, paths, i + 1, directories.size()),
                  std::move(context));
    }
    id = this_id;
  }
  if (id.empty()) {
    std::random_device random;
    id = fmt::format("{:08x}{:08x}", random(), random());
  }
  for (std::size_t i = 0; i < directories.size(); ++i) {
    if (!missing[i]) continue;
    const nlohmann::json identity = {{"store", id}, {"index", i}, {"paths", directories.size()}};
    replace_file(directories[i] / kIdentityName, identity.dump() + "\n", true);
  }
}

void SwapStore::load_manifest(const SwapStoreOptions& options) {
  std::error_code exists_error;
  if (!std::filesystem::exists(manifest_path_, exists_error)) return;
  std::ifstream in(manifest_path_, std::ios::binary);
  if (!in) throw_path_error("open", manifest_path_.string(), errno);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::exception& error) {
    throw corrupt(manifest_path_, fmt::format("the manifest does not parse: {}", error.what()));
  }
  try {
    if (manifest.value("format", "") != kFormat) {
      throw corrupt(manifest_path_, "not a zinf swap manifest");
    }
    const int format_version = manifest.at("format_version").get<int>();
    if (format_version != kFormatVersion) {
      throw corrupt(manifest_path_, fmt::format("manifest format {} is not supported (this "
                                                "zinf reads format {})",
                                                format_version, kFormatVersion));
    }
    const auto& volume = manifest.at("volume");
    const auto paths = volume.at("paths").get<std::size_t>();
    const auto stripe = volume.at("stripe_bytes").get<std::uint64_t>();
    const auto alignment = volume.at("alignment").get<std::uint64_t>();
    if (paths != options.directories.size() || stripe != volume_->stripe_bytes()) {
      throw Error(ErrorKind::config,
                  fmt::format("{} was written for {} nvme_path(s) striped every {}; this run "
                              "has {} striped every {}: open it with the same nvme_path list "
                              "and aio.block_size",
                              manifest_path_.string(), paths, format_bytes(stripe),
                              options.directories.size(), format_bytes(volume_->stripe_bytes())));
    }
    if (alignment % alignment_ != 0) {
      throw corrupt(manifest_path_,
                    fmt::format("extents are aligned to {} but these files need {}", alignment,
                                alignment_));
    }
    generation_ = manifest.at("generation").get<std::uint64_t>();
    for (const auto& [name, value] : manifest.at("attributes").items()) {
      attributes_[name] = value.get<std::string>();
    }
    std::map<std::uint64_t, std::pair<std::uint64_t, std::string>> by_offset;
    for (const auto& [key, value] : manifest.at("entries").items()) {
      ExtentInfo info;
      info.offset_bytes = value.at("offset").get<std::uint64_t>();
      info.size_bytes = value.at("size").get<std::uint64_t>();
      info.padded_bytes = value.at("padded").get<std::uint64_t>();
      const std::string hex = value.at("xxh3").get<std::string>();
      const auto parsed = std::from_chars(hex.data(), hex.data() + hex.size(), info.checksum, 16);
      if (hex.empty() || parsed.ec != std::errc() || parsed.ptr != hex.data() + hex.size()) {
        throw corrupt(manifest_path_, fmt::format("entry '{}' has checksum '{}', not 16 hex digits",
                                                  key, hex));
      }
      info.version = value.at("version").get<std::int64_t>();
      if (info.offset_bytes % alignment_ != 0 || info.padded_bytes % alignment_ != 0 ||
          info.padded_bytes < info.size_bytes || info.padded_bytes == 0 ||
          info.offset_bytes + info.padded_bytes < info.offset_bytes) {
        throw corrupt(manifest_path_, fmt::format("entry '{}' has an impossible extent "
                                                  "(offset {}, size {}, padded {})",
                                                  key, info.offset_bytes, info.size_bytes,
                                                  info.padded_bytes));
      }
      if (!by_offset.try_emplace(info.offset_bytes, info.padded_bytes, key).second) {
        throw corrupt(manifest_path_, fmt::format("entries '{}' and '{}' share offset {}", key,
                                                  by_offset.at(info.offset_bytes).second,
                                                  info.offset_bytes));
      }
      entries_[key] = info;
    }
    // Rebuild the free space as everything the entries do not cover.
    std::uint64_t cursor = 0;
    for (const auto& [offset, extent] : by_offset) {
      if (offset < cursor) {
        throw corrupt(manifest_path_, fmt::format("entry '{}' overlaps another", extent.second));
      }
      if (offset > cursor) free_[cursor] = offset - cursor;
      cursor = offset + extent.first;
    }
    end_ = cursor;
  } catch (const nlohmann::json::exception& error) {
    throw corrupt(manifest_path_, fmt::format("the manifest is incomplete: {}", error.what()));
  }
  // Every extent must lie inside the files: a truncated volume file would
  // otherwise read as zeros and fail only as a checksum mismatch. Only the
  // extent's last stripes decide how far it reaches on each path, so a
  // hostile "padded": 2^60 costs a few steps, not a walk over 2^40 stripes.
  const std::uint64_t paths = volume_->path_count();
  const std::uint64_t stripe = volume_->stripe_bytes();
  std::vector<std::uint64_t> needed(paths, 0);
  for (const auto& [key, info] : entries_) {
    const std::uint64_t last = info.offset_bytes + info.padded_bytes - 1;
    // Each path's furthest byte is in the extent's last `paths` stripes.
    const std::uint64_t last_stripe = last / stripe * stripe;
    const std::uint64_t from = std::max(info.offset_bytes,
                                        last_stripe >= (paths - 1) * stripe ? last_stripe - (paths - 1) * stripe : 0);
    for (std::uint64_t at = from; at <= last;) {
      const auto [path, physical] = volume_->locate(at);
      const std::uint64_t in_stripe =
          std::min(volume_->stripe_bytes() - at % volume_->stripe_bytes(), last - at + 1);
      needed[path] = std::max(needed[path], physical + in_stripe);
      at += in_stripe;
    }
  }
  for (std::size_t i = 0; i < needed.size(); ++i) {
    const std::uint64_t size = volume_->file(i).size_bytes();
    if (size < needed[i]) {
      throw corrupt(volume_->file(i).path(),
                    fmt::format("the file holds {} bytes but the manifest {} places data up to "
                                "{}: the swap file was truncated or replaced",
                                size, manifest_path_.string(), needed[i]));
    }
  }
  reserved_ = end_;
  committed_ = entries_;
  log_once("swap-open:" + manifest_path_.string(), spdlog::level::info,
           fmt::format("swap store {}: {} keys, {} in use (manifest generation {})",
                       manifest_path_.parent_path().string(), entries_.size(),
                       format_bytes(end_), generation_));
}

std::uint64_t SwapStore::padded_size(std::uint64_t bytes) const {
  return std::max<std::uint64_t>(align_up(bytes, alignment_), alignment_);
}

SwapStore::Extent SwapStore::allocate(std::uint64_t length) {
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < length) continue;
    const Extent extent{it->first, length};
    const std::uint64_t rest = it->second - length;
    const std::uint64_t rest_offset = it->first + length;
    free_.erase(it);
    if (rest > 0) free_[rest_offset] = rest;
    return extent;
  }
  // Grow: from the free block at the end if there is one.
  std::uint64_t offset = end_;
  if (!free_.empty()) {
    const auto last = std::prev(free_.end());
    if (last->first + last->second == end_) {
      offset = last->first;
      free_.erase(last);
    }
  }
  const std::uint64_t new_end = offset + length;
  if (new_end > reserved_) {
    const std::uint64_t generous = align_up(std::max(new_end, reserved_ + grow_bytes_), alignment_);
    try {
      volume_->reserve(generous);
      reserved_ = generous;
    } catch (const Error& error) {
      if (error.kind() != ErrorKind::no_space || generous == new_end) {
        if (offset < end_) free_[offset] = end_ - offset;
        throw;
      }
      try {
        volume_->reserve(new_end);  // exactly what this write needs
        reserved_ = new_end;
      } catch (...) {
        if (offset < end_) free_[offset] = end_ - offset;
        throw;
      }
    }
  }
  end_ = std::max(end_, new_end);
  return Extent{offset, length};
}

void SwapStore::release(Extent extent) {
  auto [it, inserted] = free_.emplace(extent.offset, extent.length);
  ZINF_ASSERT(inserted, "an extent was freed twice");
  // Coalesce with the neighbours so large tensors find room again.
  if (auto next = std::next(it); next != free_.end() && it->first + it->second == next->first) {
    it->second += next->second;
    free_.erase(next);
  }
  if (it != free_.begin()) {
    auto previous = std::prev(it);
    if (previous->first + previous->second == it->first) {
      previous->second += it->second;
      free_.erase(it);
    }
  }
}

void SwapStore::recycle(const std::vector<Extent>& extents) {
  for (const Extent& extent : extents) {
    // An extent still being read stays pending until a later commit.
    if (reads_in_flight_.contains(extent.offset)) {
      pending_free_.push_back(extent);
    } else {
      release(extent);
    }
  }
}

std::string SwapStore::files_at(std::uint64_t offset, std::uint64_t length) const {
  std::vector<std::string> parts;
  std::vector<bool> seen(volume_->path_count(), false);
  for (std::uint64_t at = offset; at < offset + length;) {
    const auto [path, physical] = volume_->locate(at);
    if (!seen[path]) {
      seen[path] = true;
      parts.push_back(fmt::format("{} offset {}", volume_->file(path).path(), physical));
    }
    at += volume_->stripe_bytes() - at % volume_->stripe_bytes();
  }
  return fmt::format("{}", fmt::join(parts, ", "));
}

SwapTicket SwapStore::write(std::string_view key, std::span<std::byte> buffer,
                            std::uint64_t bytes, std::int64_t version) {
  ZINF_CHECK(!key.empty(), "a swap key must not be empty");
  const std::uint64_t padded = padded_size(bytes);
  if (buffer.data() == nullptr || buffer.size() < padded) {
    throw Error(ErrorKind::invalid,
                fmt::format("swap-out of key '{}': the buffer holds {} bytes but {} bytes "
                            "padded to the {}-byte alignment need {}",
                            key, buffer.size(), bytes, alignment_, padded));
  }
  if (reinterpret_cast<std::uintptr_t>(buffer.data()) % alignment_ != 0) {
    throw Error(ErrorKind::alignment,
                fmt::format("swap-out of key '{}': the buffer at {} is not aligned to {} bytes "
                            "(take it from the pinned pool)",
                            key, static_cast<const void*>(buffer.data()), alignment_));
  }
  // The checksum covers the payload only; padding is zeroed so no stale
  // memory reaches the disk.
  std::memset(buffer.data() + bytes, 0, padded - bytes);
  auto operation = std::make_unique<Operation>();
  operation->op = aio::Op::write;
  operation->key = std::string(key);
  operation->buffer = buffer.data();
  operation->extent.size_bytes = bytes;
  operation->extent.padded_bytes = padded;
  operation->extent.checksum = XXH3_64bits(buffer.data(), bytes);
  operation->extent.version = version;

  std::unique_lock lock(mutex_);
  if (writes_in_flight_.contains(key)) {
    throw Error(ErrorKind::invalid,
                fmt::format("key '{}' is already being written: wait for that write first", key));
  }
  Extent extent;
  try {
    extent = allocate(padded);
  } catch (const Error& error) {
    throw with_key(error, "swap-out", key);
  }
  operation->extent.offset_bytes = extent.offset;
  writes_in_flight_.insert(operation->key);
  const std::uint64_t id = next_ticket_++;
  lock.unlock();
  try {
    operation->ticket = volume_->submit(aio::Op::write, extent.offset, buffer.data(), padded);
  } catch (const Error& error) {
    lock.lock();
    writes_in_flight_.erase(operation->key);
    release(extent);
    throw with_key(error, "swap-out", key);
  }
  lock.lock();
  operations_.emplace(id, std::move(operation));
  return SwapTicket{id};
}

SwapTicket SwapStore::read(std::string_view key, std::span<std::byte> buffer) {
  auto operation = std::make_unique<Operation>();
  operation->op = aio::Op::read;
  operation->key = std::string(key);
  operation->buffer = buffer.data();
  std::unique_lock lock(mutex_);
  const auto it = entries_.find(key);
  if (it == entries_.end()) {
    throw Error(ErrorKind::invalid,
                fmt::format("swap-in of key '{}': no such key in {}", key,
                            manifest_path_.parent_path().string()));
  }
  operation->extent = it->second;
  const ExtentInfo& info = it->second;
  if (buffer.data() == nullptr || buffer.size() < info.padded_bytes) {
    throw Error(ErrorKind::invalid,
                fmt::format("swap-in of key '{}': the buffer holds {} bytes but the key's {} "
                            "bytes need {} with padding",
                            key, buffer.size(), info.size_bytes, info.padded_bytes));
  }
  if (reinterpret_cast<std::uintptr_t>(buffer.data()) % alignment_ != 0) {
    throw Error(ErrorKind::alignment,
                fmt::format("swap-in of key '{}': the buffer at {} is not aligned to {} bytes "
                            "(take it from the pinned pool)",
                            key, static_cast<const void*>(buffer.data()), alignment_));
  }
  reads_in_flight_.insert(info.offset_bytes);
  const std::uint64_t id = next_ticket_++;
  lock.unlock();
  try {
    operation->ticket = volume_->submit(aio::Op::read, operation->extent.offset_bytes,
                                        buffer.data(), operation->extent.padded_bytes);
  } catch (const Error& error) {
    lock.lock();
    reads_in_flight_.erase(reads_in_flight_.find(operation->extent.offset_bytes));
    throw with_key(error, "swap-in", key);
  }
  lock.lock();
  read_bytes_ += operation->extent.padded_bytes;
  operations_.emplace(id, std::move(operation));
  return SwapTicket{id};
}

std::uint64_t SwapStore::wait(SwapTicket ticket) {
  std::unique_ptr<Operation> operation;
  {
    std::lock_guard lock(mutex_);
    const auto it = operations_.find(ticket.id);
    ZINF_CHECK(it != operations_.end(), "unknown or already waited swap ticket");
    operation = std::move(it->second);
    operations_.erase(it);
  }
  const ExtentInfo& extent = operation->extent;
  const bool writing = operation->op == aio::Op::write;
  try {
    volume_->wait(operation->ticket);
  } catch (const Error& error) {
    std::lock_guard lock(mutex_);
    if (writing) {
      writes_in_flight_.erase(operation->key);
      // Never named by a manifest: reusable at once.
      release(Extent{extent.offset_bytes, extent.padded_bytes});
    } else {
      reads_in_flight_.erase(reads_in_flight_.find(extent.offset_bytes));
    }
    throw with_key(error, writing ? "swap-out" : "swap-in", operation->key);
  }
  if (writing) {
    std::lock_guard lock(mutex_);
    writes_in_flight_.erase(operation->key);
    auto [it, inserted] = entries_.try_emplace(operation->key, extent);
    written_since_commit_ += extent.padded_bytes;
    if (!inserted) {
      pending_free_.push_back(Extent{it->second.offset_bytes, it->second.padded_bytes});
      it->second = extent;
    }
    return extent.size_bytes;
  }
  {
    std::lock_guard lock(mutex_);
    reads_in_flight_.erase(reads_in_flight_.find(extent.offset_bytes));
  }
  const std::uint64_t checksum = XXH3_64bits(operation->buffer, extent.size_bytes);
  if (checksum != extent.checksum) {
    ErrorContext context;
    context.path = volume_->file(volume_->locate(extent.offset_bytes).first).path();
    context.offset_bytes = volume_->locate(extent.offset_bytes).second;
    context.length_bytes = extent.padded_bytes;
    throw Error(ErrorKind::corrupt,
                fmt::format("swap-in of key '{}' read corrupt data: {} bytes from {} hash to "
                            "xxh3 {} but {} was written (the swap file was changed behind "
                            "zinf's back, or the disk returned bad data)",
                            operation->key, extent.size_bytes,
                            files_at(extent.offset_bytes, extent.padded_bytes), hex64(checksum),
                            hex64(extent.checksum)),
                std::move(context));
  }
  return extent.size_bytes;
}

void SwapStore::write_sync(std::string_view key, std::span<std::byte> buffer,
                           std::uint64_t bytes, std::int64_t version) {
  wait(write(key, buffer, bytes, version));
}

std::uint64_t SwapStore::read_sync(std::string_view key, std::span<std::byte> buffer) {
  return wait(read(key, buffer));
}

void SwapStore::remove(std::string_view key) {
  std::lock_guard lock(mutex_);
  const auto it = entries_.find(key);
  if (it == entries_.end()) return;
  pending_free_.push_back(Extent{it->second.offset_bytes, it->second.padded_bytes});
  entries_.erase(it);
}

void SwapStore::clear() {
  for (const auto& key : keys()) remove(key);
  std::lock_guard lock(mutex_);
  std::erase_if(attributes_, [](const auto& attribute) { return attribute.first != kWrittenAttribute; });
}

void SwapStore::revert(std::string_view key) {
  // Not while a commit is writing its manifest: that commit moved the
  // superseded extents aside and its snapshot may name the extent this would
  // free, so revert waits and then sees the commit's result.
  std::lock_guard commit_lock(commit_mutex_);
  std::lock_guard lock(mutex_);
  const auto current = entries_.find(key);
  const auto committed = committed_.find(key);
  const bool same = current != entries_.end() && committed != committed_.end() &&
                    current->second.offset_bytes == committed->second.offset_bytes;
  if (same || (current == entries_.end() && committed == committed_.end())) return;
  if (current != entries_.end()) {
    // Never committed: free now (or once a read of it ends).
    const Extent extent{current->second.offset_bytes, current->second.padded_bytes};
    if (reads_in_flight_.contains(extent.offset)) {
      pending_free_.push_back(extent);
    } else {
      release(extent);
    }
    entries_.erase(current);
  }
  if (committed != committed_.end()) {
    // The committed extent was queued for reuse when it was superseded.
    const auto queued = std::find_if(pending_free_.begin(), pending_free_.end(), [&](const Extent& e) {
      return e.offset == committed->second.offset_bytes;
    });
    ZINF_ASSERT(queued != pending_free_.end(), "a committed extent was reused before a commit");
    pending_free_.erase(queued);
    entries_.emplace(committed->first, committed->second);
  }
}

std::optional<ExtentInfo> SwapStore::find(std::string_view key) const {
  std::lock_guard lock(mutex_);
  const auto it = entries_.find(key);
  if (it == entries_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> SwapStore::keys() const {
  std::lock_guard lock(mutex_);
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const auto& [key, info] : entries_) names.push_back(key);
  return names;
}

void SwapStore::set_attribute(std::string_view name, std::string_view value) {
  std::lock_guard lock(mutex_);
  attributes_[std::string(name)] = std::string(value);
}

std::optional<std::string> SwapStore::attribute(std::string_view name) const {
  std::lock_guard lock(mutex_);
  const auto it = attributes_.find(name);
  if (it == attributes_.end()) return std::nullopt;
  return it->second;
}

std::string SwapStore::manifest_text() const {
  nlohmann::json entries = nlohmann::json::object();
  for (const auto& [key, info] : entries_) {
    entries[key] = {{"offset", info.offset_bytes}, {"size", info.size_bytes},
                    {"padded", info.padded_bytes}, {"xxh3", hex64(info.checksum)},
                    {"version", info.version}};
  }
  nlohmann::json manifest = {
      {"format", kFormat},
      {"format_version", kFormatVersion},
      {"generation", generation_ + 1},
      {"volume",
       {{"paths", volume_->path_count()},
        {"stripe_bytes", volume_->stripe_bytes()},
        {"alignment", alignment_},
        {"end", end_}}},
      {"attributes", attributes_},
      {"entries", std::move(entries)},
  };
  return manifest.dump(1);
}

void SwapStore::commit() {
  std::lock_guard commit_lock(commit_mutex_);
  std::string text;
  std::vector<Extent> recyclable;
  std::map<std::string, ExtentInfo, std::less<>> snapshot;
  {
    std::lock_guard lock(mutex_);
    if (!sync_error_.empty()) {
      throw Error(ErrorKind::io, fmt::format("commit refused: an earlier flush failed ({}); the "
                                             "kernel may have dropped those writes, so reopen "
                                             "the store to continue from its last manifest",
                                             sync_error_));
    }
    attributes_[kWrittenAttribute] = std::to_string(written_before_ + written_since_open());
    text = manifest_text();
    snapshot = entries_;
    // Only what was freed before this snapshot: the snapshot still names
    // anything freed after it.
    recyclable = std::move(pending_free_);
    pending_free_.clear();
    written_since_commit_ = 0;
  }
  try {
    if (sync_) {
      try {
        volume_->sync_data();
      } catch (const Error& error) {
        // Linux reports a failed writeback once and then forgets it: a
        // later fdatasync could succeed without the lost data. Refuse
        // every later commit instead.
        std::lock_guard lock(mutex_);
        sync_error_ = error.what();
        throw;
      }
    }
    replace_file(manifest_path_, text, sync_);
  } catch (...) {
    std::lock_guard lock(mutex_);
    pending_free_.insert(pending_free_.end(), recyclable.begin(), recyclable.end());
    throw;
  }
  std::lock_guard lock(mutex_);
  committed_ = std::move(snapshot);
  ++generation_;
  ++commits_;
  recycle(recyclable);
}

bool SwapStore::commit_after(std::uint64_t written_bytes) {
  {
    std::lock_guard lock(mutex_);
    if (written_since_commit_ < written_bytes) return false;
  }
  commit();
  return true;
}

void SwapStore::register_buffers(std::span<const aio::MemoryRegion> regions) {
  volume_->register_buffers(regions);
}

void SwapStore::unregister_buffers() { volume_->unregister_buffers(); }

std::uint64_t SwapStore::written_since_open() const {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < volume_->path_count(); ++i) total += volume_->bytes_written(i);
  return total;
}

SwapStoreStats SwapStore::stats() const {
  std::lock_guard lock(mutex_);
  SwapStoreStats stats;
  for (std::size_t i = 0; i < volume_->path_count(); ++i) stats.written_bytes.push_back(volume_->bytes_written(i));
  stats.written_total = written_before_ + written_since_open();
  stats.read_bytes = read_bytes_;
  stats.keys = entries_.size();
  for (const auto& [key, info] : entries_) stats.live_bytes += info.padded_bytes;
  stats.volume_bytes = end_;
  for (const auto& [offset, length] : free_) stats.free_bytes += length;
  for (const Extent& extent : pending_free_) stats.pending_free_bytes += extent.length;
  stats.commits = commits_;
  return stats;
}

std::size_t SwapStore::in_flight() const {
  std::lock_guard lock(mutex_);
  return operations_.size();
}

}  // namespace zinf::swap

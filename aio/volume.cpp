#include "aio/volume.hpp"

#include <algorithm>
#include <optional>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"

namespace zinf::aio {

Volume::Volume(const VolumeOptions& options, const EngineFactory& make_engine) {
  ZINF_CHECK(!options.directories.empty(), "a volume needs at least one directory");
  written_ = std::make_unique<std::atomic<std::uint64_t>[]>(options.directories.size());
  for (std::size_t i = 0; i < options.directories.size(); ++i) {
    files_.push_back(File::open(options.directories[i] / options.file_name, options.open_mode,
                                options.direct));
    alignment_ = std::max({alignment_, files_.back().offset_alignment(),
                           files_.back().memory_alignment()});
    engines_.push_back(make_engine(i));
    engines_.back()->register_file(files_.back());
  }
  const std::uint64_t block = engines_.front()->piece_bytes();
  stripe_bytes_ = options.stripe_bytes == 0 ? block : options.stripe_bytes;
  if (stripe_bytes_ % block != 0 || stripe_bytes_ % alignment_ != 0) {
    throw Error(ErrorKind::config,
                fmt::format("stripe size {} must be a multiple of aio.block_size ({}) and of the "
                            "files' O_DIRECT alignment ({})",
                            stripe_bytes_, block, alignment_));
  }
}

Volume::~Volume() {
  for (std::size_t i = 0; i < engines_.size(); ++i) {
    // Wait out anything the caller never waited for before the files close.
    try {
      engines_[i]->wait_all();
    } catch (...) {  // errors of unwaited tickets have no one to go to
    }
    engines_[i]->unregister_file(files_[i]);
  }
}

void Volume::reserve(std::uint64_t bytes) {
  const std::size_t n = files_.size();
  const std::uint64_t stripes = (bytes + stripe_bytes_ - 1) / stripe_bytes_;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t mine = stripes / n + (i < stripes % n ? 1 : 0);
    files_[i].preallocate(mine * stripe_bytes_);
  }
}

void Volume::sync_data() {
  for (auto& file : files_) file.sync_data();
}

std::pair<std::size_t, std::uint64_t> Volume::locate(std::uint64_t logical_offset) const {
  const std::size_t n = files_.size();
  const std::uint64_t stripe = logical_offset / stripe_bytes_;
  const std::uint64_t within = logical_offset % stripe_bytes_;
  return {static_cast<std::size_t>(stripe % n), (stripe / n) * stripe_bytes_ + within};
}

VolumeTicket Volume::submit(Op op, std::uint64_t offset_bytes, std::byte* buffer,
                            std::uint64_t length_bytes) {
  const std::size_t n = files_.size();
  std::vector<std::vector<Request>> per_path(n);
  if (n == 1) {
    per_path[0].push_back(Request{op, &files_[0], offset_bytes, buffer, length_bytes});
  } else {
    std::uint64_t done = 0;
    while (done < length_bytes) {
      const std::uint64_t logical = offset_bytes + done;
      const std::uint64_t in_stripe =
          std::min(stripe_bytes_ - logical % stripe_bytes_, length_bytes - done);
      const auto [path, physical] = locate(logical);
      per_path[path].push_back(Request{op, &files_[path], physical, buffer + done, in_stripe});
      done += in_stripe;
    }
  }
  VolumeTicket ticket;
  try {
    for (std::size_t i = 0; i < n; ++i) {
      if (per_path[i].empty()) continue;
      ticket.parts.emplace_back(i, engines_[i]->submit(per_path[i]));
      if (op == Op::write) {
        std::uint64_t bytes = 0;
        for (const Request& request : per_path[i]) bytes += request.length_bytes;
        written_[i].fetch_add(bytes, std::memory_order_relaxed);
      }
    }
  } catch (...) {
    // A refused part (misaligned, say): the parts already queued must finish
    // before the caller may touch the buffer again.
    for (auto& [path, part] : ticket.parts) {
      try {
        engines_[path]->wait(part);
      } catch (...) {
      }
    }
    throw;
  }
  return ticket;
}

std::uint64_t Volume::wait(const VolumeTicket& ticket) {
  std::uint64_t bytes = 0;
  std::optional<Error> first;
  for (const auto& [path, part] : ticket.parts) {
    try {
      bytes += engines_[path]->wait(part);
    } catch (const Error& error) {
      if (!first) first.emplace(error);
    }
  }
  if (first) throw Error(*first);
  return bytes;
}

void Volume::register_buffers(std::span<const MemoryRegion> regions) {
  for (auto& engine : engines_) engine->register_buffers(regions);
}

void Volume::unregister_buffers() {
  for (auto& engine : engines_) engine->unregister_buffers();
}

}  // namespace zinf::aio

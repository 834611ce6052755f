#include "swap/gradient_swapper.hpp"

#include <algorithm>
#include <chrono>
#include <cstring>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/units.hpp"

namespace zinf::swap {
namespace {

// Rewrites of small sub-groups commit together once this much was written.
constexpr std::uint64_t kCommitBytes = 64ull << 20;

// 0 when every sub-group is resident.
std::uint64_t buffer_bytes(std::span<const SubGroup> groups, std::uint64_t alignment,
                           std::uint64_t resident_below_bytes) {
  std::uint64_t largest = 0;
  for (const auto& group : groups) {
    if (!stays_resident(group, resident_below_bytes)) largest = std::max<std::uint64_t>(largest, group.elements);
  }
  return largest == 0 ? 0 : std::max<std::uint64_t>(align_up(largest * sizeof(float), alignment), alignment);
}

}  // namespace

std::uint64_t GradientSwapper::pinned_bytes_needed(std::span<const SubGroup> groups, std::uint64_t alignment,
                                                   std::uint64_t resident_below_bytes) {
  return 2 * buffer_bytes(groups, alignment, resident_below_bytes);
}

GradientSwapper::GradientSwapper(SwapStore& store, PinnedPool& pool, std::vector<SubGroup> groups,
                                 std::uint64_t resident_below_bytes)
    : store_(store),
      groups_(std::move(groups)),
      stored_(groups_.size(), false),
      resident_(groups_.size()),
      sums_(groups_.size(), 0.0) {
  ZINF_CHECK(!groups_.empty(), "the gradient swapper needs at least one sub-group");
  std::size_t largest_resident = 0;
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (!stays_resident(groups_[g], resident_below_bytes)) continue;
    resident_[g].assign(groups_[g].elements, 0.0f);
    largest_resident = std::max(largest_resident, groups_[g].elements);
  }
  scaled_.resize(largest_resident);
  const std::uint64_t bytes = buffer_bytes(groups_, store_.alignment(), resident_below_bytes);
  ZINF_CHECK(bytes == 0 || store_.padded_size(bytes) == bytes, "gradient buffers must hold a padded sub-group");
  if (bytes > 0) {
    for (auto& buffer : buffers_) buffer.memory = pool.acquire(bytes, std::chrono::milliseconds(0));
  }
  // Gradients a killed run left behind belong to no step: their space is
  // reused from the first commit on.
  for (const auto& stale : store_.keys()) store_.remove(stale);
  store_.commit();
}

GradientSwapper::~GradientSwapper() { drain(); }

std::string GradientSwapper::key(std::size_t group) const { return groups_[group].name + "/grad"; }

void GradientSwapper::drain() noexcept {
  for (auto& buffer : buffers_) {
    if (!buffer.ticket.valid()) continue;
    try {
      store_.wait(buffer.ticket);
    } catch (...) {  // NOLINT(bugprone-empty-catch): an error path is already leaving
    }
    buffer.ticket = {};
    buffer.reading = Buffer::none;
    buffer.holds = Buffer::none;  // a failed read or write leaves it unknown
    buffer.dirty = false;
  }
}

void GradientSwapper::settle(Buffer& buffer) {
  if (!buffer.ticket.valid()) return;
  const SwapTicket ticket = buffer.ticket;
  buffer.ticket = {};
  buffer.reading = Buffer::none;
  try {
    store_.wait(ticket);
  } catch (...) {
    buffer.holds = Buffer::none;
    throw;
  }
}

void GradientSwapper::close(Buffer& buffer, bool write) {
  const std::size_t group = buffer.open;
  const std::size_t n = groups_[group].elements;
  const float* values = buffer.floats();
  double sum = 0.0;
  for (std::size_t i = 0; i < n; ++i) sum += static_cast<double>(values[i]) * values[i];
  sums_[group] = sum;
  buffer.open = Buffer::none;
  buffer.holds = group;
  if (!write) {
    buffer.dirty = true;
    return;
  }
  buffer.ticket = store_.write(key(group), buffer.memory.span(), n * sizeof(float));
  stored_[group] = true;
  bytes_written_ += n * sizeof(float);
}

void GradientSwapper::flush(Buffer& buffer) {
  if (!buffer.dirty) return;
  const std::size_t group = buffer.holds;
  const std::size_t n = groups_[group].elements;
  buffer.dirty = false;
  try {
    store_.write_sync(key(group), buffer.memory.span(), n * sizeof(float));
  } catch (...) {
    buffer.holds = Buffer::none;
    throw;
  }
  stored_[group] = true;
  bytes_written_ += n * sizeof(float);
}

GradientSwapper::Buffer& GradientSwapper::open(std::size_t group) {
  Buffer& current = buffers_[last_opened_];
  if (current.open == group) return current;
  if (current.open == Buffer::none && current.holds == group) {
    // The last buffer opened still holds it (one sub-group accumulated
    // again next micro-step): it reopens in place, once any write from it
    // is done. What the store holds of it (if anything) is older now; the
    // next close takes the new values.
    settle(current);
    current.holds = Buffer::none;
    current.dirty = false;
    current.open = group;
    return current;
  }
  // One buffer accumulates while the other's sub-group is written: the
  // open one goes out now and the next opens in the other buffer, once
  // that buffer's own write (an older sub-group, maybe this one) is done.
  // (The write just started is never this sub-group's: it was open.)
  if (current.open != Buffer::none) close(current, true);
  Buffer& next = buffers_[1 - last_opened_];
  if (next.ticket.valid()) {
    settle(next);
    // The extent that write replaced is free again once committed: at
    // most two sub-groups' rewrites (or kCommitBytes of small ones, whose
    // commits would otherwise cost more than their writes) hold disk
    // space twice.
    store_.commit_after(kCommitBytes);
  }
  ZINF_ASSERT(next.open == Buffer::none, "a gradient buffer is open twice");
  if (next.holds != group) flush(next);  // its values are needed on the store
  const std::size_t n = groups_[group].elements;
  // (`current` does not hold it: it would have reopened above, or was
  // open with another sub-group.)
  if (next.holds == group) {
    // Its own last write came from here: the values are at hand.
  } else if (stored_[group]) {
    store_.read_sync(key(group), next.memory.span());
    bytes_read_ += n * sizeof(float);
  } else {
    std::memset(next.memory.data(), 0, n * sizeof(float));
  }
  next.holds = Buffer::none;
  next.dirty = false;
  next.open = group;
  last_opened_ = 1 - last_opened_;
  return next;
}

float* GradientSwapper::open_piece(std::size_t group, std::uint64_t offset, std::size_t count) {
  ZINF_CHECK(group < groups_.size(), "sub-group index out of range");
  ZINF_CHECK(offset + count <= groups_[group].elements,
             fmt::format("gradient elements [{}, {}) are past sub-group '{}' ({} elements)", offset,
                         offset + count, groups_[group].name, groups_[group].elements));
  if (resident(group)) return resident_[group].data() + offset;
  return open(group).floats() + offset;
}

double GradientSwapper::sum_of_squares(std::size_t group) const {
  if (!resident(group)) return sums_[group];  // taken at its last write
  double sum = 0.0;
  for (const float value : resident_[group]) sum += static_cast<double>(value) * value;
  return sum;
}

void GradientSwapper::overwrite(std::size_t group, std::uint64_t offset, std::span<const float> values) {
  std::copy(values.begin(), values.end(), open_piece(group, offset, values.size()));
}

void GradientSwapper::accumulate(std::size_t group, std::uint64_t offset, std::span<const float> values,
                                 float scale) {
  float* target = open_piece(group, offset, values.size());
  // The same float operation as an accumulation in memory: bit for bit.
  for (std::size_t i = 0; i < values.size(); ++i) target[i] += scale * values[i];
}

void GradientSwapper::end_micro_step() {
  for (auto& buffer : buffers_) {
    if (buffer.open != Buffer::none) close(buffer, false);
  }
  for (auto& buffer : buffers_) settle(buffer);
  // Recycles the extents the rewrites replaced (no flush: see the header).
  store_.commit();
}

void GradientSwapper::clear() {
  drain();
  for (auto& buffer : buffers_) {
    buffer.open = buffer.holds = buffer.reading = Buffer::none;
    buffer.dirty = false;
  }
  last_prefetched_ = 2;
  // The next micro-step writes every sub-group afresh: no old copy need
  // hold space meanwhile.
  for (std::size_t g = 0; g < groups_.size(); ++g) {
    if (stored_[g]) store_.remove(key(g));
  }
  store_.commit();
  std::fill(stored_.begin(), stored_.end(), false);
  std::fill(sums_.begin(), sums_.end(), 0.0);
  for (auto& values : resident_) std::fill(values.begin(), values.end(), 0.0f);
  read_scale_ = 1.0f;
}

void GradientSwapper::copy_out(std::size_t group, std::span<float> out) {
  ZINF_CHECK(group < groups_.size(), "sub-group index out of range");
  const std::size_t n = groups_[group].elements;
  ZINF_CHECK(out.size() == n, fmt::format("copy_out of sub-group '{}': {} floats given for {} elements",
                                          groups_[group].name, out.size(), n));
  if (resident(group)) {
    std::copy(resident_[group].begin(), resident_[group].end(), out.begin());
    return;
  }
  for (auto& buffer : buffers_) {
    if (buffer.open == group || buffer.holds == group) {
      // A write in flight only reads the buffer: its values are current.
      std::copy(buffer.floats(), buffer.floats() + n, out.begin());
      return;
    }
  }
  if (!stored_[group]) {
    std::fill(out.begin(), out.end(), 0.0f);
    return;
  }
  // At most one buffer is open: the other takes the read.
  Buffer& buffer = buffers_[0].open == Buffer::none ? buffers_[0] : buffers_[1];
  ZINF_ASSERT(buffer.open == Buffer::none, "both gradient buffers are open");
  settle(buffer);
  flush(buffer);  // its sub-group's values are needed on the store
  buffer.holds = Buffer::none;
  store_.read_sync(key(group), buffer.memory.span());
  bytes_read_ += n * sizeof(float);
  buffer.holds = group;
  std::copy(buffer.floats(), buffer.floats() + n, out.begin());
}

void GradientSwapper::prefetch(std::size_t group) {
  ZINF_CHECK(group < groups_.size(), "sub-group index out of range");
  if (resident(group)) return;  // at hand, and no buffer is taken
  ZINF_ASSERT(buffers_[0].open == Buffer::none && buffers_[1].open == Buffer::none,
              "prefetch with a sub-group still open: end_micro_step() first");
  // Any buffer but the previous sub-group's (its step may still be
  // reading it): one that still holds this sub-group if there is one.
  std::size_t chosen = last_prefetched_ == 0 ? 1 : 0;
  for (std::size_t i = 0; i < 2; ++i) {
    if (i != last_prefetched_ && buffers_[i].holds == group) chosen = i;
  }
  Buffer& buffer = buffers_[chosen];
  last_prefetched_ = chosen;
  settle(buffer);
  // await(group) finds this buffer, not one a past step read it into.
  if (buffers_[1 - chosen].reading == group) buffers_[1 - chosen].reading = Buffer::none;
  if (buffer.holds != group) {
    flush(buffer);  // a sub-group the step has not taken yet goes to the store first
    buffer.holds = Buffer::none;
    if (stored_[group]) {
      buffer.ticket = store_.read(key(group), buffer.memory.span());
    } else {
      std::memset(buffer.memory.data(), 0, groups_[group].elements * sizeof(float));
    }
  }
  buffer.reading = group;
}

cpu_adam::Buffer GradientSwapper::await(std::size_t group) {
  if (resident(group)) {
    auto& values = resident_[group];
    if (read_scale_ == 1.0f) return {values.data(), values.size(), cpu_adam::DType::f32};
    // Scaled into a copy: the accumulated values stay as they are, should
    // the step be retried or the gradients read again before clear().
    for (std::size_t i = 0; i < values.size(); ++i) scaled_[i] = values[i] * read_scale_;
    return {scaled_.data(), values.size(), cpu_adam::DType::f32};
  }
  Buffer* found = nullptr;
  for (auto& buffer : buffers_) {
    if (buffer.reading == group) found = &buffer;
  }
  ZINF_ASSERT(found != nullptr, "await without its prefetch");
  Buffer& buffer = *found;
  const bool read = buffer.ticket.valid();
  settle(buffer);
  const std::size_t n = groups_[group].elements;
  if (read) bytes_read_ += n * sizeof(float);
  float* values = buffer.floats();
  buffer.dirty = false;  // the step takes it: no one reads it again before clear()
  if (read_scale_ != 1.0f) {
    for (std::size_t i = 0; i < n; ++i) values[i] *= read_scale_;
    buffer.holds = Buffer::none;
  }
  return {values, n, cpu_adam::DType::f32};
}

}  // namespace zinf::swap

// The gradient swapper: an optimizer's fp32 gradients, one tensor per
// sub-group, accumulated on NVMe over the micro-steps of an optimizer step,
// so host memory holds two sub-groups' worth instead of the whole gradient
// partition (4 bytes per trainable element of the rank's partition) — the
// last host buffer that grew with the model once params and optimizer
// states are on NVMe. DeepSpeed's ZeRO-Infinity swaps its gradients out the
// same way.
//
// Backward adds each reduced gradient shard into its sub-group's buffer
// (accumulate). A sub-group stays open in one of two pinned buffers while
// its shards arrive; opening another writes the older one out, and the
// writes run while the next sub-group accumulates. A sub-group that already
// holds this step's gradients (an earlier micro-step, or a param reduced
// twice) is read back first; one that holds none starts from zeros with no
// read. What is still open when backward ends stays in the buffers (the
// partition's first sub-groups: the step's first, and the ones the next
// micro-step's backward reaches last); the step reads each other
// sub-group back through the same two buffers
// (prefetch/await, driven by the optimizer swapper's pipeline), scaled by
// the clipping coefficient, and clear() forgets them all for the next step
// with no I/O.
//
// Each write also records the sub-group's sum of squares, so the global
// gradient norm needs no read: a sub-group's values change only when it is
// written, and its last write holds its final values.
//
// The store is its own (SwapRole::gradients) and never flushed to the disk:
// no restart reads gradients (a checkpoint is taken at a step boundary,
// where there are none).
//
// Sub-groups under resident_below_bytes (the optimizer swapper's rule, the
// same value) accumulate in host memory instead, with no I/O; the calls
// are the same.
//
// Thread use: accumulate() runs on one thread (the engine's worker); the
// rest on another while accumulate() is not running (the engine drains its
// worker first).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "cpu_adam/cpu_adam.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/optimizer_swapper.hpp"
#include "swap/swap_store.hpp"

namespace zinf::swap {

class GradientSwapper {
 public:
  // Pinned bytes the swapper leases: two buffers of the largest swapped
  // sub-group (none when every one is resident).
  static std::uint64_t pinned_bytes_needed(std::span<const SubGroup> groups, std::uint64_t alignment,
                                           std::uint64_t resident_below_bytes = 0);

  // Leases its buffers from `pool` now (Error{resource} naming the bytes
  // when it cannot) and drops whatever gradients an earlier run left in
  // `store`. Sub-groups whose fp32 gradients take fewer than
  // `resident_below_bytes` stay in host memory.
  GradientSwapper(SwapStore& store, PinnedPool& pool, std::vector<SubGroup> groups,
                  std::uint64_t resident_below_bytes = 0);
  // Waits out any I/O still in flight.
  ~GradientSwapper();
  GradientSwapper(const GradientSwapper&) = delete;
  GradientSwapper& operator=(const GradientSwapper&) = delete;

  // Adds scale * values[i] to element offset + i of sub-group `group`.
  void accumulate(std::size_t group, std::uint64_t offset, std::span<const float> values, float scale);
  // The micro-step's backward is over: the sub-groups still open stay in
  // their buffers unwritten (their sums of squares taken), for the next
  // micro-step or the step to take from there; a buffer needed for another
  // sub-group is written out first. So a rank whose trainable partition is
  // one or two sub-groups does no gradient I/O at all. Waits for the
  // writes in flight.
  void end_micro_step();
  // Sub-group `group`'s sum of squares (in double), as of its last write;
  // 0 for one with no gradient this step.
  double sum_of_squares(std::size_t group) const;
  // The step reads every gradient multiplied by `coefficient` (clipping).
  void set_read_scale(float coefficient) { read_scale_ = coefficient; }
  // Every gradient is zero again (after a step, a skipped step, a load).
  void clear();
  // Sub-group `group`'s gradients as accumulated so far (`out` holds its
  // elements), for a trainer inspecting them between micro-steps
  // (DeepSpeed's safe_get_full_grad): from a buffer that holds them, or
  // read back through the buffer not open (written out first if it held
  // unwritten values). Not during a step.
  void copy_out(std::size_t group, std::span<float> out);
  // Replaces elements offset + i of sub-group `group` with values[i]
  // (DeepSpeed's safe_set_full_grad); the same thread rule as accumulate().
  void overwrite(std::size_t group, std::uint64_t offset, std::span<const float> values);

  // The step's reads, in sub-group order, one ahead of use: prefetch(g)
  // starts reading sub-group g into the buffer sub-group g - 1 is not
  // using (zeros when it has no gradient; no I/O when a buffer still holds
  // it, as the last sub-groups backward wrote, the step's first, do),
  // await(g) waits for it, applies the read scale and returns the
  // gradient, valid until prefetch(g + 2).
  void prefetch(std::size_t group);
  cpu_adam::Buffer await(std::size_t group);

  std::span<const SubGroup> groups() const { return groups_; }
  bool resident(std::size_t group) const { return !resident_[group].empty(); }
  std::uint64_t bytes_written() const { return bytes_written_; }
  std::uint64_t bytes_read() const { return bytes_read_; }
  // Waits out every buffer's I/O, ignoring errors (error paths).
  void drain() noexcept;

 private:
  struct Buffer {
    PinnedBuffer memory;
    static constexpr std::size_t none = SIZE_MAX;
    std::size_t open = none;     // the sub-group accumulating in it
    std::size_t reading = none;  // the sub-group a step reads into it
    // The sub-group whose stored values it holds (since its write), so
    // reading that sub-group back needs no I/O; none once it changes.
    std::size_t holds = none;
    bool dirty = false;          // what it holds is not on the store yet
    SwapTicket ticket;           // the write's or the read's
    float* floats() const { return reinterpret_cast<float*>(memory.data()); }
  };
  std::string key(std::size_t group) const;
  // Closes the sub-group open in `buffer` (its sum of squares taken) and
  // starts writing it, or with `write` false keeps it there, dirty.
  void close(Buffer& buffer, bool write);
  // Writes a dirty buffer's sub-group to the store (waited for).
  void flush(Buffer& buffer);
  // Waits for the buffer's write or read (rethrowing its error).
  void settle(Buffer& buffer);
  // A buffer holding sub-group `group`, open for accumulation.
  Buffer& open(std::size_t group);
  // Elements [offset, offset + count) of sub-group `group`, opened (checked).
  float* open_piece(std::size_t group, std::uint64_t offset, std::size_t count);

  SwapStore& store_;
  std::vector<SubGroup> groups_;
  Buffer buffers_[2];
  std::size_t last_opened_ = 0;  // the buffer opened most recently
  std::size_t last_prefetched_ = 2;  // the buffer the step's last prefetch chose (2: none)
  std::vector<bool> stored_;     // holds this step's gradients on the store
  // Per sub-group: its gradients when resident, else empty.
  std::vector<std::vector<float>> resident_;
  std::vector<float> scaled_;    // a resident sub-group's, read scale applied (await)
  std::vector<double> sums_;
  float read_scale_ = 1.0f;
  std::uint64_t bytes_written_ = 0;
  std::uint64_t bytes_read_ = 0;
};

}  // namespace zinf::swap

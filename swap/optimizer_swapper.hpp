// The optimizer swapper: steps sub-groups whose fp32 params and optimizer
// moments live in the swap store (NVMe), with the gradients in memory.
// A step is pipelined over the sub-groups,
//
//     read(k+1)  ‖  optimizer(k)  ‖  write(k-1)
//
// in three pinned slots sized for the largest sub-group, so the disk and the
// CPU stay busy together and memory stays bounded whatever the model size.
// The fused kernel writes the updated param as bf16/fp16 into the caller's
// buffer (the copy the GPU receives) while it updates the fp32 master.
// With overlap off it runs the same operations one after another; the
// results are bit for bit the same.
//
// Crash semantics: a step is *detectably incomplete*, never torn inside a
// sub-group. Each sub-group's three tensors are written copy-on-write and
// committed together after their writes finish, tagged with the step number
// (their version). The manifest records the last finished step and, while a
// step runs, the step in progress. A run killed mid-step reopens to every
// sub-group at either the previous step or the new one, all of it intact,
// and recovery() says which; step() then refuses to run until the caller
// restores a consistent state (from its checkpoint) with initialize().
//
// Sub-groups may also live in host memory (offload_optimizer.device "cpu"):
// the same API, no I/O. With a store, sub-groups too small for the disk
// (resident_below_bytes, DeepSpeed's rule) stay in host memory beside the
// swapped ones: they step in place, in sub-group order, and like the "cpu"
// ones they are not durable (a reopen finds them uninitialised).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "cpu_adam/cpu_adam.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/swap_store.hpp"

namespace zinf::swap {

class GradientSwapper;

enum class OptimizerKind { adam, adagrad, lion };

struct OptimizerSettings {
  OptimizerKind kind = OptimizerKind::adam;
  cpu_adam::AdamOptions adam;
  cpu_adam::AdagradOptions adagrad;
  cpu_adam::LionOptions lion;
};

struct SubGroup {
  std::string name;  // key prefix: "<name>/param", "<name>/exp_avg", "<name>/exp_avg_sq"
  std::size_t elements = 0;
};

// A param group's own settings (torch's param_groups: biases and norms
// without weight decay, an embedding or a new head with its own lr); each
// one left unset is the optimizer's. An optimizer uses the fields it has
// (Adagrad: lr, eps, weight_decay; Lion: lr, betas, weight_decay).
struct ParamGroupSettings {
  std::optional<float> lr;
  std::optional<float> beta1;
  std::optional<float> beta2;
  std::optional<float> eps;
  std::optional<float> weight_decay;
  bool operator==(const ParamGroupSettings&) const = default;
};

// Elements [begin, end) of a sub-group belong to param group `param_group`.
struct ParamGroupRange {
  std::size_t begin = 0;
  std::size_t end = 0;
  std::size_t param_group = 0;
};

// The lr of `settings`' optimizer kind.
float learning_rate_of(const OptimizerSettings& settings);
// Whether a sub-group stays in host memory beside a store: its fp32 params
// take fewer than `resident_below_bytes` (OptimizerSwapperOptions; the
// gradient swapper takes the same value).
bool stays_resident(const SubGroup& group, std::uint64_t resident_below_bytes);
// The optimizer's settings with a param group's applied.
OptimizerSettings resolve_settings(const OptimizerSettings& optimizer, const ParamGroupSettings& group);
// Throws Error{invalid} naming param group `index` and the field that is
// out of range (lr, eps and weight_decay >= 0, betas in [0, 1), all finite).
void check_param_group(std::size_t index, const ParamGroupSettings& settings);

struct OptimizerSwapperOptions {
  OptimizerSettings optimizer;
  bool overlap = true;       // pipelined; false runs read, step, write in turn
  // How Adam's moments are kept (offload_optimizer.state_format): fp32, or
  // compressed (bf16, int8 block-wise) to move and store fewer bytes. The
  // fp32 master params are exact in every format. Adam only.
  cpu_adam::MomentFormat moment_format = cpu_adam::MomentFormat::fp32;
  std::string name = "optimizer";  // prefix of the manifest attributes
  // Called after sub-group k of a step is durable (tests use it to kill the
  // process mid-step; a trainer may use it for progress).
  std::function<void(std::size_t group)> after_group_committed;
  // A step commits once this many bytes were written since its last
  // commit, not after every sub-group: a commit (manifest, flushes) costs
  // milliseconds whatever its size, which a small sub_group_size would pay
  // thousands of times per step. Sub-groups of at least this size commit
  // one by one, as with 0. A crash loses at most this much of a step.
  std::uint64_t commit_bytes = 256ull << 20;
  // With a store: a sub-group whose fp32 params take fewer bytes than this
  // stays in host memory, its states never swapped. Each swapped tensor is
  // a request of its own padded to the store's alignment, so thousands of
  // tiny ones make a step bound on requests (8.4 M params in 83928
  // sub-groups of 100: 28 s a step, 1.38 GB moved for 0.1 GB of states).
  // DeepSpeed keeps such sub-groups in memory below max(1 MiB,
  // aio.block_size) (swap::resident_below_bytes). 0: every sub-group swaps.
  std::uint64_t resident_below_bytes = 0;
};

// Where a step stands after a reopen.
struct OptimizerRecovery {
  std::int64_t finished_step = 0;             // last step that completed
  std::optional<std::int64_t> interrupted;    // a step that started and did not finish
  std::vector<std::int64_t> group_steps;      // each sub-group's version
};

struct OptimizerStepStats {
  std::chrono::nanoseconds total{0};
  std::chrono::nanoseconds compute{0};     // inside the optimizer kernels
  std::chrono::nanoseconds read_wait{0};   // blocked on reads
  std::chrono::nanoseconds write_wait{0};  // blocked on writes and commits
  std::uint64_t bytes_read = 0;
  std::uint64_t bytes_written = 0;
};

class OptimizerSwapper {
 public:
  // The tensors a sub-group keeps besides its param, for an optimizer.
  static std::vector<std::string> state_names(OptimizerKind kind);
  // Bytes tensor `index` (0 the param, then state_names()) of a sub-group
  // of `elements` takes in `format`, in memory and on disk.
  static std::uint64_t tensor_bytes(std::size_t index, std::size_t elements,
                                    cpu_adam::MomentFormat format);
  // Pinned bytes the swapper holds: three slots (one when overlap is off),
  // each the padded param and states of the largest swapped sub-group
  // (none when every sub-group is resident: see resident_below_bytes).
  static std::uint64_t pinned_bytes_needed(std::span<const SubGroup> groups,
                                           OptimizerKind kind, bool overlap,
                                           std::uint64_t alignment,
                                           cpu_adam::MomentFormat format = cpu_adam::MomentFormat::fp32,
                                           std::uint64_t resident_below_bytes = 0);

  // NVMe states in `store`, slots leased from `pool` now: the one failure
  // for want of memory happens here, before step 0, naming the bytes needed
  // and the pool's budget. Reads the manifest's step records.
  OptimizerSwapper(SwapStore& store, PinnedPool& pool, cpu_adam::CpuOptimizer& optimizer,
                   std::vector<SubGroup> groups, OptimizerSwapperOptions options);
  // States in host memory (offload_optimizer.device "cpu").
  OptimizerSwapper(cpu_adam::CpuOptimizer& optimizer, std::vector<SubGroup> groups,
                   OptimizerSwapperOptions options);
  ~OptimizerSwapper();
  OptimizerSwapper(const OptimizerSwapper&) = delete;
  OptimizerSwapper& operator=(const OptimizerSwapper&) = delete;

  // Sets sub-group `group`'s fp32 params and its moments (`states`, in
  // state_names() order, from a checkpoint; zeros when empty) at step
  // `step`; once every sub-group is set to the same step, step() may run.
  void initialize(std::size_t group, std::span<const float> params, std::int64_t step = 0,
                  std::span<const std::span<const float>> states = {});
  // One optimizer step: grads[k] (fp32, bf16 or fp16, elements of group k)
  // and, optionally, param_copies[k] (bf16/fp16, or fp32 for fp32
  // training) to receive the updated params. Durable when it returns.
  // `copied(k)`, when given, is called once sub-group k's copy is written
  // and before sub-group k+1's is: the copies may then share one buffer
  // (the caller moves each out as it comes; sub-groups step one kernel call
  // each).
  void step(std::span<const cpu_adam::Buffer> grads,
            std::span<const cpu_adam::Buffer> param_copies = {},
            const std::function<void(std::size_t group)>& copied = {});
  // The same with the gradients on NVMe (states on NVMe only): each
  // sub-group's is read through `gradients` beside its states, in the
  // same pipeline.
  void step(GradientSwapper& gradients, std::span<const cpu_adam::Buffer> param_copies = {},
            const std::function<void(std::size_t group)>& copied = {});

  // Param groups: set_param_group adds group `index` (the next one) or
  // replaces its settings (a scheduler's lr; between steps only), and
  // set_param_group_ranges says which elements of sub-group `group` belong
  // to which: ranges cover it all, in order (an empty list: param group 0,
  // or the optimizer's settings before any group is set). Every element steps exactly as the kernel
  // steps it with its group's settings. Runs of ranges that differ in
  // weight decay alone share one kernel call: the step decays each range
  // itself with the kernels' float operations (decoupled: p *= 1 - lr * wd
  // before the update; L2: g += wd * p, which changes the caller's fp32
  // gradients of that range in place). Runs that differ in lr, betas or eps
  // get a call each; with 8-bit moments a block two runs share is stepped
  // by both calls, each keeping the other's elements (re-encoded once more).
  void set_param_group(std::size_t index, const ParamGroupSettings& settings);
  void set_param_group_ranges(std::size_t group, std::vector<ParamGroupRange> ranges);
  const ParamGroupSettings& param_group(std::size_t index) const;

  // The optimizer's learning rate (a scheduler's), whichever its kind: the
  // param groups without an lr of their own follow it. Between steps only.
  void set_learning_rate(float lr) {
    options_.optimizer.adam.lr = lr;
    options_.optimizer.adagrad.lr = lr;
    options_.optimizer.lion.lr = lr;
  }
  float learning_rate() const;

  // Reads sub-group `group`'s current fp32 params, or a state tensor.
  void read_params(std::size_t group, std::span<float> out);
  void read_state(std::size_t group, std::string_view state, std::span<float> out);

  std::int64_t step_count() const { return step_; }
  const OptimizerRecovery& recovery() const { return recovery_; }
  const OptimizerStepStats& last_step_stats() const { return last_stats_; }
  std::span<const SubGroup> groups() const { return groups_; }
  // Whether sub-group `group` lives in host memory (every one without a
  // store; with one, those under resident_below_bytes).
  bool resident(std::size_t group) const { return resident_[group]; }
  std::uint64_t pinned_bytes() const;

 private:
  struct Slot;
  void read_recovery();
  std::string key(std::size_t group, std::string_view tensor) const;
  void submit_reads(std::size_t group, Slot& slot, GradientSwapper* gradients);
  void wait_reads(Slot& slot);
  void submit_writes(std::size_t group, Slot& slot, std::int64_t version);
  void wait_writes(Slot& slot);
  void compute(std::size_t group, float* param, void* exp_avg, void* exp_avg_sq,
               const cpu_adam::Buffer& grad, const cpu_adam::Buffer& copy);
  std::uint64_t bytes_of(std::size_t group, std::size_t tensor) const;
  // Sub-group `group`'s elements with one kernel call's settings each.
  struct Run {
    std::size_t begin = 0;
    std::size_t end = 0;
    OptimizerSettings settings;      // weight decay 0 when the step decays the range itself
    std::size_t first_range = 0;     // [first_range, last_range) of the sub-group's ranges
    std::size_t last_range = 0;
    bool decays_itself = false;      // its ranges differ in weight decay
  };
  std::vector<Run> runs_of(std::size_t group) const;
  // Param group 0's settings: those of a sub-group without ranges.
  OptimizerSettings base_settings() const;
  // Decays a run's ranges with their own weight decay (decays_itself).
  void decay_ranges(std::size_t group, const Run& run, float* param, const cpu_adam::Buffer& grad) const;
  // Gradients from `grads`, or read through `gradients` when it is given.
  void step_on_store(std::span<const cpu_adam::Buffer> grads, GradientSwapper* gradients,
                     std::span<const cpu_adam::Buffer> copies,
                     const std::function<void(std::size_t group)>& copied);
  void check_grads(std::span<const cpu_adam::Buffer> grads) const;
  // The copies and the swapper's state (no interrupted step).
  void check_step_inputs(std::span<const cpu_adam::Buffer> copies) const;
  // Commits (when commit_bytes are written, or `now`) and marks the
  // sub-groups written since the last commit as at `step`.
  void commit_groups(std::int64_t step, bool now);
  void roll_back_uncommitted(std::int64_t next);
  // Waits out every slot's I/O, ignoring errors (error paths, destructor).
  void drain_slots() noexcept;

  SwapStore* store_ = nullptr;
  cpu_adam::CpuOptimizer& optimizer_;
  std::vector<SubGroup> groups_;
  OptimizerSwapperOptions options_;
  std::vector<std::string> states_;
  std::vector<ParamGroupSettings> param_groups_;
  std::vector<std::vector<ParamGroupRange>> group_ranges_;  // per sub-group; empty: the optimizer's
  std::vector<bool> resident_;               // per sub-group: in host_, not the store
  std::vector<std::unique_ptr<Slot>> slots_;  // none when no sub-group swaps
  std::vector<std::size_t> uncommitted_;  // sub-groups written, not yet committed
  // Resident sub-groups: [group][tensor] where tensor 0 is the param; a compressed
  // moment's bytes are kept in float storage (rounded up to whole floats).
  std::vector<std::vector<std::vector<float>>> host_;
  std::int64_t step_ = 0;
  OptimizerRecovery recovery_;
  OptimizerStepStats last_stats_;
};

}  // namespace zinf::swap

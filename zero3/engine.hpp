// The ZeRO-3 engine a trainer links: it owns every parameter as shards
// across the data-parallel ranks and hands the trainer whole parameters only
// while a module runs.
//
//   register   add_module / add_param (name, shape, initial values) on every
//              rank in the same order, then finalize()
//   forward    pre_forward(m): m's params are gathered (all-gather of the
//              shards); param(p) points at the whole param until post_forward(m)
//   backward   pre_backward(m): params gathered again and a zeroed gradient
//              buffer grad(p) per param, which the trainer fills with the
//              gradient of its micro-batch's mean loss; post_backward(m)
//              reduce-scatters it into this rank's fp32 gradient shard (on
//              the worker; post_backward waits once more than
//              reduce_bucket_size gradient elements await reduction)
//   step()     after every micro-step; at each gradient_accumulation_steps-th
//              it averages the gradients over ranks and micro-steps, clips
//              them by global norm (gradient_clipping), runs the optimizer on
//              this rank's fp32 shards (cpu_adam, states in memory or on NVMe)
//              and writes the updated shards back in the working precision
//
// Parameters at or below stage3_param_persistence_threshold elements stay
// gathered on every rank (their optimizer state is still sharded). Below
// stage 3 every parameter does: stages 1 and 2 partition the optimizer
// states and the gradients (both reduce-scattered per parameter: zinf's
// stage 1 keeps no whole gradient), and stage 0 runs as stage 1 does. Shards
// live where offload_param says: on the device ("none"), in host memory
// ("cpu") or on NVMe ("nvme", read ahead through the param swapper).
// Gathers and gradient reductions run on a worker thread in the order the
// hooks ask for them, the same order on every rank; the coordinator decides
// what to gather ahead (see coordinator.hpp).
//
// Device memory comes from a DeviceCopier: CUDA with the NCCL communicator,
// or the host stand-in (device memory in RAM), which the CPU communicator
// and the tests use.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/config.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "cpu_adam/dtype.hpp"
#include "pinned_pool/pinned_pool.hpp"
#include "swap/device_copy.hpp"
#include "swap/gradient_swapper.hpp"
#include "swap/optimizer_swapper.hpp"
#include "swap/param_swapper.hpp"
#include "swap/swap_store.hpp"
#include "zero3/communicator.hpp"
#include "zero3/coordinator.hpp"

namespace zinf::zero3 {

// Fills out[0..n) with elements [offset, offset + n) of the flattened
// parameter (row-major); every rank must produce the same values.
using Initializer = std::function<void(std::uint64_t offset, std::span<float> out)>;

struct EngineOptions {
  // Device memory and host<->device copies; null: the host stand-in.
  std::shared_ptr<swap::DeviceCopier> copier;
  // The stream the trainer's kernels run on (a cudaStream_t; null: the
  // default stream). The engine orders itself after it: a gathered buffer
  // released at post_forward/post_backward is reused only once the work
  // queued on this stream before the hook is done, a gradient is reduced
  // only once the kernels that wrote it are, and step() waits for the
  // stream before it rewrites the persistent params. Gathers are complete
  // when the pre-hooks return, so kernels queued after them may read at once.
  void* compute_stream = nullptr;
  std::size_t optimizer_threads = 0;  // 0: every hardware thread
  // The trainer divides each micro-step's loss by
  // gradient_accumulation_steps before backward, as DeepSpeed's engine
  // does (so fp16 gradients have DeepSpeed's magnitude under the loss
  // scale): post_backward then divides by the world size and the loss
  // scale only. False: the gradients are those of the undivided loss.
  bool loss_divided_by_accumulation = false;
};

struct EngineStats {
  std::uint64_t gathers = 0;          // all-gathers issued
  std::uint64_t prefetched = 0;       // of which issued ahead of their hook
  std::uint64_t reduce_scatters = 0;
  std::uint64_t optimizer_steps = 0;
  std::uint64_t micro_steps = 0;
  // Trainer time blocked in pre-hooks waiting for gathers, and worker time
  // spent producing them (NVMe read + copy + all-gather): 1 - wait / busy
  // is the fraction of fetch time prefetch hid.
  std::chrono::nanoseconds fetch_wait{0};
  std::chrono::nanoseconds fetch_busy{0};
  std::chrono::nanoseconds reduce_busy{0};
  std::chrono::nanoseconds step_time{0};  // last optimizer step, incl. write-back
  double last_grad_norm = 0.0;            // before clipping
  std::uint64_t skipped_steps = 0;        // non-finite gradients: the optimizer step was skipped
  std::uint64_t order_changes = 0;        // coordinator divergences
  // Bytes this rank's swap stores (optimizer states, param shards,
  // gradients) asked the NVMe drives to write since the engine started:
  // their wear.
  std::uint64_t nvme_written_bytes = 0;
  std::uint64_t nvme_read_bytes = 0;  // and asked them to read
  // This rank's working copy held in host memory: the whole partition with
  // offload_param "cpu" (and "none" on the host stand-in); none with
  // params on NVMe or on a separate device, where they live instead.
  std::uint64_t host_working_bytes = 0;
};

struct ParamDescription {
  std::string name;
  std::vector<std::int64_t> shape;
  ModuleIndex module = 0;
  std::uint64_t elements = 0;
  std::uint64_t shard_elements = 0;  // per rank, padded
  bool persistent = false;
  bool trainable = true;             // set_trainable()
};

class Engine {
 public:
  Engine(const config::Config& config, Communicator& comm, EngineOptions options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Registration, identical on every rank, before finalize().
  ModuleIndex add_module(std::string name);
  ParamIndex add_param(ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
                       Initializer init);
  // `initial`: the whole flattened param (every rank passes the same).
  ParamIndex add_param(ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
                       std::span<const float> initial);
  // Param groups, as torch's optimizers have them: group 0 is the
  // optimizer's own settings (the config's), and every param is in it
  // until set_param_group puts it in one that add_param_group made (DeepSpeed
  // users give biases and norms no weight decay, an embedding a smaller lr).
  // Both before finalize(), the same on every rank. A group's settings may
  // change between steps (a scheduler's lr per group).
  std::size_t add_param_group(const swap::ParamGroupSettings& settings);
  void set_param_group(ParamIndex p, std::size_t group);
  void set_param_group_settings(std::size_t group, const swap::ParamGroupSettings& settings);
  const swap::ParamGroupSettings& param_group_settings(std::size_t group) const;
  std::size_t param_group_count() const { return param_groups_.size(); }
  // A frozen param (trainable false: requires_grad=False, a base model under
  // LoRA, a model served for inference) keeps only its working-precision
  // shard, as DeepSpeed keeps only its 16-bit one: no fp32 master, no
  // optimizer state, no gradient buffer and no reduction; step() leaves it
  // as it is. Before finalize(), the same on every rank.
  void set_trainable(ParamIndex p, bool trainable);
  // Cuts the shards, sets up the optimizer (and the swappers the config
  // asks for) and places each shard where offload_param says. Collective.
  void finalize();

  // Hooks, called on every rank in the same order.
  void pre_forward(ModuleIndex module);
  void post_forward(ModuleIndex module);
  void pre_backward(ModuleIndex module);
  void post_backward(ModuleIndex module);
  // After each micro-step's backward. Returns true when it ran the
  // optimizer. A non-finite gradient norm (an fp16 overflow) skips the
  // optimizer step instead: the gradients are dropped, the masters stay,
  // stats().skipped_steps counts it, and with fp16's dynamic loss scaling
  // the scale goes down. `boundary` overrides the count of
  // gradient_accumulation_steps, as DeepSpeed's
  // set_gradient_accumulation_boundary does (a trainer closing a window
  // early, at an epoch's end, or one that sizes its windows itself): true
  // runs the optimizer on what has accumulated, false only accumulates.
  // The gradients stay divided by gradient_accumulation_steps either way,
  // as DeepSpeed's loss is.
  bool step(std::optional<bool> boundary = std::nullopt);
  // Forgets the gradients accumulated since the last optimizer step
  // (DeepSpeed's zero_grad at stages 0 and 1). Between micro-steps.
  void drop_gradients();
  // Releases every gathered param not persistent and frees the idle device
  // buffers kept for reuse (DeepSpeed's empty_partition_cache: memory for
  // a phase that is not training). Between micro-steps.
  void empty_partition_cache();
  // What the trainer multiplies its loss by before backward (fp16's loss
  // scale; 1 otherwise). The engine divides the gradients by it.
  double loss_scale() const { return loss_scale_; }
  // The optimizer's learning rate for the next steps (a scheduler's): that
  // of every param group without an lr of its own. The config's
  // optimizer.params.lr until set. After finalize().
  void set_learning_rate(double lr);
  double learning_rate() const;
  // The trainer moved to another stream (see EngineOptions::compute_stream).
  void set_compute_stream(void* stream) { options_.compute_stream = stream; }

  // The whole parameter in the working precision (device memory), valid
  // between a pre- and post-hook of its module, always for persistent ones.
  // Read-only to the trainer: a persistent param's buffer holds this rank's
  // working shard itself (offload_param none on a device), and set_master
  // is how values change.
  void* param(ParamIndex p);
  const float* param_f32(ParamIndex p);  // fp32 training only
  // The gradient buffer (fp32, the param's elements, device memory), valid
  // between pre_backward and post_backward of its module.
  float* grad(ParamIndex p);

  // One param's fp32 values, as DeepSpeed's safe_get_full_* / safe_get_local_*
  // and their setters reach them: `what` is "param" (the master weights; a
  // frozen param's working values, widened), "grad" (the gradient
  // accumulated since the last optimizer step, as the step will take it
  // before clipping: summed over micro-steps, averaged over ranks, divided
  // by gradient_accumulation_steps and the loss scale; zeros before any
  // backward; between micro-steps, read from NVMe with the gradients there)
  // or an optimizer state (OptimizerSwapper::state_names(): "exp_avg",
  // "exp_avg_sq"). A frozen param has no gradient or state, and an unknown
  // name is Error{invalid} naming the states there are.
  //
  // gather_values: the whole param (all-gathered). set_values: every rank
  // passes the same whole values and keeps its shard; the other tensors
  // stay (the moments, when the master changes), and a new master is
  // written to the working copies where offload_param says. The local_
  // forms take or give this rank's shard alone (shard_elements, zeros past
  // the param's end). All collective but local_values, which also reads
  // "working": this rank's shard of the working copy (DeepSpeed's
  // ds_tensor), widened to fp32, frozen params too.
  std::vector<float> gather_values(ParamIndex p, std::string_view what);
  void set_values(ParamIndex p, std::string_view what, std::span<const float> whole);
  std::vector<float> local_values(ParamIndex p, std::string_view what);
  void set_local_values(ParamIndex p, std::string_view what, std::span<const float> shard);
  std::vector<float> gather_master(ParamIndex p) { return gather_values(p, "param"); }
  void set_master(ParamIndex p, std::span<const float> whole) { set_values(p, "param", whole); }

  // Resumable sharded state: every rank writes its shards and optimizer
  // state into `dir` (created); rank 0 adds the description. With
  // stage3_gather_16bit_weights_on_model_save, rank 0 also writes the whole
  // model in the working precision (16-bit) as safetensors. Collective.
  void save_checkpoint(const std::filesystem::path& dir);
  // Restores a checkpoint written with the same world size and parameters;
  // a mismatch or a corrupt file is an error naming the file. Collective.
  // `optimizer_states` false takes the weights only: the optimizer starts
  // afresh (zero moments, step 0), as DeepSpeed's load_optimizer_states=False
  // and load_module_only do for fine-tuning from a checkpoint.
  void load_checkpoint(const std::filesystem::path& dir, bool optimizer_states = true);

  const ParamDescription& describe(ParamIndex p) const;
  std::size_t param_count() const { return params_.size(); }
  EngineStats stats() const;
  const Coordinator& coordinator() const { return *coordinator_; }
  // Bytes of idle device buffers the engine keeps for reuse (at most
  // stage3_max_live_parameters' worth).
  std::uint64_t cached_device_bytes() const { return buffers_.idle_bytes(); }
  // The pinned pool behind the swappers (offload to NVMe): its bytes (0
  // without one) and whether they are page-locked (pin_memory false, or a
  // memlock limit too low, leaves them pageable).
  std::uint64_t pool_bytes() const { return pool_ ? pool_->stats().capacity_bytes : 0; }
  bool pool_page_locked() const { return pool_ && pool_->page_locked(); }
  std::int64_t optimizer_step() const { return optimizer_step_; }
  cpu_adam::DType working_dtype() const { return working_; }

 private:
  enum class State { not_available, in_flight, available };
  struct Param {
    ParamDescription d;
    Initializer init;
    std::uint64_t partition_offset = 0;  // of this rank's shard in the partition
    State state = State::not_available;
    std::uint64_t ready_ticket = 0;      // the gather that makes it available
    void* gathered = nullptr;            // device: shard_elements x world, working precision
    void* device_shard = nullptr;        // offload_param "none": this rank's shard on the device
    float* grad = nullptr;               // device: shard_elements x world fp32, during backward
    std::string key;                     // offload_param "nvme": the param swapper's key
    std::size_t param_group = 0;         // set_param_group()
  };

  Param& at(ParamIndex p);
  void require_finalized(const char* what) const;
  void fetch_module(ModuleIndex module, Phase phase);
  void start_fetch(ParamIndex p, bool prefetch);
  void wait_available(ParamIndex p);
  void release_after_use(ModuleIndex module);
  void release(ParamIndex p);
  void release_all_unpersisted();
  void gather_into(Param& param, void* gathered);
  // Writes the shards where offload_param says and gathers the persistent
  // ones; `frozen_too` false leaves the frozen params' (unchanged by a step).
  void place_shards(bool frozen_too = true);
  // A param's working shard widened to fp32 (from the param store when
  // offload_param is nvme).
  void read_working(const Param& param, std::span<float> out);
  // One param's working shard, its bytes copied out.
  std::vector<std::byte> working_shard(const Param& param);
  // Working-precision bytes for partition elements from `offset` on. With
  // offload_param nvme they go to the param store, where the working copy
  // lives with no image in host memory: a shard the bytes cover whole is
  // written at once, a piece of one waits in `assembling_` for the rest
  // (the next sub-group), and flush_working() completes what is left from
  // the stored shard. With offload_param none on a device the CPU cannot
  // read (a GPU) they are copied into the device shards, the working
  // copy's only home. Elsewhere they land in working_partition_.
  void store_working(std::uint64_t offset, std::span<const std::byte> bytes);
  void flush_working();
  bool working_on_nvme() const { return param_swapper_ != nullptr; }
  bool working_in_host() const { return !working_on_nvme() && !working_on_device_; }
  void set_param_group_ranges();
  std::uint64_t live_elements() const;
  // Adds scale * values to the gradient partition from element `offset`
  // on: in memory, or through the gradient swapper (a piece per sub-group,
  // the highest first: backward reduces the partition from its end).
  void accumulate_gradient(std::uint64_t offset, std::span<const float> values, float scale);
  // Calls visit(g, from, to) for each sub-group g that holds part of this
  // rank's shard of `param`: partition elements [from, to).
  template <typename Visit>
  void for_each_shard_piece(const Param& param, Visit visit) const;
  // The param of a gather/set_values call, once the engine is finalized
  // and idle; refuses values it does not have (see gather_values).
  const Param& values_param(ParamIndex p, std::string_view what, const char* call);
  // This rank's shard (zeros past the param's end) from `values`, whose
  // element `first` is the shard's first.
  std::vector<float> shard_from(const Param& param, std::span<const float> values, std::uint64_t first) const;
  std::vector<std::string> optimizer_state_names() const;
  // This rank's shard of one of `param`'s tensors, read and written.
  std::vector<float> read_shard(const Param& param, std::string_view what);
  void write_shard(const Param& param, std::string_view what, std::span<const float> shard);
  // Every gradient zero again (after a step, a skipped one, a load).
  void clear_gradients();

  std::uint64_t submit(std::function<void()> body);
  void wait_op(std::uint64_t ticket);
  void drain();
  void worker_loop();
  void throw_if_failed();

  std::uint64_t element_bytes() const;

  // Collectives on device buffers (NCCL's contract). With a host-memory
  // communicator (Gloo) and a device the CPU cannot read (a GPU, the strict
  // stand-in) the bytes go through host copies.
  void device_all_gather(const void* send, void* recv, std::uint64_t bytes_per_rank);
  void device_reduce_scatter(const float* send, float* recv, std::uint64_t count_per_rank);
  // Collectives on host buffers (norms, checkpoints): through device
  // buffers when the communicator only takes device memory.
  void host_all_gather(const void* send, void* recv, std::uint64_t bytes_per_rank);
  void host_all_reduce(float* data, std::uint64_t count, ReduceOp op);
  // Host <-> device, waited for.
  void copy_to_device(void* device, const void* host, std::uint64_t bytes);
  void copy_to_host(void* host, const void* device, std::uint64_t bytes);
  // Writes the working-precision copy of `master` at partition element `offset`.
  void set_working(std::uint64_t offset, std::span<const float> master);

  // Device buffers by size, reused: gathers and gradient buffers come and
  // go every layer, and a fresh allocation each time costs page faults (host
  // stand-in) or a synchronising cudaFree (CUDA). Idle buffers are kept up
  // to `cap` bytes (more are freed at once); when the device runs out, the
  // idle ones are freed and the allocation tried again.
  class BufferCache {
   public:
    void set_copier(swap::DeviceCopier* copier) { copier_ = copier; }
    void set_cap(std::uint64_t bytes) { cap_ = bytes; }
    void* acquire(std::uint64_t bytes);
    // `in_use_until`: work that may still use the buffer (the trainer's
    // stream); it is waited for before the buffer is handed out or freed.
    void release(void* buffer, std::uint64_t bytes, swap::CopyTicket in_use_until = {}) noexcept;
    std::uint64_t idle_bytes() const;
    void free_all_idle();
    ~BufferCache();

    // A buffer held for one scope (a fresh one, or one adopted from the
    // caller), back in the cache however the scope ends.
    class Scoped {
     public:
      Scoped(BufferCache& cache, std::uint64_t bytes) : cache_(cache), bytes_(bytes), buffer_(cache.acquire(bytes)) {}
      Scoped(BufferCache& cache, void* adopted, std::uint64_t bytes)
          : cache_(cache), bytes_(bytes), buffer_(adopted) {}
      ~Scoped() { cache_.release(buffer_, bytes_); }
      Scoped(const Scoped&) = delete;
      Scoped& operator=(const Scoped&) = delete;
      template <class T = void>
      T* get() const { return static_cast<T*>(buffer_); }

     private:
      BufferCache& cache_;
      std::uint64_t bytes_;
      void* buffer_;
    };

   private:
    void free_idle();  // with mutex_ held
    void free_now(void* buffer, swap::CopyTicket in_use_until) noexcept;
    struct Idle {
      void* buffer;
      swap::CopyTicket in_use_until;
    };
    swap::DeviceCopier* copier_ = nullptr;
    std::uint64_t cap_ = UINT64_MAX;
    std::uint64_t idle_ = 0;
    mutable std::mutex mutex_;
    std::unordered_map<std::uint64_t, std::vector<Idle>> free_;
  };
  // A ticket for the work the trainer queued on its stream so far.
  swap::CopyTicket trainer_work();

  config::Config config_;
  Communicator& comm_;
  EngineOptions options_;
  BufferCache buffers_;  // after options_ (the copier): freed before it
  cpu_adam::DType working_;
  bool finalized_ = false;

  std::vector<std::string> modules_;
  std::vector<std::vector<ParamIndex>> params_of_module_;
  std::vector<std::unique_ptr<Param>> params_;
  std::vector<swap::ParamGroupSettings> param_groups_{1};  // [0]: the optimizer's own
  std::unique_ptr<Coordinator> coordinator_;

  // This rank's partition: every param's shard, concatenated, the trainable
  // params' first: [0, optimizer_elements_) is what the optimizer steps.
  std::uint64_t partition_elements_ = 0;
  std::uint64_t optimizer_elements_ = 0;
  std::vector<ParamIndex> trainable_order_;     // the trainable params, in partition order
  double learning_rate_ = 0.0;                  // the optimizer's (set_learning_rate)
  // fp32, the trainable part, accumulated over micro-steps; empty when the
  // gradient swapper keeps it on NVMe (offload_optimizer.gradients).
  std::vector<float> grad_partition_;
  // Working precision, the whole partition: the "cpu" shards, and the
  // "none" ones where device memory is host memory (the host stand-in);
  // empty with offload_param nvme, and with "none" on a separate device,
  // where the device shards are the working copy (working_on_device_).
  std::vector<std::byte> working_partition_;
  bool working_on_device_ = false;
  struct Assembly {
    std::vector<std::byte> bytes;  // the shard
    std::vector<std::pair<std::uint64_t, std::uint64_t>> pieces;  // byte ranges written
    std::uint64_t filled = 0;
  };
  std::unordered_map<const Param*, Assembly> assembling_;
  std::vector<float> reduce_scratch_;           // the worker's, for reduced shards
  std::vector<swap::SubGroup> sub_groups_;
  std::vector<std::uint64_t> sub_group_begin_;  // each sub-group's first partition element

  std::unique_ptr<cpu_adam::CpuOptimizer> cpu_optimizer_;
  std::unique_ptr<PinnedPool> pool_;
  std::unique_ptr<swap::SwapStore> optimizer_store_;
  std::unique_ptr<swap::SwapStore> param_store_;
  std::unique_ptr<swap::SwapStore> gradient_store_;
  std::unique_ptr<swap::GradientSwapper> gradient_swapper_;
  std::unique_ptr<swap::OptimizerSwapper> optimizer_;  // null when every param is frozen
  std::unique_ptr<swap::ParamSwapper> param_swapper_;

  std::int64_t micro_step_ = 0;
  std::int64_t accumulated_micro_steps_ = 0;  // since the last boundary
  std::int64_t optimizer_step_ = 0;
  double loss_scale_ = 1.0;
  std::uint64_t good_steps_ = 0;       // since the last scale change
  std::uint64_t hysteresis_left_ = 1;  // overflows before the scale halves

  // The worker: gathers and reductions in submission order.
  mutable std::mutex mutex_;
  std::condition_variable queued_;
  std::condition_variable finished_;
  std::deque<std::function<void()>> queue_;
  std::uint64_t submitted_ = 0;
  std::uint64_t completed_ = 0;
  std::exception_ptr failure_;
  bool stopping_ = false;
  // Gradient reductions submitted and maybe not done (trainer thread only).
  struct PendingReduction {
    std::uint64_t ticket = 0;
    std::uint64_t elements = 0;
  };
  std::deque<PendingReduction> pending_reductions_;
  std::uint64_t pending_reduction_elements_ = 0;
  std::thread worker_;

  mutable std::mutex stats_mutex_;
  EngineStats stats_;
};

}  // namespace zinf::zero3

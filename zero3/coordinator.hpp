// The prefetch coordinator: which parameters to gather ahead of use, and
// which to keep after use, from the order modules ran in.
//
// The first micro-step is recorded: every pre-forward and pre-backward hook
// appends (module, phase) to the trace. Later micro-steps follow it: at each
// hook the coordinator checks the module is the one the trace expects and
// names the parameters of the modules after it, in trace order, up to
// stage3_prefetch_bucket_size elements and never past
// stage3_max_live_parameters gathered elements in all. After a module runs,
// a parameter is kept gathered when the trace uses it again within
// stage3_max_reuse_distance elements of other parameters, else released.
// When a hook does not match the trace (the model took another branch), the
// coordinator logs it once, fetches on demand for the rest of that
// micro-step, and records a new trace in the next one.
//
// Pure bookkeeping: no memory, no collectives, no threads; the engine
// applies its answers. Every rank makes the same decisions from the same
// hooks, so the collectives the engine issues stay in step across ranks.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace zinf::zero3 {

using ParamIndex = std::uint32_t;
using ModuleIndex = std::uint32_t;

enum class Phase : std::uint8_t { forward, backward };

struct ModuleEvent {
  ModuleIndex module = 0;
  Phase phase = Phase::forward;
  bool operator==(const ModuleEvent&) const = default;
};

struct CoordinatorOptions {
  std::uint64_t prefetch_bucket_elements = 50000000;  // stage3_prefetch_bucket_size
  std::uint64_t max_live_elements = 1000000000;       // stage3_max_live_parameters
  std::uint64_t max_reuse_distance = 1000000000;      // stage3_max_reuse_distance
};

class Coordinator {
 public:
  enum class Mode { recording, following, on_demand };

  // params_of_module[m]: the parameters module m uses (fetched at its
  // hooks); elements[p]: p's gathered size; persistent params are never
  // fetched, prefetched or released.
  Coordinator(std::vector<std::vector<ParamIndex>> params_of_module,
              std::vector<std::uint64_t> elements, std::vector<bool> persistent,
              CoordinatorOptions options);

  // Ends the current micro-step (finishing a recording) and starts the next.
  void begin_micro_step();

  // A pre-hook ran. `is_live(p)` is true for params gathered or in flight,
  // `live_elements` their total. Returns the params to start gathering now
  // after the module's own, in the order they will be needed.
  std::vector<ParamIndex> on_pre_hook(ModuleEvent event,
                                      const std::function<bool(ParamIndex)>& is_live,
                                      std::uint64_t live_elements);
  // After the module of the last pre-hook ran: should `param` (one of its
  // params) stay gathered?
  bool keep_after_use(ParamIndex param) const;

  Mode mode() const { return mode_; }
  const std::vector<ModuleEvent>& trace() const { return trace_; }
  std::uint64_t divergences() const { return divergences_; }

 private:
  void finish_trace();

  std::vector<std::vector<ParamIndex>> params_of_module_;
  std::vector<std::uint64_t> elements_;
  std::vector<bool> persistent_;
  CoordinatorOptions options_;
  Mode mode_ = Mode::recording;
  std::vector<ModuleEvent> trace_;
  std::vector<ModuleEvent> recording_;
  // keep_[i][k]: keep the k-th param of trace_[i]'s module after event i.
  std::vector<std::vector<bool>> keep_;
  std::size_t position_ = 0;   // index of the next expected event
  bool last_hook_followed_ = false;
  std::uint64_t divergences_ = 0;
  bool logged_divergence_ = false;
};

}  // namespace zinf::zero3

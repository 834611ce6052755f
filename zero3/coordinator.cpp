#include "zero3/coordinator.hpp"

#include <algorithm>
#include <unordered_set>

#include <fmt/format.h>

#include "core/error.hpp"
#include "core/log.hpp"

namespace zinf::zero3 {

Coordinator::Coordinator(std::vector<std::vector<ParamIndex>> params_of_module,
                         std::vector<std::uint64_t> elements, std::vector<bool> persistent,
                         CoordinatorOptions options)
    : params_of_module_(std::move(params_of_module)),
      elements_(std::move(elements)),
      persistent_(std::move(persistent)),
      options_(options) {
  if (persistent_.size() != elements_.size()) {
    throw Error(ErrorKind::invalid, "coordinator: one persistence flag per parameter");
  }
  for (const auto& params : params_of_module_) {
    for (ParamIndex p : params) {
      if (p >= elements_.size()) throw Error(ErrorKind::invalid, "coordinator: parameter index out of range");
    }
  }
}

void Coordinator::begin_micro_step() {
  if (mode_ == Mode::recording) {
    if (!recording_.empty()) {
      trace_ = std::move(recording_);
      finish_trace();
      mode_ = Mode::following;
    }
  } else if (mode_ == Mode::on_demand) {
    // The order changed: record it again.
    mode_ = Mode::recording;
    trace_.clear();
    keep_.clear();
  }
  recording_.clear();
  position_ = 0;
  last_hook_followed_ = false;
}

void Coordinator::finish_trace() {
  keep_.assign(trace_.size(), {});
  for (std::size_t i = 0; i < trace_.size(); ++i) {
    const auto& params = params_of_module_[trace_[i].module];
    keep_[i].assign(params.size(), false);
    for (std::size_t k = 0; k < params.size(); ++k) {
      const ParamIndex p = params[k];
      if (persistent_[p]) continue;
      // Elements of other params fetched between this use and the next one.
      std::uint64_t distance = 0;
      for (std::size_t j = i + 1; j < trace_.size(); ++j) {
        const auto& later = params_of_module_[trace_[j].module];
        if (std::find(later.begin(), later.end(), p) != later.end()) {
          keep_[i][k] = distance <= options_.max_reuse_distance;
          break;
        }
        for (ParamIndex q : later) {
          if (!persistent_[q]) distance += elements_[q];
        }
        if (distance > options_.max_reuse_distance) break;
      }
    }
  }
}

std::vector<ParamIndex> Coordinator::on_pre_hook(ModuleEvent event,
                                                 const std::function<bool(ParamIndex)>& is_live,
                                                 std::uint64_t live_elements) {
  if (event.module >= params_of_module_.size()) {
    throw Error(ErrorKind::invalid, fmt::format("module index {} was never registered", event.module));
  }
  last_hook_followed_ = false;
  if (mode_ == Mode::recording) {
    recording_.push_back(event);
    return {};
  }
  if (mode_ == Mode::on_demand) return {};
  if (position_ >= trace_.size() || !(trace_[position_] == event)) {
    ++divergences_;
    if (!logged_divergence_) {
      logged_divergence_ = true;
      const std::string expected =
          position_ < trace_.size()
              ? fmt::format("module {} {}", trace_[position_].module,
                            trace_[position_].phase == Phase::forward ? "forward" : "backward")
              : std::string("the end of the micro-step");
      log().warn(fmt::format("zero3: module {} {} ran where the recorded order expected {}; "
                           "fetching parameters on demand and re-recording the order (logged once)",
                           event.module, event.phase == Phase::forward ? "forward" : "backward",
                           expected));
    }
    mode_ = Mode::on_demand;
    return {};
  }
  const std::size_t here = position_++;
  last_hook_followed_ = true;
  if (options_.prefetch_bucket_elements == 0) return {};  // prefetch off

  std::vector<ParamIndex> chosen;
  std::unordered_set<ParamIndex> seen(params_of_module_[event.module].begin(),
                                      params_of_module_[event.module].end());
  std::uint64_t bucket = 0;
  std::uint64_t live = live_elements;
  for (ParamIndex p : params_of_module_[event.module]) {
    if (!persistent_[p] && !is_live(p)) live += elements_[p];  // about to be fetched
  }
  for (std::size_t j = here + 1; j < trace_.size(); ++j) {
    for (ParamIndex p : params_of_module_[trace_[j].module]) {
      if (persistent_[p] || !seen.insert(p).second || is_live(p)) continue;
      const std::uint64_t e = elements_[p];
      if (bucket > 0 && bucket + e > options_.prefetch_bucket_elements) return chosen;
      if (live + e > options_.max_live_elements) return chosen;
      chosen.push_back(p);
      bucket += e;
      live += e;
    }
    if (bucket >= options_.prefetch_bucket_elements) break;
  }
  return chosen;
}

bool Coordinator::keep_after_use(ParamIndex param) const {
  if (!last_hook_followed_ || position_ == 0) return false;
  const std::size_t i = position_ - 1;
  const auto& params = params_of_module_[trace_[i].module];
  for (std::size_t k = 0; k < params.size(); ++k) {
    if (params[k] == param) return keep_[i][k];
  }
  return false;
}

}  // namespace zinf::zero3

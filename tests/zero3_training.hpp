// The zero3 training scenario the engine tests share (host and GPU suites):
// a tiny MLP on the engine, its config, and the plain single-process
// training it must agree with.
#pragma once

#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "core/config.hpp"
#include "cpu_adam/cpu_adam.hpp"
#include "swap/swap_config.hpp"
#include "tiny_model.hpp"
#include "swap/strict_device.hpp"
#include "zero3/engine.hpp"

namespace zinf::zero3 {

using testing::TinyModelShape;


// How the trainer reaches the engine's memory: plain pointers with the host
// stand-in, copies with a GPU or the strict stand-in.
struct DeviceAccess {
  std::function<void(void* out, const void* device, std::size_t bytes)> bytes_to_host =
      [](void* out, const void* device, std::size_t bytes) { std::memcpy(out, device, bytes); };
  std::function<void(float* device, const std::vector<float>& in)> to_device =
      [](float* device, const std::vector<float>& in) { std::memcpy(device, in.data(), in.size() * sizeof(float)); };

  void to_host(std::vector<float>& out, const void* device, std::size_t count) const {
    out.resize(count);
    bytes_to_host(out.data(), device, count * sizeof(float));
  }
};

// A trainer whose kernels run on the strict stand-in's compute stream:
// gradients are written by kernels that land late (nothing waits for them
// before the post-hook), reads wait for the stream as a trainer copying a
// value to the host does.
inline DeviceAccess stream_access(std::shared_ptr<swap::StrictDevice> device, void* stream) {
  DeviceAccess access;
  access.bytes_to_host = [device, stream](void* out, const void* memory, std::size_t bytes) {
    device->launch(stream, [=] { std::memcpy(out, device->access(memory, bytes, "kernel read"), bytes); });
    device->synchronize(stream);
  };
  access.to_device = [device, stream](float* memory, const std::vector<float>& in) {
    auto values = std::make_shared<std::vector<float>>(in);
    device->launch(stream, [=] {
      std::memcpy(device->access(memory, values->size() * sizeof(float), "kernel write"), values->data(),
                  values->size() * sizeof(float));
    });
  };
  return access;
}

// Access through a copier's own copies (CUDA, the strict stand-in).
inline DeviceAccess copier_access(std::shared_ptr<swap::DeviceCopier> copier) {
  DeviceAccess access;
  access.bytes_to_host = [copier](void* out, const void* device, std::size_t bytes) {
    copier->wait(copier->to_host(static_cast<std::byte*>(out), device, bytes));
  };
  access.to_device = [copier](float* device, const std::vector<float>& in) {
    copier->wait(copier->to_device(device, reinterpret_cast<const std::byte*>(in.data()), in.size() * sizeof(float)));
  };
  return access;
}

struct TrainingRun {
  int world = 1;
  int stage = 3;
  int steps = 4;
  std::string offload_param = "none";      // none | cpu | nvme
  std::string offload_optimizer = "none";  // none | cpu | nvme
  int accumulation = 1;
  double clipping = 0.0;
  std::uint64_t persistence = 100;  // b and v (24) persist, W (576) is sharded
  std::string nvme_dir;
  std::string gradients;  // offload_optimizer.gradients: "" (the default), "cpu" or "nvme"
  std::uint64_t sub_group_size = 500;
  // offload_optimizer.min_swap_bytes with "nvme": 0 swaps every sub-group,
  // as these small models' would not by default (each under 1 MiB: the
  // default keeps them in host memory, as DeepSpeed does); nullopt leaves
  // the default.
  std::optional<std::uint64_t> min_swap_bytes = 0;
  // Where the engine's device memory is: "host" (the lenient stand-in),
  // "strict" (the strict stand-in with its NCCL-like device-memory
  // communicator), "strict-gloo" (the strict stand-in with Gloo's host
  // memory, so every collective goes through host copies).
  std::string device = "host";
  TinyModelShape shape;
};

std::string config_json(const TrainingRun& run) {
  const auto offload = [&](const std::string& device, bool param) {
    if (device == "none") return std::string();
    std::string block = fmt::format(R"("{}": {{"device": "{}")", param ? "offload_param" : "offload_optimizer", device);
    if (device == "nvme") block += fmt::format(R"(, "nvme_path": "{}")", run.nvme_dir);
    if (device == "nvme" && !param && run.min_swap_bytes) {
      block += fmt::format(R"(, "min_swap_bytes": {})", *run.min_swap_bytes);
    }
    if (!param && !run.gradients.empty()) block += fmt::format(R"(, "gradients": "{}")", run.gradients);
    return block + "},";
  };
  return fmt::format(R"({{
    "gradient_accumulation_steps": {},
    "gradient_clipping": {},
    "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "betas": [0.9, 0.99], "weight_decay": 0.01}}}},
    "zero_optimization": {{
      "stage": {}, {} {}
      "stage3_param_persistence_threshold": {},
      "sub_group_size": {},
      "stage3_prefetch_bucket_size": 1000
    }}}})",
                     run.accumulation, run.clipping, run.stage, offload(run.offload_param, true),
                     offload(run.offload_optimizer, false), run.persistence, run.sub_group_size);
}

// Registration order: W0, b0, W1, b1, ..., v.
struct TinyOnEngine {
  DeviceAccess access;
  // Multiplies every gradient handed to the engine: fp16's loss scale (the
  // trainer scales its loss), or infinity to make an overflow.
  float grad_multiplier = 1.0f;
  std::vector<ModuleIndex> layer_modules;
  ModuleIndex head = 0;
  std::vector<ParamIndex> W, b;
  ParamIndex v = 0;

  TinyOnEngine(Engine& engine, const TinyModelShape& shape, DeviceAccess device_access = {})
      : access(std::move(device_access)) {
    const std::int64_t n = shape.width;
    for (int l = 0; l < shape.layers; ++l) {
      layer_modules.push_back(engine.add_module(fmt::format("layer{}", l)));
      W.push_back(engine.add_param(layer_modules[l], fmt::format("layer{}.W", l), {n, n},
                                   testing::tiny_initial(shape, 0, l)));
      b.push_back(engine.add_param(layer_modules[l], fmt::format("layer{}.b", l), {n},
                                   testing::tiny_initial(shape, 1, l)));
    }
    head = engine.add_module("head");
    v = engine.add_param(head, "head.v", {n}, testing::tiny_initial(shape, 2, 0));
  }

  // One micro-step: forward, backward through the hooks; returns the loss.
  std::vector<float> read(Engine& engine, ParamIndex p) const {
    std::vector<float> values;
    const std::uint64_t n = engine.describe(p).elements;
    if (engine.working_dtype() != cpu_adam::DType::f32) {
      // 16-bit training: widen the gathered values.
      std::vector<std::uint16_t> half(n);
      access.bytes_to_host(half.data(), engine.param(p), n * sizeof(std::uint16_t));
      values.resize(n);
      for (std::uint64_t i = 0; i < n; ++i) {
        values[i] = engine.working_dtype() == cpu_adam::DType::bf16 ? cpu_adam::bf16_to_float(half[i])
                                                                     : cpu_adam::f16_to_float(half[i]);
      }
      return values;
    }
    access.to_host(values, engine.param_f32(p), n);
    return values;
  }

  float micro_step(Engine& engine, const TinyModelShape& shape, std::uint64_t batch_index) {
    std::vector<float> x, t;
    testing::tiny_batch(shape, batch_index, x, t);
    std::vector<std::vector<float>> h{x};
    for (int l = 0; l < shape.layers; ++l) {
      engine.pre_forward(layer_modules[l]);
      std::vector<float> out;
      testing::tiny_layer_forward(shape, read(engine, W[l]).data(), read(engine, b[l]).data(), h.back(), out);
      h.push_back(std::move(out));
      engine.post_forward(layer_modules[l]);
    }
    engine.pre_forward(head);
    engine.post_forward(head);
    engine.pre_backward(head);
    std::vector<float> dh;
    std::vector<float> dv(shape.width);
    const float loss = testing::tiny_head(shape, read(engine, v).data(), h.back(), t, dv.data(), dh);
    scaled(dv);
    access.to_device(engine.grad(v), dv);
    engine.post_backward(head);
    for (int l = shape.layers - 1; l >= 0; --l) {
      engine.pre_backward(layer_modules[l]);
      std::vector<float> din, dW(shape.width * shape.width), db(shape.width);
      testing::tiny_layer_backward(shape, read(engine, W[l]).data(), h[l], h[l + 1], dh, dW.data(), db.data(), din);
      scaled(dW);
      scaled(db);
      access.to_device(engine.grad(W[l]), dW);
      access.to_device(engine.grad(b[l]), db);
      dh = std::move(din);
      engine.post_backward(layer_modules[l]);
    }
    return loss;
  }

  void scaled(std::vector<float>& grad) const {
    if (grad_multiplier == 1.0f) return;
    for (float& g : grad) g *= grad_multiplier;
  }

  std::vector<std::vector<float>> masters(Engine& engine) const {
    std::vector<std::vector<float>> all;
    for (std::size_t l = 0; l < W.size(); ++l) {
      all.push_back(engine.gather_master(W[l]));
      all.push_back(engine.gather_master(b[l]));
    }
    all.push_back(engine.gather_master(v));
    return all;
  }
};

std::uint64_t batch_index(const TrainingRun& run, int step, int micro, int rank) {
  return (static_cast<std::uint64_t>(step) * run.accumulation + micro) * run.world + rank;
}

// Plain data-parallel training written out in one process: the mean of the
// gradients of every rank's micro-batches, the same clipping rule and the
// same Adam.
std::vector<std::vector<float>> train_reference(const TrainingRun& run, const config::Config& config,
                                               std::vector<double>* norms = nullptr) {
  const auto& shape = run.shape;
  std::vector<std::vector<float>> params;  // W0, b0, ..., v
  for (int l = 0; l < shape.layers; ++l) {
    params.push_back(testing::tiny_initial(shape, 0, l));
    params.push_back(testing::tiny_initial(shape, 1, l));
  }
  params.push_back(testing::tiny_initial(shape, 2, 0));
  std::vector<std::vector<float>> m, v;
  for (const auto& p : params) {
    m.emplace_back(p.size(), 0.0f);
    v.emplace_back(p.size(), 0.0f);
  }
  cpu_adam::CpuOptimizer optimizer(1);
  const auto adam = swap::optimizer_swapper_options(config).optimizer.adam;
  const int micro_batches = run.world * run.accumulation;
  for (int step = 0; step < run.steps; ++step) {
    std::vector<std::vector<float>> sum;
    for (const auto& p : params) sum.emplace_back(p.size(), 0.0f);
    for (int micro = 0; micro < run.accumulation; ++micro) {
      for (int rank = 0; rank < run.world; ++rank) {
        std::vector<float> x, t;
        testing::tiny_batch(shape, batch_index(run, step, micro, rank), x, t);
        std::vector<std::vector<float>> h{x};
        for (int l = 0; l < shape.layers; ++l) {
          std::vector<float> out;
          testing::tiny_layer_forward(shape, params[2 * l].data(), params[2 * l + 1].data(), h.back(), out);
          h.push_back(std::move(out));
        }
        std::vector<std::vector<float>> grads;
        for (const auto& p : params) grads.emplace_back(p.size(), 0.0f);
        std::vector<float> dh;
        testing::tiny_head(shape, params.back().data(), h.back(), t, grads.back().data(), dh);
        for (int l = shape.layers - 1; l >= 0; --l) {
          std::vector<float> din;
          testing::tiny_layer_backward(shape, params[2 * l].data(), h[l], h[l + 1], dh, grads[2 * l].data(),
                                       grads[2 * l + 1].data(), din);
          dh = std::move(din);
        }
        for (std::size_t k = 0; k < params.size(); ++k) {
          for (std::size_t i = 0; i < params[k].size(); ++i) sum[k][i] += grads[k][i] / micro_batches;
        }
      }
    }
    double squares = 0;
    for (const auto& g : sum) {
      for (float e : g) squares += static_cast<double>(e) * e;
    }
    if (norms) norms->push_back(std::sqrt(squares));
    if (run.clipping > 0) {
      const double coefficient = run.clipping / (std::sqrt(squares) + 1e-6);
      if (coefficient < 1.0) {
        for (auto& g : sum) {
          for (float& e : g) e *= static_cast<float>(coefficient);
        }
      }
    }
    std::vector<cpu_adam::TensorState> states;
    for (std::size_t k = 0; k < params.size(); ++k) {
      cpu_adam::TensorState s;
      s.param = {params[k].data(), params[k].size(), cpu_adam::DType::f32};
      s.grad = {sum[k].data(), sum[k].size(), cpu_adam::DType::f32};
      s.exp_avg = {m[k].data(), m[k].size(), cpu_adam::DType::f32};
      s.exp_avg_sq = {v[k].data(), v[k].size(), cpu_adam::DType::f32};
      states.push_back(s);
    }
    optimizer.adam_step(adam, step + 1, states);
  }
  return params;
}

// fp32 tolerance: the engine sums gradients over ranks in another order.
void expect_close(const std::vector<std::vector<float>>& got, const std::vector<std::vector<float>>& want,
                  const std::string& what) {
  if (got.size() != want.size()) throw std::runtime_error(what + ": tensor count differs");
  double worst = 0;
  for (std::size_t k = 0; k < got.size(); ++k) {
    if (got[k].size() != want[k].size()) throw std::runtime_error(what + ": tensor size differs");
    for (std::size_t i = 0; i < got[k].size(); ++i) {
      const double error = std::fabs(got[k][i] - want[k][i]) / (1.0 + std::fabs(want[k][i]));
      worst = std::max(worst, error);
      if (!(error <= 2e-5)) {
        throw std::runtime_error(fmt::format("{}: tensor {} element {}: {} vs reference {}", what, k, i,
                                             got[k][i], want[k][i]));
      }
    }
  }
}


}  // namespace zinf::zero3

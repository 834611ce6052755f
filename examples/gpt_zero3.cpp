// A small GPT-style language model trained on synthetic sequences through
// zinf's ZeRO-3 engine, with libtorch doing the arithmetic.
//
//   gpt_zero3 --config ds_config.json --world-size 2 --steps 20
//
// Run it alone and it starts --world-size local ranks itself (torchrun's
// variables, a free port on 127.0.0.1); run it under torchrun (or any
// launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and it joins
// that job. Rank 0 prints one line per optimizer step with the loss averaged
// over every rank's micro-batches.
//
// Each transformer block is one zinf module. The forward pass gathers a
// block's parameters, runs it without autograd and keeps only its input;
// the backward pass gathers it again, re-runs it with autograd from the
// saved input (activation checkpointing) and hands the parameter gradients
// to the engine, which reduce-scatters them into each rank's shard.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <torch/torch.h>

#include "core/config.hpp"
#include "core/error.hpp"
#include "swap/swap_config.hpp"
#include "zero3/communicator.hpp"
#include "zero3/engine.hpp"
#include "zero3/launch.hpp"

namespace {

using zinf::zero3::Engine;
using zinf::zero3::ModuleIndex;
using zinf::zero3::ParamIndex;

struct ModelShape {
  int vocab = 64;
  int context = 32;
  // Wide enough that the block weights (width x 4 width) are above
  // stage3_param_persistence_threshold (1e5 elements) and stream.
  int width = 256;
  int heads = 4;
  int layers = 4;
  int batch = 8;  // sequences per rank per micro-step
};

// The synthetic language: sequence i counts from a start token with a
// stride, both from i, so the next token follows from the ones before.
void make_batch(const ModelShape& shape, std::uint64_t index, torch::Tensor& input, torch::Tensor& target) {
  std::vector<std::int64_t> tokens(static_cast<std::size_t>(shape.batch) * (shape.context + 1));
  for (int s = 0; s < shape.batch; ++s) {
    std::uint64_t h = (index * shape.batch + s + 1) * 0x9E3779B97F4A7C15ull;
    h ^= h >> 31;
    const std::int64_t start = static_cast<std::int64_t>(h % shape.vocab);
    const std::int64_t stride = 1 + static_cast<std::int64_t>((h >> 17) % 3);
    for (int t = 0; t <= shape.context; ++t) {
      tokens[s * (shape.context + 1) + t] = (start + stride * t) % shape.vocab;
    }
  }
  auto all = torch::tensor(tokens).view({shape.batch, shape.context + 1});
  input = all.slice(1, 0, shape.context).contiguous();
  target = all.slice(1, 1, shape.context + 1).contiguous();
}

// Deterministic initial values (the same on every rank): GPT-2's N(0, 0.02)
// for matrices, ones for layer-norm gains, zeros for biases.
zinf::zero3::Initializer init_normal(std::uint64_t seed, float stddev) {
  return [seed, stddev](std::uint64_t offset, std::span<float> out) {
    for (std::size_t i = 0; i < out.size(); ++i) {
      // A counter-based generator, so any slice is reproducible alone.
      std::uint64_t x = (seed << 40) ^ (offset + i + 1);
      x *= 0x9E3779B97F4A7C15ull;
      x ^= x >> 29;
      x *= 0xBF58476D1CE4E5B9ull;
      x ^= x >> 32;
      const double u1 = ((x >> 11) + 1.0) / 9007199254740993.0;
      std::uint64_t y = x * 0x94D049BB133111EBull;
      y ^= y >> 31;
      const double u2 = (y >> 11) / 9007199254740992.0;
      out[i] = static_cast<float>(stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
    }
  };
}
zinf::zero3::Initializer init_constant(float value) {
  return [value](std::uint64_t, std::span<float> out) { std::fill(out.begin(), out.end(), value); };
}

class Gpt {
 public:
  Gpt(Engine& engine, const ModelShape& shape) : engine_(engine), shape_(shape) {
    const std::int64_t d = shape.width;
    std::uint64_t seed = 1;
    embed_ = engine.add_module("embed");
    tok_ = add(embed_, "tok_emb", {shape.vocab, d}, init_normal(seed++, 0.02f));
    pos_ = add(embed_, "pos_emb", {shape.context, d}, init_normal(seed++, 0.02f));
    for (int l = 0; l < shape.layers; ++l) {
      Block b;
      b.module = engine.add_module(fmt::format("block{}", l));
      const auto name = [&](const char* what) { return fmt::format("block{}.{}", l, what); };
      b.ln1_w = add(b.module, name("ln1.weight"), {d}, init_constant(1.0f));
      b.ln1_b = add(b.module, name("ln1.bias"), {d}, init_constant(0.0f));
      b.qkv_w = add(b.module, name("attn.qkv.weight"), {3 * d, d}, init_normal(seed++, 0.02f));
      b.qkv_b = add(b.module, name("attn.qkv.bias"), {3 * d}, init_constant(0.0f));
      b.proj_w = add(b.module, name("attn.proj.weight"), {d, d}, init_normal(seed++, 0.02f));
      b.proj_b = add(b.module, name("attn.proj.bias"), {d}, init_constant(0.0f));
      b.ln2_w = add(b.module, name("ln2.weight"), {d}, init_constant(1.0f));
      b.ln2_b = add(b.module, name("ln2.bias"), {d}, init_constant(0.0f));
      b.fc_w = add(b.module, name("mlp.fc.weight"), {4 * d, d}, init_normal(seed++, 0.02f));
      b.fc_b = add(b.module, name("mlp.fc.bias"), {4 * d}, init_constant(0.0f));
      b.out_w = add(b.module, name("mlp.proj.weight"), {d, 4 * d}, init_normal(seed++, 0.02f));
      b.out_b = add(b.module, name("mlp.proj.bias"), {d}, init_constant(0.0f));
      blocks_.push_back(b);
    }
    head_ = engine.add_module("head");
    lnf_w_ = add(head_, "ln_f.weight", {d}, init_constant(1.0f));
    lnf_b_ = add(head_, "ln_f.bias", {d}, init_constant(0.0f));
    lm_head_ = add(head_, "lm_head.weight", {shape.vocab, d}, init_normal(seed++, 0.02f));
  }

  // One micro-step; returns the mean loss of this rank's micro-batch.
  float micro_step(const torch::Tensor& input, const torch::Tensor& target) {
    std::vector<torch::Tensor> saved;  // each block's input
    torch::Tensor x;
    {
      torch::NoGradGuard no_grad;
      engine_.pre_forward(embed_);
      x = embed(input, param(tok_), param(pos_));
      engine_.post_forward(embed_);
      for (const Block& b : blocks_) {
        engine_.pre_forward(b.module);
        saved.push_back(x);
        x = block(x, b, [&](ParamIndex p) { return param(p); });
        engine_.post_forward(b.module);
      }
    }
    // The head: forward and backward together, from the last block's output.
    engine_.pre_forward(head_);
    engine_.post_forward(head_);
    engine_.pre_backward(head_);
    std::vector<std::pair<ParamIndex, torch::Tensor>> leaves;
    const auto leaf = [&](ParamIndex p) {
      auto t = param(p).detach().requires_grad_(true);
      leaves.emplace_back(p, t);
      return t;
    };
    auto h = x.detach().requires_grad_(true);
    auto logits = torch::linear(torch::layer_norm(h, {shape_.width}, leaf(lnf_w_), leaf(lnf_b_)), leaf(lm_head_));
    auto loss = torch::nll_loss(torch::log_softmax(logits.view({-1, shape_.vocab}), -1), target.view({-1}));
    loss.backward();
    hand_over(leaves);
    engine_.post_backward(head_);
    torch::Tensor grad = h.grad();
    for (int l = shape_.layers - 1; l >= 0; --l) {
      const Block& b = blocks_[l];
      engine_.pre_backward(b.module);
      auto in = saved[l].detach().requires_grad_(true);
      auto out = block(in, b, leaf);
      out.backward(grad);
      hand_over(leaves);
      grad = in.grad();
      engine_.post_backward(b.module);
    }
    engine_.pre_backward(embed_);
    auto emb = embed(input, leaf(tok_), leaf(pos_));
    emb.backward(grad);
    hand_over(leaves);
    engine_.post_backward(embed_);
    return loss.item<float>();
  }

 private:
  struct Block {
    ModuleIndex module = 0;
    ParamIndex ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b;
  };

  ParamIndex add(ModuleIndex module, std::string name, std::vector<std::int64_t> shape,
                 zinf::zero3::Initializer init) {
    return engine_.add_param(module, std::move(name), std::move(shape), std::move(init));
  }

  // The gathered param as an fp32 tensor (a view when training in fp32).
  torch::Tensor param(ParamIndex p) {
    const auto& d = engine_.describe(p);
    const auto dtype = engine_.working_dtype() == zinf::cpu_adam::DType::f32  ? torch::kFloat32
                       : engine_.working_dtype() == zinf::cpu_adam::DType::bf16 ? torch::kBFloat16
                                                                                : torch::kFloat16;
    return torch::from_blob(engine_.param(p), d.shape, torch::TensorOptions().dtype(dtype)).to(torch::kFloat32);
  }

  // Copies each leaf's gradient into the engine's buffer for it.
  void hand_over(std::vector<std::pair<ParamIndex, torch::Tensor>>& leaves) {
    for (auto& [p, t] : leaves) {
      const auto g = t.grad().contiguous();
      std::memcpy(engine_.grad(p), g.data_ptr<float>(), g.numel() * sizeof(float));
    }
    leaves.clear();
  }

  torch::Tensor embed(const torch::Tensor& input, const torch::Tensor& tok, const torch::Tensor& pos) {
    return torch::embedding(tok, input) + pos.unsqueeze(0);
  }

  template <class ParamOf>
  torch::Tensor block(const torch::Tensor& x, const Block& b, ParamOf&& p) {
    const std::int64_t B = x.size(0), T = x.size(1), d = shape_.width, H = shape_.heads, hd = d / H;
    auto h = torch::layer_norm(x, {d}, p(b.ln1_w), p(b.ln1_b));
    auto qkv = torch::linear(h, p(b.qkv_w), p(b.qkv_b)).chunk(3, -1);
    const auto heads = [&](const torch::Tensor& t) { return t.view({B, T, H, hd}).transpose(1, 2); };
    auto att = torch::matmul(heads(qkv[0]), heads(qkv[1]).transpose(-2, -1)) / std::sqrt(static_cast<double>(hd));
    auto mask = torch::ones({T, T}, torch::kBool).triu(1);
    att = torch::softmax(att.masked_fill(mask, -std::numeric_limits<float>::infinity()), -1);
    auto y = torch::matmul(att, heads(qkv[2])).transpose(1, 2).contiguous().view({B, T, d});
    auto x1 = x + torch::linear(y, p(b.proj_w), p(b.proj_b));
    auto h2 = torch::layer_norm(x1, {d}, p(b.ln2_w), p(b.ln2_b));
    return x1 + torch::linear(torch::gelu(torch::linear(h2, p(b.fc_w), p(b.fc_b))), p(b.out_w), p(b.out_b));
  }

  Engine& engine_;
  ModelShape shape_;
  ModuleIndex embed_ = 0, head_ = 0;
  ParamIndex tok_ = 0, pos_ = 0, lnf_w_ = 0, lnf_b_ = 0, lm_head_ = 0;
  std::vector<Block> blocks_;
};

int train_in(const zinf::config::Config& config, const zinf::zero3::LaunchEnv& launch, int steps,
             const ModelShape& shape, const std::string& save, const std::string& load);

// This rank's swap directories (<nvme_path>/zinf/rank<R>/...) that exist:
// what an earlier run left behind.
std::vector<std::filesystem::path> existing_swap_dirs(const zinf::config::Config& config, int rank) {
  std::vector<std::filesystem::path> found;
  const auto add = [&](const auto& block, zinf::swap::SwapRole role) {
    if (block.device != zinf::config::OffloadDevice::nvme) return;
    for (const auto& dir : zinf::swap::store_options(config, role, rank).directories) {
      std::error_code ec;
      if (std::filesystem::exists(dir, ec)) found.push_back(dir);
    }
  };
  add(config.zero.offload_param, zinf::swap::SwapRole::param);
  add(config.zero.offload_optimizer, zinf::swap::SwapRole::optimizer);
  return found;
}

int train(const std::string& config_path, int steps, const ModelShape& shape, const std::string& save,
          const std::string& load, bool clear_nvme) {
  const auto config = zinf::config::load_config_file(config_path);
  const auto launch = zinf::zero3::launch_env_from_environment();
  const auto leftovers = existing_swap_dirs(config, launch.rank);
  if (clear_nvme) {
    // Each rank clears only its own directories.
    for (const auto& dir : leftovers) {
      std::filesystem::remove_all(dir);
      if (launch.rank == 0) std::printf("cleared %s (--clear-nvme)\n", dir.c_str());
    }
  }
  try {
    return train_in(config, launch, steps, shape, save, load);
  } catch (const zinf::Error& error) {
    if (clear_nvme || leftovers.empty() ||
        (error.kind() != zinf::ErrorKind::config && error.kind() != zinf::ErrorKind::corrupt)) {
      throw;
    }
    // A damaged earlier run in the swap directories (another model's are
    // reused: the engine starts afresh over them): say how to start fresh
    // instead of leaving the user to find and delete them.
    throw zinf::Error(error.kind(), fmt::format("{} (the swap files in {} are from an earlier run: pass "
                                                "--clear-nvme to delete them and start fresh)",
                                                error.what(), leftovers.front().parent_path().string()));
  }
}

int train_in(const zinf::config::Config& config, const zinf::zero3::LaunchEnv& launch, int steps,
             const ModelShape& shape, const std::string& save, const std::string& load) {
  auto comm = zinf::zero3::make_communicator(launch);
  const unsigned hardware = std::max(1u, std::thread::hardware_concurrency());
  const int threads = static_cast<int>(std::max(1u, hardware / static_cast<unsigned>(launch.world_size)));
  torch::set_num_threads(threads);
  zinf::zero3::EngineOptions options;
  options.optimizer_threads = static_cast<std::size_t>(threads);
  Engine engine(config, *comm, options);
  Gpt model(engine, shape);
  engine.finalize();
  if (!load.empty()) engine.load_checkpoint(load);
  const int accumulation = static_cast<int>(config.training.gradient_accumulation_steps);
  const auto first = engine.optimizer_step();
  for (std::int64_t step = first; step < first + steps; ++step) {
    float loss_sum = 0;
    const auto since = std::chrono::steady_clock::now();
    for (int micro = 0; micro < accumulation; ++micro) {
      torch::Tensor input, target;
      make_batch(shape, (static_cast<std::uint64_t>(step) * accumulation + micro) * launch.world_size + launch.rank,
                 input, target);
      loss_sum += model.micro_step(input, target);
      engine.step();
    }
    float loss = loss_sum / static_cast<float>(accumulation * launch.world_size);
    comm->all_reduce(&loss, 1);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
    if (launch.rank == 0) {
      std::printf("step %lld loss %.6f grad_norm %.4f time %.3f s\n", static_cast<long long>(step + 1), loss,
                  engine.stats().last_grad_norm, seconds);
      std::fflush(stdout);
    }
  }
  if (!save.empty()) engine.save_checkpoint(save);
  const auto stats = engine.stats();
  if (launch.rank == 0) {
    const double busy = std::chrono::duration<double>(stats.fetch_busy).count();
    const double wait = std::chrono::duration<double>(stats.fetch_wait).count();
    std::printf("summary: %llu gathers (%llu started ahead of use); the trainer waited %.3f s for "
                "parameters, the worker spent %.3f s fetching them\n",
                static_cast<unsigned long long>(stats.gathers), static_cast<unsigned long long>(stats.prefetched),
                wait, busy);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train a small GPT-style model with zinf's ZeRO-3 engine on synthetic data"};
  std::string config_path;
  int world_size = 1;
  int steps = 20;
  std::string save, load;
  bool clear_nvme = false;
  ModelShape shape;
  app.add_option("--config", config_path, "DeepSpeed JSON config (zero_optimization.stage 3)")->required()->check(CLI::ExistingFile);
  app.add_option("--world-size", world_size, "local ranks to start when no launcher set RANK")->check(CLI::Range(1, 64));
  app.add_option("--steps", steps, "optimizer steps")->check(CLI::Range(1, 1000000));
  app.add_option("--layers", shape.layers, "transformer blocks")->check(CLI::Range(1, 1024));
  app.add_option("--width", shape.width, "model width (a multiple of --heads)")->check(CLI::Range(8, 65536));
  app.add_option("--heads", shape.heads, "attention heads")->check(CLI::Range(1, 256));
  app.add_option("--context", shape.context, "sequence length")->check(CLI::Range(2, 65536));
  app.add_option("--batch", shape.batch, "sequences per rank per micro-step")->check(CLI::Range(1, 65536));
  app.add_option("--save", save, "save a checkpoint here after the last step");
  app.add_option("--load", load, "resume from this checkpoint");
  app.add_flag("--clear-nvme", clear_nvme,
               "delete the swap files an earlier run left in <nvme_path>/zinf/rank<R> before starting "
               "(without it their space is reused)");
  CLI11_PARSE(app, argc, argv);
  if (shape.width % shape.heads != 0) {
    std::fprintf(stderr, "gpt_zero3: --width %d is not a multiple of --heads %d\n", shape.width, shape.heads);
    return 2;
  }
  try {
    if (std::getenv("RANK") == nullptr && world_size > 1) {
      std::vector<std::string> args(argv, argv + argc);
      args[0] = "/proc/self/exe";
      char self[4096];
      const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
      if (n > 0) args[0] = std::string(self, static_cast<std::size_t>(n));
      const auto result = zinf::zero3::spawn_local_ranks(world_size, args);
      if (result.exit_code != 0) std::fprintf(stderr, "gpt_zero3: %s\n", result.message.c_str());
      return result.exit_code;
    }
    return train(config_path, steps, shape, save, load, clear_nvme);
  } catch (const zinf::Error& error) {
    std::fprintf(stderr, "gpt_zero3: %s error: %s\n", std::string(zinf::to_string(error.kind())).c_str(), error.what());
    return error.kind() == zinf::ErrorKind::config ? 2 : 1;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "gpt_zero3: %s\n", error.what());
    return 1;
  }
}

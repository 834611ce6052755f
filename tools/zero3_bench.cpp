// zinf-zero3-bench: what ZeRO-3 parameter offload costs a training step.
//
// A model of --layers layers, one --layer-params fp32 parameter each, is
// trained for --steps steps by one process through the zero3 engine, with
// the trainer's compute stood in for by a timed loop over the gathered
// parameter (--compute-ms per layer per pass; "auto" makes it 1.25x the
// measured NVMe read time of one shard, the issue's "compute per layer >=
// its I/O time"). Three runs:
//
//   resident   offload_param none, offload_optimizer cpu: nothing on NVMe
//   nvme       offload_param and offload_optimizer nvme, prefetch on
//   no-prefetch  the same with stage3_prefetch_bucket_size 0
//
// It reports forward+backward time and optimizer step time per step
// (medians), the time the trainer waited for parameters, and the fraction
// of fetch time prefetch hid: 1 - wait(nvme) / wait(no-prefetch).
// max_in_cpu is 0, so every fetch reads NVMe (no host cache).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/config.hpp"
#include "core/error.hpp"
#include "core/units.hpp"
#include "tools/median.hpp"
#include "zero3/communicator.hpp"
#include "zero3/engine.hpp"

namespace {

using Clock = std::chrono::steady_clock;
using zinf::zero3::Engine;

struct Options {
  std::string nvme;
  int layers = 12;
  std::uint64_t layer_params = 8000000;
  std::string compute_ms = "auto";
  int steps = 4;  // the first is the recording step and is not counted
  std::string json_path;
};

struct RunResult {
  std::string name;
  std::vector<double> pass_seconds, step_seconds, wait_seconds;
  double pass_median = 0, step_median = 0, wait_median = 0;
};

// Reads the gathered param and spins until `budget` has passed: the
// stand-in for the layer's arithmetic.
float compute(const float* data, std::uint64_t count, std::chrono::duration<double> budget) {
  const auto until = Clock::now() + budget;
  float sum = 0;
  std::uint64_t i = 0;
  do {
    const std::uint64_t end = std::min(count, i + 65536);
    for (; i < end; ++i) sum += data[i];
    if (i == count) i = 0;
  } while (Clock::now() < until);
  return sum;
}

RunResult run(const Options& options, const std::string& name, const std::string& config_json,
              std::chrono::duration<double> compute_time) {
  RunResult result;
  result.name = name;
  auto comm = zinf::zero3::make_local_communicator();
  Engine engine(zinf::config::load_config_string(config_json), *comm);
  std::vector<zinf::zero3::ModuleIndex> modules;
  std::vector<zinf::zero3::ParamIndex> params;
  for (int l = 0; l < options.layers; ++l) {
    modules.push_back(engine.add_module(fmt::format("layer{}", l)));
    params.push_back(engine.add_param(modules.back(), fmt::format("layer{}.weight", l),
                                      {static_cast<std::int64_t>(options.layer_params)},
                                      [](std::uint64_t offset, std::span<float> out) {
                                        for (std::size_t i = 0; i < out.size(); ++i) out[i] = 1e-3f * ((offset + i) % 97);
                                      }));
  }
  engine.finalize();
  volatile float sink = 0;
  for (int step = 0; step < options.steps; ++step) {
    const auto wait_before = engine.stats().fetch_wait;
    const auto start = Clock::now();
    for (int l = 0; l < options.layers; ++l) {
      engine.pre_forward(modules[l]);
      sink = sink + compute(engine.param_f32(params[l]), options.layer_params, compute_time);
      engine.post_forward(modules[l]);
    }
    for (int l = options.layers - 1; l >= 0; --l) {
      engine.pre_backward(modules[l]);
      sink = sink + compute(engine.param_f32(params[l]), options.layer_params, compute_time);
      std::fill_n(engine.grad(params[l]), options.layer_params, 1e-4f);
      engine.post_backward(modules[l]);
    }
    const auto passes_done = Clock::now();
    engine.step();
    const auto end = Clock::now();
    const double waited = std::chrono::duration<double>(engine.stats().fetch_wait - wait_before).count();
    std::fprintf(stderr, "  %-11s step %d: forward+backward %.3f s (waited %.3f s for params), optimizer %.3f s\n",
                 name.c_str(), step + 1, std::chrono::duration<double>(passes_done - start).count(), waited,
                 std::chrono::duration<double>(end - passes_done).count());
    if (step == 0) continue;  // the recording step: no prefetch yet
    result.pass_seconds.push_back(std::chrono::duration<double>(passes_done - start).count());
    result.step_seconds.push_back(std::chrono::duration<double>(end - passes_done).count());
    result.wait_seconds.push_back(waited);
  }
  result.pass_median = zinf::bench::median(result.pass_seconds);
  result.step_median = zinf::bench::median(result.step_seconds);
  result.wait_median = zinf::bench::median(result.wait_seconds);
  return result;
}

std::string config(const Options& options, bool nvme, bool prefetch) {
  const std::string offload =
      nvme ? fmt::format(R"("offload_param": {{"device": "nvme", "nvme_path": "{0}", "max_in_cpu": 0}},
                           "offload_optimizer": {{"device": "nvme", "nvme_path": "{0}"}},)",
                         options.nvme)
           : std::string(R"("offload_optimizer": {"device": "cpu"},)");
  return fmt::format(R"({{"optimizer": {{"type": "AdamW"}},
    "aio": {{"block_size": 1048576, "queue_depth": 32, "intra_op_parallelism": 2}},
    "zero_optimization": {{"stage": 3, {} "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
      "stage3_prefetch_bucket_size": {}, "sub_group_size": {}}}}})",
                     offload, prefetch ? 2 * options.layer_params : 0, 4 * options.layer_params);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"zinf-zero3-bench: ZeRO-3 parameter offload to NVMe against resident parameters"};
  Options options;
  const char* env_dir = std::getenv("ZINF_BENCH_DIR");
  options.nvme = env_dir ? env_dir : "/var/tmp";
  std::string layer_params = "8M";
  app.add_option("--nvme", options.nvme, "swap directory (default $ZINF_BENCH_DIR or /var/tmp)");
  app.add_option("--layers", options.layers, "layers (default 12)")->check(CLI::Range(2, 100000));
  app.add_option("--layer-params", layer_params, "fp32 elements per layer, e.g. 8M (default)");
  app.add_option("--compute-ms", options.compute_ms, "compute per layer per pass, ms, or auto (default)");
  app.add_option("--steps", options.steps, "steps per run, the first not counted (default 4)")->check(CLI::Range(2, 1000));
  app.add_option("--json", options.json_path, "write the result to FILE");
  CLI11_PARSE(app, argc, argv);
  try {
    options.layer_params = zinf::parse_count(layer_params);
    const auto base = std::filesystem::path(options.nvme) / fmt::format("zinf-zero3-bench.{}", ::getpid());
    std::filesystem::create_directories(base);
    options.nvme = base.string();
    struct Cleanup {
      std::filesystem::path dir;
      ~Cleanup() {
        std::error_code ignored;
        std::filesystem::remove_all(dir, ignored);
      }
    } cleanup{base};

    // The NVMe read time of one shard, from a no-compute prefetch-off run.
    double compute_ms = 0;
    if (options.compute_ms == "auto") {
      Options probe = options;
      probe.steps = 2;
      std::fprintf(stderr, "measuring the NVMe fetch time of one layer:\n");
      const RunResult r = run(probe, "probe", config(options, true, false), std::chrono::duration<double>(0));
      compute_ms = 1.25 * 1000.0 * r.wait_median / (2.0 * options.layers);
    } else {
      compute_ms = std::stod(options.compute_ms);
    }
    const auto compute_time = std::chrono::duration<double>(compute_ms / 1000.0);
    std::fprintf(stderr, "compute per layer per pass: %.1f ms; %d layers of %llu fp32 params\n", compute_ms,
                 options.layers, static_cast<unsigned long long>(options.layer_params));
    const RunResult resident = run(options, "resident", config(options, false, true), compute_time);
    const RunResult nvme = run(options, "nvme", config(options, true, true), compute_time);
    const RunResult no_prefetch = run(options, "no-prefetch", config(options, true, false), compute_time);
    const double hidden = no_prefetch.wait_median > 0 ? 1.0 - nvme.wait_median / no_prefetch.wait_median : 0.0;
    std::printf("compute per layer per pass   %.1f ms\n", compute_ms);
    for (const RunResult* r : {&resident, &nvme, &no_prefetch}) {
      std::printf("%-12s forward+backward %.3f s (waited %.3f s)   optimizer step %.3f s   total %.3f s\n",
                  r->name.c_str(), r->pass_median, r->wait_median, r->step_median, r->pass_median + r->step_median);
    }
    std::printf("nvme / resident: forward+backward %.2fx, whole step %.2fx\n", nvme.pass_median / resident.pass_median,
                (nvme.pass_median + nvme.step_median) / (resident.pass_median + resident.step_median));
    std::printf("param fetch time hidden by prefetch: %.2f\n", hidden);
    if (!options.json_path.empty()) {
      nlohmann::json out;
      out["tool"] = "zinf-zero3-bench";
      out["layers"] = options.layers;
      out["layer_params"] = options.layer_params;
      out["compute_ms"] = compute_ms;
      for (const RunResult* r : {&resident, &nvme, &no_prefetch}) {
        out["runs"][r->name] = {{"pass_seconds", r->pass_seconds}, {"step_seconds", r->step_seconds},
                                {"wait_seconds", r->wait_seconds}};
      }
      out["hidden"] = hidden;
      std::ofstream(options.json_path) << out.dump(2) << "\n";
    }
    return 0;
  } catch (const zinf::Error& error) {
    std::fprintf(stderr, "zinf-zero3-bench: %s\n", error.what());
    return 1;
  }
}

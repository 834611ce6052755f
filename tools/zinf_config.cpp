// zinf-config: checks DeepSpeed JSON configs the way zinf reads them, and
// plans where a model's states will live.
//   zinf-config check FILE...   exit 0, or 1 with one line per problem
//   zinf-config plan FILE --params N [--world-size W] [--largest-param N]
//                               [--ranks-per-node R]
//       memory per tier for ZeRO stages 1-3 with the config's offloads, the
//       buffers zinf allocates, and whether this machine holds it: exit 0 if
//       it fits, 2 if it does not, 1 for a bad config.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/config.hpp"
#include "core/error.hpp"
#include "core/units.hpp"
#include "swap/memory_plan.hpp"
#include "zinf_config.h"

namespace {

std::optional<zinf::config::Config> load(const std::string& file) {
  std::ifstream in(file);
  if (!in) {
    fmt::print(stderr, "{}: cannot be read\n", file);
    return std::nullopt;
  }
  std::stringstream text;
  text << in.rdbuf();
  const zinf::config::ParseResult result = zinf::config::parse_config(text.str());
  for (const std::string& warning : result.warnings) fmt::print(stderr, "{}: warning: {}\n", file, warning);
  for (const auto& problem : result.problems) fmt::print(stderr, "{}: {}\n", file, problem.line());
  if (!result.problems.empty()) return std::nullopt;
  return result.config;
}

struct PlanArguments {
  std::string file;
  std::string params;
  std::uint32_t world_size = 1;
  std::string largest_param;
  std::uint32_t ranks_per_node = 0;
  bool python_engine = false;
};

std::string bytes_cell(std::uint64_t bytes) { return bytes == 0 ? "-" : zinf::format_bytes(bytes); }

int plan(const PlanArguments& arguments) {
  const auto config = load(arguments.file);
  if (!config) return 1;
  zinf::swap::PlanInput input;
  try {
    input.params = zinf::parse_count(arguments.params);
    if (!arguments.largest_param.empty()) input.largest_param = zinf::parse_count(arguments.largest_param);
  } catch (const zinf::Error& error) {
    fmt::print(stderr, "{}\n", error.what());
    return 1;
  }
  input.world_size = arguments.world_size;
  input.ranks_per_node = arguments.ranks_per_node;
  input.device_is_host = arguments.python_engine;
  zinf::swap::MemoryPlan memory;
  try {
    memory = zinf::swap::plan_memory(*config, input);
  } catch (const zinf::Error& error) {
    fmt::print(stderr, "{}\n", error.what());
    return 1;
  }
  fmt::print("{}: {} params, world size {}, {} rank(s) on this machine, {} params and grads\n", arguments.file,
             input.params, input.world_size, memory.ranks_per_node,
             zinf::config::to_string(config->training.precision));
  fmt::print("per rank       {:>12} {:>12} {:>12} {:>12}  offloads\n", "GPU", "pinned host", "pageable",
             "NVMe");
  for (const auto& stage : memory.stages) {
    fmt::print("ZeRO stage {}{} {:>12} {:>12} {:>12} {:>12}  {}\n", stage.stage,
               stage.stage == memory.chosen_stage ? "*" : " ", bytes_cell(stage.per_rank.gpu),
               bytes_cell(stage.per_rank.pinned), bytes_cell(stage.per_rank.pageable),
               bytes_cell(stage.per_rank.nvme), stage.offloads);
  }
  fmt::print("(* the config's stage; activations, framework memory and the params at or below "
             "stage3_param_persistence_threshold are not counted)\n");
  if (memory.transient_host > 0) {
    fmt::print("host peak while the engine initialises: {} more per rank\n", zinf::format_bytes(memory.transient_host));
  }
  fmt::print("what zinf allocates per rank:\n");
  for (const auto& buffer : memory.buffers) {
    fmt::print("  {:>12}  {:<13}  {}{}\n", zinf::format_bytes(buffer.bytes), zinf::swap::to_string(buffer.tier),
               buffer.what, buffer.transient ? " (transient)" : "");
  }
  const auto fit = zinf::swap::check_fit(*config, memory);
  fmt::print("on this machine (stage {}):\n", memory.chosen_stage);
  for (const auto& line : fit.lines) fmt::print("  {}\n", line);
  fmt::print("  GPU: {} per rank, not checked here\n", zinf::format_bytes(memory.chosen.gpu));
  return fit.fits ? 0 : 2;
}

int check(const std::vector<std::string>& files) {
  int status = 0;
  for (const std::string& file : files) {
    const auto config = load(file);
    if (!config) {
      status = 1;
      continue;
    }
    const auto& z = config->zero;
    fmt::print("{}: ok (ZeRO stage {}, offload_param {}, offload_optimizer {}, aio {} x {} x {})\n", file,
               z.stage, zinf::config::to_string(z.offload_param.device),
               zinf::config::to_string(z.offload_optimizer.device), config->aio.block_size,
               config->aio.queue_depth, config->aio.intra_op_parallelism);
  }
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"zinf-config: check DeepSpeed JSON configs as zinf reads them"};
  app.set_version_flag("--version", std::string(ZINF_VERSION));
  std::vector<std::string> files;
  CLI::App* check_command = app.add_subcommand("check", "report every problem, one line each; exit 1 if any");
  check_command->add_option("files", files, "DeepSpeed JSON config files")->required();
  PlanArguments plan_arguments;
  CLI::App* plan_command = app.add_subcommand("plan", "what zinf allocates per tier, and whether it fits this machine");
  plan_command->add_option("file", plan_arguments.file, "DeepSpeed JSON config file")->required();
  plan_command->add_option("--params", plan_arguments.params, "model parameters (1000, 350M, 7B)")->required();
  plan_command->add_option("--world-size", plan_arguments.world_size, "data-parallel ranks")->check(CLI::PositiveNumber);
  plan_command->add_option("--largest-param", plan_arguments.largest_param,
                           "elements of the largest parameter (default: min(params, 100M))");
  plan_command->add_option("--ranks-per-node", plan_arguments.ranks_per_node,
                           "ranks on this machine (default: all of them)");
  plan_command->add_flag("--python-engine", plan_arguments.python_engine,
                         "plan zinf.initialize's engine, which keeps offload_param none's working copy in host memory");
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  if (plan_command->parsed()) return plan(plan_arguments);
  return check(files);
}

// zinf-config: checks DeepSpeed JSON configs the way zinf reads them.
//   zinf-config check FILE...   exit 0, or 1 with one line per problem
// (`plan`, the memory-per-tier planner, comes with the swap layer.)
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "core/config.hpp"
#include "zinf_config.h"

namespace {

int check(const std::vector<std::string>& files) {
  int status = 0;
  for (const std::string& file : files) {
    std::ifstream in(file);
    if (!in) {
      fmt::print(stderr, "{}: cannot be read\n", file);
      status = 1;
      continue;
    }
    std::stringstream text;
    text << in.rdbuf();
    const zinf::config::ParseResult result = zinf::config::parse_config(text.str());
    for (const std::string& warning : result.warnings) fmt::print(stderr, "{}: warning: {}\n", file, warning);
    for (const auto& problem : result.problems) fmt::print(stderr, "{}: {}\n", file, problem.line());
    if (!result.problems.empty()) {
      status = 1;
      continue;
    }
    const auto& z = result.config.zero;
    fmt::print("{}: ok (ZeRO stage {}, offload_param {}, offload_optimizer {}, aio {} x {} x {})\n", file,
               z.stage, zinf::config::to_string(z.offload_param.device),
               zinf::config::to_string(z.offload_optimizer.device), result.config.aio.block_size,
               result.config.aio.queue_depth, result.config.aio.intra_op_parallelism);
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
  app.require_subcommand(1);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  return check(files);
}

// zinf-bench as a user runs it: bad directories get one line and a non-zero
// exit, a real run writes the JSON records it promises, and its scratch
// files are gone afterwards, also after Ctrl-C.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "pinned_pool/cuda_host.hpp"
#include "test_util.hpp"

namespace {

using zinf::testing::SmallFilesystem;
using zinf::testing::TempDir;

using Outcome = zinf::testing::CommandOutcome;
using zinf::testing::slurp;

const char* bench_binary() {
  const char* path = std::getenv("ZINF_BENCH");
  return path != nullptr ? path : "zinf-bench";
}

Outcome run_bench(const std::string& arguments) {
  return zinf::testing::run_command(std::string(bench_binary()) + " --no-progress " + arguments);
}

int count_lines(const std::string& text) {
  int lines = 0;
  for (char c : text) lines += c == '\n';
  return lines;
}

bool has_scratch(const std::filesystem::path& dir) {
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().filename().string().rfind("zinf-bench.", 0) == 0) return true;
  }
  return false;
}

TEST(ZinfBench, MissingDirectoryIsOneLineAndNonZero) {
  TempDir dir;
  const Outcome o = run_bench("--nvme " + (dir / "nope").string());
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("does not exist"), std::string::npos) << o.err;
  EXPECT_EQ(count_lines(o.err), 1) << o.err;
}

TEST(ZinfBench, AFileIsNotADirectory) {
  TempDir dir;
  std::ofstream(dir / "file") << "x";
  const Outcome o = run_bench("--nvme " + (dir / "file").string());
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("is not a directory"), std::string::npos) << o.err;
}

TEST(ZinfBench, ReadOnlyDirectoryIsRefused) {
  SmallFilesystem fs("tmpfs-ro", 4);
  if (!fs.skip_reason().empty()) GTEST_SKIP() << fs.skip_reason();
  const Outcome o = run_bench("--nvme " + fs.path().string());
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("cannot create files"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("EROFS"), std::string::npos) << o.err;
  EXPECT_EQ(count_lines(o.err), 1) << o.err;
}

TEST(ZinfBench, DirectoryWithoutODirectIsRefused) {
  TempDir dir("/dev/shm");
  const Outcome o = run_bench("--nvme " + dir.path().string());
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("no O_DIRECT support"), std::string::npos) << o.err;
  EXPECT_EQ(count_lines(o.err), 1) << o.err;
  EXPECT_FALSE(has_scratch(dir.path()));
}

TEST(ZinfBench, TooFullDirectoryIsRefusedBeforeWriting) {
  SmallFilesystem fs("ext4", 24);
  if (!fs.skip_reason().empty()) GTEST_SKIP() << fs.skip_reason();
  const Outcome o = run_bench("--nvme " + fs.path().string() + " --size 1G");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("free; this run needs"), std::string::npos) << o.err;
  EXPECT_EQ(count_lines(o.err), 1) << o.err;
  EXPECT_FALSE(has_scratch(fs.path()));
}

TEST(ZinfBench, BadOptionValuesAreRejected) {
  EXPECT_NE(run_bench("--engine libaio").exit_code, 0);
  TempDir dir;
  const Outcome o = run_bench("--nvme " + dir.path().string() + " --block-size 1000");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("aio.block_size"), std::string::npos) << o.err;
}

TEST(ZinfBench, RunWritesJsonRecordsAndCleansUp) {
  TempDir a;
  TempDir b;
  TempDir out;
  const std::string json = (out / "r.json").string();
  const Outcome o = run_bench("--nvme " + a.path().string() + " " + b.path().string() +
                              " --size 64M --block-size 1M --queue-depth 4 --repeat 1 --json " + json);
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_NE(o.out.find("\"aio\": {"), std::string::npos) << o.out;
  const auto doc = nlohmann::json::parse(slurp(json));
  ASSERT_EQ(doc["records"].size(), 2u);
  for (const auto& record : doc["records"]) {
    for (const char* key : {"op", "engine", "block_size", "queue_depth", "intra_op_parallelism",
                            "bytes", "seconds", "gb_per_s", "cpu_seconds"}) {
      EXPECT_TRUE(record.contains(key)) << key;
    }
    EXPECT_EQ(record["bytes"], 64u << 20);
    EXPECT_EQ(record["block_size"], 1u << 20);
    EXPECT_GT(record["gb_per_s"].get<double>(), 0.0);
  }
  EXPECT_EQ(doc["records"][0]["op"], "write");
  EXPECT_EQ(doc["records"][1]["op"], "read");
  EXPECT_EQ(doc["recommended_aio"]["block_size"], 1u << 20);
  EXPECT_EQ(doc["recommended_aio"]["queue_depth"], 4);
  EXPECT_FALSE(has_scratch(a.path()));
  EXPECT_FALSE(has_scratch(b.path()));
}

TEST(ZinfBench, OddPoolSizesAreRoundedNotFatal) {
  TempDir dir;
  const Outcome o = run_bench("--nvme " + dir.path().string() +
                              " --size 48M --block-size 1M --queue-depth 2 --repeat 1 --pool 100000");
  EXPECT_EQ(o.exit_code, 0) << o.err;
}

TEST(ZinfBenchAdam, ReportsParamsPerSecondAgainstTheLimit) {
  TempDir out;
  const std::string json = (out / "adam.json").string();
  const Outcome o = run_bench("adam --size 20k --quick --repeat 1 --min-seconds 0.001 --threads 2 "
                              "--tier scalar --json " + json);
  ASSERT_EQ(o.exit_code, 0) << o.err;
  EXPECT_NE(o.out.find("adamw fp32"), std::string::npos) << o.out;
  const auto doc = nlohmann::json::parse(slurp(json));
  ASSERT_GE(doc["records"].size(), 10u);
  bool saw_copy = false;
  for (const auto& r : doc["records"]) {
    EXPECT_EQ(r["tier"], "scalar");
    EXPECT_EQ(r["threads"], 2);
    EXPECT_GT(r["params_per_s"].get<double>(), 0.0);
    EXPECT_GT(r["limit_params_per_s"].get<double>(), 0.0);
    EXPECT_GT(r["fraction_of_limit"].get<double>(), 0.0);
    if (r["param"] == "fp32" && r["grad"] == "bf16" && r["copy"] == "bf16") {
      saw_copy = true;
      EXPECT_EQ(r["bytes_per_param"], 28);  // 4+2+4+4 read, 4+4+4+2 written
    }
  }
  EXPECT_TRUE(saw_copy);
}

TEST(ZinfBenchAdam, BadArgumentsAreOneLineErrors) {
  EXPECT_NE(run_bench("adam --size lots").exit_code, 0);
  const Outcome o = run_bench("adam --tier sse9 --size 1k");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("unknown CPU Adam tier 'sse9'"), std::string::npos) << o.err;
}

TEST(ZinfBenchSwap, StateFormatsStepInOneRunEachAgainstItsOwnBounds) {
  TempDir dir;
  const auto json = dir / "swap.json";
  const Outcome o = run_bench("swap --nvme " + dir.path().string() +
                              " --params 2M --sub-group 1M --steps 2 --threads 1 --fetch-layers 2 "
                              "--fetch-shard 1M --state-format fp32,bf16,int8 --json " + json.string());
  ASSERT_EQ(o.exit_code, 0) << o.err;
  for (const char* expected : {"state formats, same run", "bf16 step 2:", "int8 step 1:", "step/bound"}) {
    EXPECT_NE(o.out.find(expected), std::string::npos) << expected << "\n" << o.out;
  }
  const auto formats = nlohmann::json::parse(slurp(json))["result"]["formats"];
  ASSERT_EQ(formats.size(), 3u);
  EXPECT_EQ(formats[0]["state_format"], "fp32");
  EXPECT_EQ(formats[2]["state_format"], "int8");
  // A step reads and writes param + moments: 12, 8 and ~6 bytes per param.
  const double fp32 = formats[0]["step_moved_bytes"].get<double>();
  EXPECT_EQ(fp32, 2.0 * 12 * 2000000);
  EXPECT_EQ(formats[1]["step_moved_bytes"].get<double>(), 2.0 * 8 * 2000000);
  EXPECT_NEAR(formats[2]["step_moved_bytes"].get<double>() / fp32, 0.5, 0.01);
  for (const auto& run : formats) {
    EXPECT_EQ(run["step_seconds"].size(), 2u);
    EXPECT_GT(run["io_bound_seconds"].get<double>(), 0);
    EXPECT_GT(run["step_over_bound"].get<double>(), 0);
  }
  const Outcome bad = run_bench("swap --nvme " + dir.path().string() + " --params 2M --state-format fp8");
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_NE(bad.err.find("--state-format fp8: expected fp32, bf16 or int8"), std::string::npos) << bad.err;
}

TEST(ZinfBenchSwap, StepsAgainstMeasuredBoundsAndRemovesItsFiles) {
  TempDir dir;
  const auto json = dir / "swap.json";
  const Outcome o = run_bench("swap --nvme " + dir.path().string() +
                              " --params 3M --sub-group 1M --steps 2 --threads 1 --fetch-layers 3 "
                              "--fetch-shard 1M --tbw 600 --json " + json.string());
  ASSERT_EQ(o.exit_code, 0) << o.err;
  for (const char* expected : {"step 1:", "step 2:", "I/O bound", "compute bound", "peak RSS",
                               "param fetch wait", "NVMe written per step", "a drive rated 600 TBW lasts"}) {
    EXPECT_NE(o.out.find(expected), std::string::npos) << expected << "\n" << o.out;
  }
  const auto record = nlohmann::json::parse(slurp(json))["result"];
  EXPECT_EQ(record["params"], 3000000);
  EXPECT_EQ(record["sub_groups"], 3);
  EXPECT_EQ(record["step_seconds"].size(), 2u);
  EXPECT_GT(record["read_gbps"].get<double>(), 0);
  EXPECT_GT(record["io_bound_seconds"].get<double>(), 0);
  EXPECT_GT(record["step_over_bound"].get<double>(), 0);
  // A step rewrites every state once: 3M params x 12 B (sub-groups padded to 4 KiB).
  for (const auto& bytes : record["step_written_bytes"]) {
    EXPECT_GE(bytes.get<std::uint64_t>(), 36000000u);
    EXPECT_LE(bytes.get<std::uint64_t>(), 36000000u + 9u * 4096u);
  }
  EXPECT_GE(record["store_written_total"].get<std::uint64_t>(), 3u * 36000000u);  // the layout and two steps
  // Only the JSON file is left behind.
  std::size_t entries = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++entries;
    EXPECT_EQ(entry.path(), json);
  }
  EXPECT_EQ(entries, 1u);
}

TEST(ZinfBenchSwap, BadArgumentsAreOneLineErrors) {
  Outcome o = run_bench("swap --params lots");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("'lots' is not a count"), std::string::npos) << o.err;
  o = run_bench("swap --nvme /nonexistent/zinf --params 1M");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("/nonexistent/zinf"), std::string::npos) << o.err;
  EXPECT_EQ(count_lines(o.err), 1) << o.err;
}

TEST(ZinfBenchSwap, TinyParamCountsAreRefusedUpFront) {
  // 5 params used to derive a sleep from a 60-byte read and run for hours.
  TempDir dir;
  const auto started = std::chrono::steady_clock::now();
  const Outcome o = run_bench("swap --nvme " + dir.path().string() + " --params 5");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("--params 5: at least 1M"), std::string::npos) << o.err;
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(30));
  EXPECT_EQ(run_bench("swap --nvme " + dir.path().string() + " --params 1M --sub-group 0").exit_code, 1);
}

TEST(ZinfBenchAdam, ZeroSizesAndCountsAreOneLineErrors) {
  // --size 0 used to die with SIGFPE.
  for (const char* arguments : {"adam --size 0", "adam --size 1k --threads 0", "adam --size 1k --repeat 0",
                                "adam --size 1k --min-seconds 0"}) {
    const Outcome o = run_bench(arguments);
    EXPECT_EQ(o.exit_code, 1) << arguments << "\n" << o.err;
    EXPECT_NE(o.err.find("must be"), std::string::npos) << arguments << "\n" << o.err;
    EXPECT_EQ(count_lines(o.err), 1) << o.err;
  }
}

TEST(ZinfBench, EveryCommandTakesNoProgress) {
  const std::string bench = bench_binary();
  Outcome o = zinf::testing::run_command(bench + " adam --no-progress --size 20k --repeat 1 --min-seconds 0.001 "
                                         "--tier scalar --threads 1");
  EXPECT_EQ(o.exit_code, 0) << o.err;
  o = zinf::testing::run_command(bench + " swap --no-progress --params 5");
  EXPECT_NE(o.err.find("--params 5"), std::string::npos) << o.err;  // parsed, then validated
}

TEST(ZinfBenchGpu, WithoutAGpuItSaysSoInOneLine) {
  if (zinf::cuda_device_count() > 0) GTEST_SKIP() << "a GPU is visible here: scripts/gpu-check.sh measures it";
  const Outcome o = run_bench("gpu --size 16M --shard 4M --repeat 1");
  EXPECT_EQ(o.exit_code, 1) << o.err;
  EXPECT_NE(o.err.find("CUDA"), std::string::npos) << o.err;
  EXPECT_EQ(count_lines(o.err), 1) << o.err;
}

TEST(ZinfBench, AnUnwritableJsonPathFailsBeforeTheRun) {
  TempDir dir;
  const std::string missing = (dir / "no" / "such" / "out.json").string();
  for (const std::string& command : {"--nvme " + dir.path().string() + " --size 8G --json " + missing,
                                     "adam --size 1M --json " + missing,
                                     "swap --nvme " + dir.path().string() + " --params 1G --json " + missing,
                                     "--nvme " + dir.path().string() + " --json " + dir.path().string()}) {
    const auto started = std::chrono::steady_clock::now();
    const Outcome o = run_bench(command);
    EXPECT_EQ(o.exit_code, 1) << command << "\n" << o.err;
    EXPECT_NE(o.err.find("--json"), std::string::npos) << o.err;
    EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(10)) << command;
    EXPECT_FALSE(has_scratch(dir.path()));
  }
}

TEST(ZinfBench, AClosedPipeRemovesScratchFiles) {
  // `zinf-bench | head -1`: SIGPIPE must not leave the data file behind.
  TempDir dir;
  const std::string command = "bash -c '" + std::string(bench_binary()) + " --no-progress --nvme " +
                              dir.path().string() + " --size 256M --block-size 64K --queue-depth 1 --repeat 3 " +
                              "| head -1 >/dev/null; exit ${PIPESTATUS[0]}'";
  const Outcome o = zinf::testing::run_command(command);
  EXPECT_NE(o.exit_code, 128 + SIGPIPE) << o.err;
  EXPECT_FALSE(has_scratch(dir.path()));
}

Outcome run_config(const std::string& arguments) {
  TempDir logs;
  const char* tool = std::getenv("ZINF_CONFIG");
  const std::string command = std::string(tool != nullptr ? tool : "zinf-config") + " " + arguments + " >" +
                              (logs / "out").string() + " 2>" + (logs / "err").string();
  const int status = std::system(command.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, slurp(logs / "out"), slurp(logs / "err")};
}

TEST(ZinfConfig, CheckPassesAGoodConfigAndListsEveryProblemOfABadOne) {
  TempDir dir;
  std::ofstream(dir / "good.json") << R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}})";
  std::ofstream(dir / "bad.json") << R"({"aio": {"queue_dept": 8}, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})";
  Outcome o = run_config("check " + (dir / "good.json").string());
  EXPECT_EQ(o.exit_code, 0) << o.err;
  EXPECT_NE(o.out.find("ok (ZeRO stage 3, offload_param nvme"), std::string::npos) << o.out;
  o = run_config("check " + (dir / "bad.json").string());
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_EQ(count_lines(o.err), 2) << o.err;
  EXPECT_NE(o.err.find("aio.queue_dept: unknown key; did you mean \"queue_depth\"?"), std::string::npos) << o.err;
  EXPECT_NE(o.err.find("zero_optimization.offload_param.nvme_path: is required"), std::string::npos) << o.err;
}

TEST(ZinfConfig, PlanPrintsEveryTierAndExitsByFit) {
  TempDir dir;
  const std::string nvme = (dir / "swap").string();
  std::ofstream(dir / "nvme.json") << R"({"zero_optimization": {"stage": 3,
    "offload_param": {"device": "nvme", "nvme_path": ")" << nvme << R"("},
    "offload_optimizer": {"device": "nvme", "nvme_path": ")" << nvme << R"(", "pin_memory": false}}})";
  Outcome o = run_config("plan " + (dir / "nvme.json").string() + " --params 10M --world-size 2");
  EXPECT_EQ(o.exit_code, 0) << o.out << o.err;
  for (const char* expected : {"ZeRO stage 1", "ZeRO stage 2", "ZeRO stage 3*", "GPU", "pinned host", "pageable",
                               "NVMe", "param swapper", "optimizer swapper", "host RAM:", "not checked here"}) {
    EXPECT_NE(o.out.find(expected), std::string::npos) << expected << "\n" << o.out;
  }
  o = run_config("plan " + (dir / "nvme.json").string() + " --params 1000T --largest-param 1000");
  EXPECT_EQ(o.exit_code, 2) << o.out << o.err;
  EXPECT_NE(o.out.find("does not fit"), std::string::npos) << o.out;
  o = run_config("plan " + (dir / "nvme.json").string() + " --params lots");
  EXPECT_EQ(o.exit_code, 1);
  EXPECT_NE(o.err.find("'lots' is not a count"), std::string::npos) << o.err;
}

TEST(ZinfBench, CtrlCRemovesScratchFiles) {
  TempDir dir;
  TempDir logs;
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::freopen((logs / "err").c_str(), "w", stderr);
    std::freopen("/dev/null", "w", stdout);
    ::execl(bench_binary(), bench_binary(), "--no-progress", "--nvme", dir.path().c_str(),
            "--size", "8G", "--block-size", "64K", "--queue-depth", "1", "--pool", "16M",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  // Wait until it has started writing, then interrupt it.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (!has_scratch(dir.path()) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ::kill(pid, SIGINT);
  int status = 0;
  ::waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status)) << slurp(logs / "err");
  EXPECT_EQ(WEXITSTATUS(status), 130) << slurp(logs / "err");
  EXPECT_NE(slurp(logs / "err").find("interrupted"), std::string::npos);
  EXPECT_FALSE(has_scratch(dir.path()));
}

}  // namespace

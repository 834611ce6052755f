// DeepSpeed configs as users write them: a corpus of valid configs with the
// exact values zinf must read, and of the traps users hit with the exact
// problem zinf must report.
#include <fstream>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "core/config.hpp"
#include "core/error.hpp"
#include "test_util.hpp"

namespace zinf::config {
namespace {

ParseResult parse(const std::string& text) { return parse_config(text); }

std::string problems_of(const ParseResult& r) {
  std::string all;
  for (const auto& p : r.problems) all += p.line() + "\n";
  return all;
}

TEST(Config, EmptyConfigHasDeepSpeedDefaults) {
  const ParseResult r = parse("{}");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.aio.block_size, 1048576u);
  EXPECT_EQ(r.config.aio.queue_depth, 8u);
  EXPECT_EQ(r.config.aio.intra_op_parallelism, 1u);
  EXPECT_FALSE(r.config.aio.single_submit);
  EXPECT_TRUE(r.config.aio.overlap_events);
  EXPECT_EQ(r.config.zero.stage, 0);
  EXPECT_EQ(r.config.zero.offload_param.buffer_count, 5u);
  EXPECT_EQ(r.config.zero.offload_param.buffer_size, 100000000u);
  EXPECT_EQ(r.config.zero.offload_param.max_in_cpu, 1000000000u);
  EXPECT_EQ(r.config.zero.offload_optimizer.buffer_count, 4u);
  EXPECT_EQ(r.config.zero.sub_group_size, 1000000000u);
  EXPECT_EQ(r.config.zero.prefetch_bucket_size, 50000000u);
  EXPECT_EQ(r.config.zero.param_persistence_threshold, 100000u);
  EXPECT_FALSE(r.config.optimizer.has_value());
}

// The ZeRO-Infinity config from the seed document (shared/seeds/000_...).
TEST(ConfigCorpus, SeedStage3NvmeParamCpuOptimizer) {
  const ParseResult r = parse(R"({
    "zero_optimization": {
      "stage": 3,
      "offload_optimizer": {"device": "cpu"},
      "offload_param": {"device": "nvme", "nvme_path": "/nvme"}
    }})");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.zero.stage, 3);
  EXPECT_EQ(r.config.zero.offload_param.device, OffloadDevice::nvme);
  EXPECT_EQ(r.config.zero.offload_param.nvme_path, std::vector<std::string>{"/nvme"});
  EXPECT_EQ(r.config.zero.offload_optimizer.device, OffloadDevice::cpu);
  EXPECT_TRUE(r.config.zero.overlap_comm);  // stage 3 default
}

// The stage-3 CPU offload config from the seed document (shared/seeds/004_...).
TEST(ConfigCorpus, SeedStage3CpuOffloadWithBuckets) {
  const ParseResult r = parse(R"({
    "zero_optimization": {
      "stage": 3,
      "offload_optimizer": {"device": "cpu", "pin_memory": true},
      "offload_param": {"device": "cpu", "pin_memory": true},
      "overlap_comm": true,
      "contiguous_gradients": true,
      "reduce_bucket_size": 500000000,
      "stage3_prefetch_bucket_size": 500000000,
      "stage3_param_persistence_threshold": 1000000
    }})");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.zero.prefetch_bucket_size, 500000000u);
  EXPECT_EQ(r.config.zero.param_persistence_threshold, 1000000u);
  EXPECT_EQ(r.config.zero.reduce_bucket_size, 500000000u);
  EXPECT_EQ(r.config.zero.offload_param.device, OffloadDevice::cpu);
}

TEST(ConfigCorpus, WholeDeepSpeedConfigWithTrainerKeysLoads) {
  const ParseResult r = parse(R"({
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 8,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": true},
    "fp16": {"enabled": false, "loss_scale": 0},
    "wall_clock_breakdown": false,
    "activation_checkpointing": {"partition_activations": true},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 100}},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95], "eps": 1e-8,
                                              "weight_decay": 0.1}},
    "aio": {"block_size": 1048576, "queue_depth": 32, "intra_op_parallelism": 2,
            "single_submit": false, "overlap_events": true},
    "zero_optimization": {
      "stage": 3, "round_robin_gradients": true, "allgather_partitions": true,
      "offload_param": {"device": "nvme", "nvme_path": ["/nvme0", "/nvme1"], "buffer_count": 5,
                        "buffer_size": 1e8, "max_in_cpu": 1e9, "pin_memory": true},
      "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme0", "pipeline_read": true,
                            "pipeline_write": true, "buffer_count": 4, "ratio": 1},
      "sub_group_size": 1e9,
      "stage3_max_live_parameters": 1e9,
      "stage3_max_reuse_distance": 1e9,
      "stage3_gather_16bit_weights_on_model_save": true
    }})");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.aio.queue_depth, 32u);
  EXPECT_EQ(r.config.aio.intra_op_parallelism, 2u);
  EXPECT_EQ(r.config.zero.offload_param.nvme_path, (std::vector<std::string>{"/nvme0", "/nvme1"}));
  EXPECT_EQ(r.config.zero.offload_param.buffer_size, 100000000u);  // 1e8 written as a float
  EXPECT_TRUE(r.config.zero.offload_optimizer.pipeline_read);
  EXPECT_TRUE(r.config.zero.gather_16bit_weights_on_model_save);
  ASSERT_TRUE(r.config.optimizer.has_value());
  EXPECT_EQ(r.config.optimizer->type, "AdamW");
  EXPECT_DOUBLE_EQ(r.config.optimizer->lr, 1e-3);  // "auto": the default
  EXPECT_DOUBLE_EQ(r.config.optimizer->beta2, 0.95);
  EXPECT_DOUBLE_EQ(r.config.optimizer->weight_decay, 0.1);
  EXPECT_TRUE(r.config.optimizer->adam_w_mode);
  EXPECT_DOUBLE_EQ(r.config.training.gradient_clipping, 1.0);
  EXPECT_EQ(r.config.training.gradient_accumulation_steps, 8u);
  EXPECT_EQ(r.config.training.precision, Precision::bf16);
}

TEST(ConfigCorpus, TrainingKeysDefaultAndReject) {
  const ParseResult defaults = parse("{}");
  EXPECT_DOUBLE_EQ(defaults.config.training.gradient_clipping, 0.0);
  EXPECT_EQ(defaults.config.training.gradient_accumulation_steps, 1u);
  EXPECT_EQ(defaults.config.training.precision, Precision::fp32);
  EXPECT_EQ(parse(R"({"fp16": {"enabled": true}})").config.training.precision, Precision::fp16);
  EXPECT_EQ(parse(R"({"gradient_accumulation_steps": "auto"})").config.training.gradient_accumulation_steps, 1u);

  const ParseResult zero_steps = parse(R"({"gradient_accumulation_steps": 0})");
  ASSERT_EQ(zero_steps.problems.size(), 1u);
  EXPECT_EQ(zero_steps.problems[0].key_path, "gradient_accumulation_steps");
  const ParseResult negative = parse(R"({"gradient_clipping": -1})");
  ASSERT_EQ(negative.problems.size(), 1u);
  EXPECT_EQ(negative.problems[0].key_path, "gradient_clipping");
  const ParseResult both = parse(R"({"bf16": {"enabled": true}, "fp16": {"enabled": true}})");
  ASSERT_EQ(both.problems.size(), 1u);
  EXPECT_EQ(both.problems[0].key_path, "fp16.enabled");
  const ParseResult not_bool = parse(R"({"bf16": {"enabled": "yes"}})");
  ASSERT_EQ(not_bool.problems.size(), 1u);
  EXPECT_EQ(not_bool.problems[0].key_path, "bf16.enabled");
}

TEST(ConfigCorpus, PlainAdamMeansDecoupledDecayUnlessSaidOtherwise) {
  ParseResult r = parse(R"({"optimizer": {"type": "Adam", "params": {"lr": 3e-4}}})");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_TRUE(r.config.optimizer->adam_w_mode);
  r = parse(R"({"optimizer": {"type": "Adam", "params": {"adam_w_mode": false}}})");
  EXPECT_FALSE(r.config.optimizer->adam_w_mode);
}

TEST(ConfigCorpus, AdagradDefaultsAreTorchsNotAdams) {
  // DeepSpeed builds torch's Adagrad (or DeepSpeedCPUAdagrad) from the
  // block: lr 1e-2 and eps 1e-10 where the config names neither.
  ParseResult r = parse(R"({"optimizer": {"type": "Adagrad", "params": {"weight_decay": 0.1}}})");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_DOUBLE_EQ(r.config.optimizer->lr, 1e-2);
  EXPECT_DOUBLE_EQ(r.config.optimizer->eps, 1e-10);
  r = parse(R"({"optimizer": {"type": "adagrad", "params": {"lr": 0.5, "eps": 1e-6}}})");
  EXPECT_DOUBLE_EQ(r.config.optimizer->lr, 0.5);
  EXPECT_DOUBLE_EQ(r.config.optimizer->eps, 1e-6);
  r = parse(R"({"optimizer": {"type": "Lion"}})");
  EXPECT_DOUBLE_EQ(r.config.optimizer->lr, 1e-3);
  EXPECT_DOUBLE_EQ(r.config.optimizer->beta2, 0.999);
}

TEST(ConfigCorpus, DeprecatedSpellingsLoadWithWarnings) {
  const ParseResult r = parse(R"({
    "aio": {"num_threads": 4},
    "zero_optimization": {"stage": 3, "cpu_offload": true, "cpu_offload_param": true,
                          "prefetch_bucket_size": 1000}})");
  ASSERT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.aio.intra_op_parallelism, 4u);
  EXPECT_EQ(r.config.zero.offload_optimizer.device, OffloadDevice::cpu);
  EXPECT_EQ(r.config.zero.offload_param.device, OffloadDevice::cpu);
  EXPECT_EQ(r.config.zero.prefetch_bucket_size, 1000u);
  EXPECT_EQ(r.warnings.size(), 3u);
}

// ---------------------------------------------------------------- traps

struct Trap {
  const char* name;
  const char* json;
  const char* key_path;
  const char* message_part;
};

class ConfigTrap : public ::testing::TestWithParam<Trap> {};

TEST_P(ConfigTrap, IsReportedWithItsKeyPath) {
  const Trap& trap = GetParam();
  const ParseResult r = parse(trap.json);
  ASSERT_FALSE(r.problems.empty()) << trap.name << " was accepted";
  bool found = false;
  for (const auto& p : r.problems) {
    if (p.key_path == trap.key_path && p.message.find(trap.message_part) != std::string::npos) found = true;
  }
  EXPECT_TRUE(found) << "expected " << trap.key_path << ": ..." << trap.message_part << "...\ngot:\n"
                     << problems_of(r);
}

INSTANTIATE_TEST_SUITE_P(
    Traps, ConfigTrap,
    ::testing::Values(
        Trap{"typo_in_offload_param", R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "buffer_sise": 10}}})",
             "zero_optimization.offload_param.buffer_sise", "did you mean \"buffer_size\""},
        Trap{"typo_in_aio", R"({"aio": {"queue_dept": 8}})", "aio.queue_dept", "did you mean \"queue_depth\""},
        Trap{"typo_in_zero", R"({"zero_optimization": {"stage3_prefetch_bucket_sise": 1}})",
             "zero_optimization.stage3_prefetch_bucket_sise", "did you mean \"stage3_prefetch_bucket_size\""},
        Trap{"string_false", R"({"aio": {"single_submit": "false"}})", "aio.single_submit",
             "must be true or false, not the string \"false\""},
        Trap{"fractional_count", R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "buffer_count": 2.5}}})",
             "zero_optimization.offload_param.buffer_count", "whole number"},
        Trap{"negative_count", R"({"zero_optimization": {"sub_group_size": -1}})",
             "zero_optimization.sub_group_size", "whole number"},
        Trap{"nvme_without_path", R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})",
             "zero_optimization.offload_param.nvme_path", "required when device is \"nvme\""},
        Trap{"optimizer_nvme_without_path", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})",
             "zero_optimization.offload_optimizer.nvme_path", "required"},
        Trap{"ratio_needs_stage3", R"({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}})",
             "zero_optimization.offload_optimizer.ratio", "needs ZeRO stage 3"},
        Trap{"ratio_range", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 1.5}}})",
             "zero_optimization.offload_optimizer.ratio", "between 0 and 1"},
        Trap{"state_format_value", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "state_format": "fp8"}}})",
             "zero_optimization.offload_optimizer.state_format", "must be \"fp32\", \"bf16\" or \"int8\", not the string \"fp8\""},
        Trap{"gradients_value", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/x", "gradients": "gpu"}}})",
             "zero_optimization.offload_optimizer.gradients", "must be \"nvme\" or \"cpu\", not the string \"gpu\""},
        Trap{"min_swap_bytes_value", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/x", "min_swap_bytes": -1}}})",
             "zero_optimization.offload_optimizer.min_swap_bytes", "-1"},
        Trap{"gradients_nvme_needs_nvme", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "gradients": "nvme"}}})",
             "zero_optimization.offload_optimizer.gradients", "\"nvme\" needs zero_optimization.offload_optimizer.device \"nvme\""},
        Trap{"state_format_needs_adam", R"({"optimizer": {"type": "Lion"}, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "state_format": "bf16"}}})",
             "zero_optimization.offload_optimizer.state_format", "compressed states are Adam's two moments; Lion keeps fp32"},
        Trap{"bad_device", R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "disk"}}})",
             "zero_optimization.offload_param.device", "\"none\", \"cpu\" or \"nvme\""},
        Trap{"stage_range", R"({"zero_optimization": {"stage": 4}})", "zero_optimization.stage", "between 0 and 3"},
        Trap{"block_size_alignment", R"({"aio": {"block_size": 1000000}})", "aio.block_size", "multiple of 1024"},
        Trap{"queue_depth_zero", R"({"aio": {"queue_depth": 0}})", "aio.queue_depth", "between 1 and 4096"},
        Trap{"empty_path_list_item", R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": ["/a", 3]}}})",
             "zero_optimization.offload_param.nvme_path", "must list directory paths"},
        Trap{"betas_shape", R"({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}})",
             "optimizer.params.betas", "list of two numbers"},
        Trap{"unsupported_offload_optimizer", R"({"optimizer": {"type": "Lamb"}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})",
             "optimizer.type", "no CPU implementation"},
        Trap{"prefix_and_plain_twice", R"({"zero_optimization": {"stage3_max_live_parameters": 1, "max_live_parameters": 2}})",
             "zero_optimization.max_live_parameters", "given twice"},
        Trap{"amsgrad", R"({"optimizer": {"type": "Adam", "params": {"amsgrad": true}}})",
             "optimizer.params.amsgrad", "not supported"},
        Trap{"top_level_typo_zero", R"({"zero_optimisation": {"stage": 3}})", "zero_optimisation",
             "did you mean \"zero_optimization\""},
        Trap{"top_level_typo_aio", R"({"aoi": {"block_size": 1048576}})", "aoi", "did you mean \"aio\""},
        Trap{"top_level_typo_optimizer", R"({"optimiser": {"type": "Adam"}})", "optimiser",
             "did you mean \"optimizer\""},
        Trap{"top_level_typo_bf16", R"({"bf_16": {"enabled": true}})", "bf_16", "did you mean \"bf16\""},
        Trap{"fp16_enabled_auto", R"({"fp16": {"enabled": "auto"}})", "fp16.enabled", "is \"auto\""},
        Trap{"bf16_enabled_auto", R"({"bf16": {"enabled": "auto"}})", "bf16.enabled", "write true or false"},
        Trap{"unsupported_optimizer_without_offload", R"({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}})",
             "optimizer.type", "zinf steps Adam, AdamW, Adagrad and Lion"},
        Trap{"ratio_below_one_is_not_supported", R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}}})",
             "zero_optimization.offload_optimizer.ratio", "not supported"},
        Trap{"aio_nested_in_zero", R"({"zero_optimization": {"stage": 3, "aio": {"block_size": 1048576}}})",
             "zero_optimization.aio", "belongs at the top level"},
        Trap{"not_json", R"({"aio": )", "<json>", "not valid JSON"},
        // Found by fuzzing: a number beyond a double threw past the parser.
        Trap{"number_beyond_a_double", R"({"gradient_clipping": 5E455})", "<json>", "not valid JSON"},
        Trap{"not_an_object", R"([1, 2])", "<root>", "JSON object"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Config, UnknownTopLevelKeysFarFromDeepSpeedsAreIgnoredWithAWarning) {
  const ParseResult r = parse(R"({"my_trainer_settings": {"x": 1}, "train_batch_size": 8, "steps_per_print": 10,
                                  "amp": {"enabled": false}, "comms_logger": {}, "zero_optimization": {"stage": 1}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings.front().find("my_trainer_settings"), std::string::npos);
}

// DeepSpeed's MiCS groups change memory and traffic, not the values: the
// config loads, saying zinf shards over every rank; its default (-1) and 0
// say nothing.
TEST(Config, MicsShardSizeLoadsWithAWarningThatZinfShardsOverEveryRank) {
  const ParseResult r = parse(R"({"zero_optimization": {"stage": 3, "mics_shard_size": 8}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings.front().find("mics_shard_size (8): zinf shards every parameter over all ranks"),
            std::string::npos) << r.warnings.front();
  EXPECT_TRUE(parse(R"({"zero_optimization": {"stage": 3, "mics_shard_size": -1}})").warnings.empty());
}

// DeepSpeed reads only "type" and "params" of the optimizer block (its
// fp16 tests put "torch_adam" beside them): others are ignored, said; a
// near miss of the two is the typo it looks like.
TEST(Config, OptimizerBlockKeysBesideTypeAndParamsAreIgnoredWithAWarning) {
  const ParseResult r = parse(R"({"optimizer": {"type": "Adam", "torch_adam": true, "params": {"lr": 0.001}}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings.front().find("optimizer.torch_adam"), std::string::npos) << r.warnings.front();
  EXPECT_NE(r.warnings.front().find("from optimizer.params"), std::string::npos) << r.warnings.front();
  ASSERT_TRUE(r.config.optimizer.has_value());
  EXPECT_EQ(r.config.optimizer->lr, 0.001);
  const ParseResult typo = parse(R"({"optimizer": {"type": "Adam", "parms": {"lr": 0.001}}})");
  ASSERT_EQ(typo.problems.size(), 1u) << problems_of(typo);
  EXPECT_EQ(typo.problems.front().key_path, "optimizer.parms");
  EXPECT_NE(typo.problems.front().message.find("did you mean \"params\""), std::string::npos);
}

TEST(Config, PipelineFalseIsSaidNotSilentlyIgnored) {
  const ParseResult r = parse(R"({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme",
      "nvme_path": "/x", "pipeline_read": false, "pipeline_write": true}}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings.front().find("pipeline_read is false"), std::string::npos) << r.warnings.front();
}

// A stage-3 config turned into a stage-2 one often keeps its offload_param
// block; DeepSpeed ignores it below stage 3, and so does zinf, saying so.
TEST(Config, OffloadParamBelowStageThreeIsIgnoredAndSaid) {
  for (int stage : {0, 1, 2}) {
    const ParseResult r = parse(fmt::format(R"({{"zero_optimization": {{"stage": {},
        "offload_param": {{"device": "nvme"}}}}}})", stage));
    EXPECT_TRUE(r.problems.empty()) << problems_of(r);  // not even the missing nvme_path
    ASSERT_EQ(r.warnings.size(), 1u) << stage;
    EXPECT_NE(r.warnings.front().find("zero_optimization.offload_param.device: \"nvme\" is ignored below ZeRO "
                                      "stage 3 (zero_optimization.stage is " + std::to_string(stage) + ")"),
              std::string::npos)
        << r.warnings.front();
    EXPECT_EQ(r.config.zero.offload_param.device, OffloadDevice::none);
  }
  // Its keys are still checked: a typo is a typo at any stage.
  const ParseResult typo = parse(R"({"zero_optimization": {"stage": 2, "offload_param": {"devise": "cpu"}}})");
  ASSERT_EQ(typo.problems.size(), 1u);
  EXPECT_EQ(typo.problems.front().key_path, "zero_optimization.offload_param.devise");
}

// The optimizer's states can go to host memory or NVMe at every stage (zinf
// runs stage 0 as stage 1: the states are partitioned either way).
TEST(Config, OptimizerOffloadIsReadAtEveryStage) {
  for (int stage : {0, 1, 2, 3}) {
    for (const char* device : {"cpu", "nvme"}) {
      const ParseResult r = parse(fmt::format(R"({{"zero_optimization": {{"stage": {},
          "offload_optimizer": {{"device": "{}", "nvme_path": "/x"}}}}}})", stage, device));
      EXPECT_TRUE(r.problems.empty()) << stage << device << problems_of(r);
      EXPECT_TRUE(r.warnings.empty()) << stage << device;
      EXPECT_EQ(r.config.zero.offload_optimizer.device,
                std::string_view(device) == "cpu" ? OffloadDevice::cpu : OffloadDevice::nvme);
    }
  }
}

// Hugging Face's own stage-3 test config sets reduce_bucket_size 0, which
// DeepSpeed reads as "reduce each gradient on its own".
TEST(Config, ReduceBucketSizeZeroReducesEachGradientAlone) {
  const ParseResult r = parse(R"({"zero_optimization": {"stage": 3, "reduce_bucket_size": 0,
                                  "stage3_prefetch_bucket_size": 0}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.zero.reduce_bucket_size, 0u);
  EXPECT_EQ(r.config.zero.prefetch_bucket_size, 0u);
}

TEST(Config, GpuDirectStorageAskedForIsSaidToBeAbsent) {
  const ParseResult r = parse(R"({"aio": {"use_gds": true}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings.front().find("aio.use_gds is true: zinf has no GPUDirect Storage path"), std::string::npos);
  EXPECT_TRUE(parse(R"({"aio": {"use_gds": false}})").warnings.empty());
}

TEST(Config, StateFormatReadsEachFormat) {
  EXPECT_EQ(parse("{}").config.zero.offload_optimizer.state_format, StateFormat::fp32);
  for (const auto& [text, format] : {std::pair{"fp32", StateFormat::fp32}, std::pair{"bf16", StateFormat::bf16},
                                     std::pair{"int8", StateFormat::int8}}) {
    const ParseResult r = parse(fmt::format(R"({{"zero_optimization": {{"stage": 3, "offload_optimizer": {{"device":
        "nvme", "nvme_path": "/x", "state_format": "{}"}}}}}})", text));
    EXPECT_TRUE(r.problems.empty()) << problems_of(r);
    EXPECT_EQ(r.config.zero.offload_optimizer.state_format, format) << text;
  }
}

// offload_optimizer.gradients (zinf's): on NVMe by default with the
// optimizer there, in host memory when asked or when the optimizer is not.
TEST(Config, GradientsFollowTheOptimizerToNvmeUnlessCpuIsAsked) {
  const auto keeps = [](const std::string& block) {
    const ParseResult r = parse(R"({"zero_optimization": {"stage": 3, "offload_optimizer": )" + block + "}}");
    EXPECT_TRUE(r.problems.empty()) << problems_of(r);
    return r.config.zero.offload_optimizer.keeps_gradients_on_nvme();
  };
  EXPECT_TRUE(keeps(R"({"device": "nvme", "nvme_path": "/x"})"));
  EXPECT_TRUE(keeps(R"({"device": "nvme", "nvme_path": "/x", "gradients": "nvme"})"));
  EXPECT_FALSE(keeps(R"({"device": "nvme", "nvme_path": "/x", "gradients": "cpu"})"));
  EXPECT_FALSE(keeps(R"({"device": "cpu"})"));
  EXPECT_FALSE(keeps(R"({"device": "cpu", "gradients": "cpu"})"));
}

TEST(Config, TheBfloat16SpellingEnablesBf16) {
  const ParseResult r = parse(R"({"bfloat16": {"enabled": true}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_EQ(r.config.training.precision, Precision::bf16);
  EXPECT_FALSE(parse(R"({"bfloat16": {"enabled": true}, "fp16": {"enabled": true}})").problems.empty());
}

TEST(Config, EveryProblemIsCollectedNotJustTheFirst) {
  const ParseResult r = parse(R"({"aio": {"queue_depth": 0, "block_size": 3}, "zero_optimization": {"stage": 9}})");
  EXPECT_EQ(r.problems.size(), 3u) << problems_of(r);
}

TEST(Config, LoadThrowsAConfigErrorNamingTheKeyPath) {
  try {
    load_config_string(R"({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})");
    FAIL();
  } catch (const Error& error) {
    EXPECT_EQ(error.kind(), ErrorKind::config);
    EXPECT_EQ(error.context().key_path, "zero_optimization.offload_param.nvme_path");
    EXPECT_NE(std::string(error.what()).find("zero_optimization.offload_param.nvme_path"), std::string::npos);
  }
}

TEST(Config, LoadFileNamesTheFile) {
  zinf::testing::TempDir dir;
  const auto path = dir / "ds.json";
  std::ofstream(path) << R"({"aio": {"queue_depth": "deep"}})";
  try {
    load_config_file(path);
    FAIL();
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(path.string()), std::string::npos) << error.what();
    EXPECT_NE(std::string(error.what()).find("aio.queue_depth"), std::string::npos) << error.what();
  }
  EXPECT_THROW(load_config_file(dir / "missing.json"), Error);
}

}  // namespace
TEST(Config, ZinfsOwnBlockIsCheckedLikeTheOthers) {
  ParseResult r = parse(R"({"zinf": {"timeout_s": 60, "optimizer_threads": 2, "tbw": 600, "collectives": "host"}})");
  EXPECT_TRUE(r.problems.empty()) << problems_of(r);
  EXPECT_TRUE(r.warnings.empty());  // not "not a DeepSpeed key"
  r = parse(R"({"zinf": {"tbww": 600, "timeout_s": -1}})");
  ASSERT_EQ(r.problems.size(), 2u) << problems_of(r);
  EXPECT_NE(problems_of(r).find("zinf.tbww: unknown key; did you mean \"tbw\"?"), std::string::npos) << problems_of(r);
  EXPECT_NE(problems_of(r).find("zinf.timeout_s"), std::string::npos) << problems_of(r);
  r = parse(R"({"zinf": {"collectives": "nccl"}})");
  ASSERT_EQ(r.problems.size(), 1u) << problems_of(r);
  EXPECT_NE(problems_of(r).find("zinf.collectives: must be \"auto\" or \"host\""), std::string::npos) << problems_of(r);
  r = parse(R"({"zinf": 3})");
  EXPECT_EQ(r.problems.size(), 1u);
}

}  // namespace zinf::config

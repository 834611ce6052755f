"""DeepSpeed's deepspeed.runtime paths scripts import from, under zinf.runtime:
the schedulers and context managers by their DeepSpeed module paths, the
engine class by DeepSpeed's name, see_memory_usage, and the ZeRO memory
estimators answering with what zinf's engine allocates."""
import logging
import os
import sys

import pytest
import torch

import zinf

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from initialize_model import make_model  # noqa: E402

GIB = 2**30


def test_deepspeeds_runtime_paths_give_zincs_own_objects():
    from zinf.runtime.lr_schedules import OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR
    from zinf.runtime.zero.partition_parameters import GatheredParameters, Init
    from zinf.runtime.engine import DeepSpeedEngine
    assert (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle) == (
        zinf.lr_schedules.WarmupLR, zinf.lr_schedules.WarmupDecayLR, zinf.lr_schedules.WarmupCosineLR,
        zinf.lr_schedules.OneCycle)
    assert (Init, GatheredParameters) == (zinf.zero.Init, zinf.zero.GatheredParameters)
    assert DeepSpeedEngine is zinf.DeepSpeedEngine is zinf.ZinfEngine


def test_activation_checkpointing_by_its_runtime_path_is_zinf_checkpointing():
    from zinf.runtime.activation_checkpointing import checkpointing
    import zinf.runtime.activation_checkpointing.checkpointing as by_import
    assert checkpointing is by_import is zinf.checkpointing
    checkpointing.configure(None, partition_activations=False, num_checkpoints=3)
    try:
        assert zinf.checkpointing.is_configured()  # one module: configured through either path
    finally:
        zinf.checkpointing._forget_configuration()


def test_the_engine_is_a_deepspeed_engine_to_code_that_checks():
    # Accelerate and Trainer code asks isinstance(model, DeepSpeedEngine).
    engine, _, _, _ = zinf.initialize(model=make_model(), config={"train_batch_size": 2})
    try:
        assert isinstance(engine, zinf.runtime.engine.DeepSpeedEngine)
    finally:
        engine.close()


def test_see_memory_usage_logs_only_when_forced(caplog):
    from zinf.runtime.utils import see_memory_usage
    with caplog.at_level(logging.INFO, logger="zinf"):
        see_memory_usage("before the model")
        assert caplog.records == []  # DeepSpeed's default: force=False says nothing
        see_memory_usage("after the model", force=True)
    text = caplog.text
    assert "after the model" in text and "MA " in text and "Max_CA" in text
    used = float(text.split("CPU Virtual Memory:  used = ")[1].split(" GB")[0])
    assert 0 < used < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def test_see_memory_usage_prints_where_no_logging_is_set_up(monkeypatch, capsys):
    # DeepSpeed's logger has a handler of its own: a script that set up no
    # logging still sees the lines.
    from zinf.runtime.utils import see_memory_usage
    monkeypatch.setattr(logging.getLogger("zinf"), "hasHandlers", lambda: False)
    see_memory_usage("after the optimizer", force=True)
    out = capsys.readouterr().out
    assert out.startswith("after the optimizer\nMA ") and "CPU Virtual Memory:  used = " in out


def test_the_zero3_estimate_is_what_zinfs_plan_allocates():
    from zinf.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    params, largest = 10**9, 10**7
    host, gpu, largest_bytes = estimate_zero3_model_states_mem_needs(params, largest, additional_buffer_factor=1.0)
    # Offload of both to the CPU, one rank (swap/memory_plan.hpp): fp32
    # gradients 4, the bf16 partition 2, master and Adam's moments 12 bytes
    # per param held; one sub-group (all of it, sub_group_size 1e9) of fp32
    # masters more while the engine initialises; a host copy of the largest
    # gradient for the collectives.
    assert host == 18 * params + 4 * params + 4 * largest
    assert largest_bytes == 4 * largest
    assert gpu > 0  # the gathered layers, the gradients awaiting their reduction
    scaled, _, _ = estimate_zero3_model_states_mem_needs(params, largest)  # DeepSpeed's default factor 1.5
    assert scaled == int(1.5 * host)
    # zinf.initialize's engine keeps its state in host memory whatever the
    # model's device: offload_param none costs what cpu does.
    none = estimate_zero3_model_states_mem_needs(params, largest, cpu_offload_params=False,
                                                 additional_buffer_factor=1.0)
    assert none == (host, gpu, largest_bytes)
    # Eight ranks on the node: each holds an eighth of the partitions, and
    # a gradient copy of its own.
    per_node, _, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=8,
                                                           additional_buffer_factor=1.0)
    assert per_node == 18 * params + 4 * params + 8 * 4 * largest
    # Without zero.Init every rank first builds the whole model in fp32.
    built_whole, _, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=8, zero_init=False,
                                                              additional_buffer_factor=1.0)
    assert built_whole == max(per_node, 8 * 4 * params)


def test_the_zero3_table_shows_every_offload_with_nvme(capsys):
    from zinf.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs_all_cold,
                                          estimate_zero3_model_states_mem_needs_all_live)
    model = make_model()
    estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=2, num_nodes=2)
    out = capsys.readouterr().out
    assert "HW: Setup with 2 nodes, 2 GPUs per node." in out
    total = sum(p.numel() for p in model.parameters())
    assert f"SW: Model with {int(total / 1e6)}M total params" in out
    estimate_zero3_model_states_mem_needs_all_cold(7 * 10**9, 10**8, num_gpus_per_node=2, num_nodes=2)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "offload_param=" in line]
    assert len(rows) == 10  # five offload choices, with and without zero_init
    nvme = next(r for r in rows if "offload_param=nvme, offload_optimizer=nvme, zero_init=1" in r)
    cpu = next(r for r in rows if "offload_param=cpu , offload_optimizer=cpu , zero_init=1" in r)
    host = [float(r.split("GB")[0]) for r in (nvme, cpu)]
    nvme_bytes = [float(r.split("|")[2].split("GB")[0]) for r in (nvme, cpu)]
    assert host[0] < host[1] and nvme_bytes[0] > 0 == nvme_bytes[1]  # NVMe takes the states off the host


def test_the_zero2_estimate_keeps_the_model_whole_on_the_gpu(capsys):
    from zinf.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                 estimate_zero2_model_states_mem_needs_all_cold)
    params = 10**9
    host, gpu = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=2, additional_buffer_factor=1.0)
    assert gpu >= 2 * params  # every param whole in bf16 on each GPU
    assert host >= 2 * 4 * params  # each of the node's two ranks built the model in fp32
    estimate_zero2_model_states_mem_needs_all_cold(params)
    out = capsys.readouterr().out
    assert "SW: Model with 1000M total params." in out
    assert "offload_optimizer=cpu" in out and "offload_optimizer=none" in out


def test_the_utils_scripts_import_by_deepspeeds_paths():
    from zinf.utils import RepeatingLoader
    from zinf.utils.logging import log_dist, logger
    from zinf.runtime.dataloader import RepeatingLoader as by_runtime_path
    assert by_runtime_path is RepeatingLoader
    assert (logger, log_dist) == (zinf.utils.logger, zinf.utils.log_dist)
    # A loop counted in steps: the loader starts again when it runs out.
    loader = torch.utils.data.DataLoader(list(range(5)), batch_size=2)
    repeating = iter(RepeatingLoader(loader))
    assert [next(repeating).tolist() for _ in range(5)] == [[0, 1], [2, 3], [4], [0, 1], [2, 3]]


def test_moe_paths_pass_dense_models_and_refuse_experts():
    """Scripts import deepspeed.moe for an optional MoE mode: their dense
    models' param groups pass through; expert params and MoE layers, which
    zinf cannot train right, are refused with the reason."""
    from zinf.moe.layer import MoE
    from zinf.moe.utils import (configure_moe_param_groups, has_moe_layers, is_moe_param,
                                split_params_into_different_moe_groups_for_optimizer,
                                split_params_into_shared_and_expert_params)
    model = make_model()
    params = list(model.parameters())
    assert has_moe_layers(model) == (False, 0)
    group = {"params": params, "name": "all", "lr": 0.1}
    assert split_params_into_different_moe_groups_for_optimizer(group) == [group]
    assert split_params_into_different_moe_groups_for_optimizer((group,)) == [group]
    assert configure_moe_param_groups(params)[0]["params"] == params
    assert split_params_into_shared_and_expert_params(params) == (params, [])
    expert = torch.nn.Parameter(torch.zeros(3))
    expert.allreduce = False  # as DeepSpeed's MoE marks its experts
    assert is_moe_param(expert) and not is_moe_param(params[0])
    with pytest.raises(ValueError, match="mixture-of-experts param.*no expert parallelism"):
        split_params_into_different_moe_groups_for_optimizer([group, {"params": [expert], "name": "experts"}])
    with pytest.raises(ValueError, match="no expert parallelism"):
        configure_moe_param_groups([group, {"params": [expert], "name": "experts", "moe": True}])
    with pytest.raises(ValueError, match="Unknown param group type"):
        split_params_into_different_moe_groups_for_optimizer(params[0])
    with pytest.raises(NotImplementedError, match="no mixture-of-experts layer"):
        MoE(hidden_size=8, expert=torch.nn.Linear(8, 8), num_experts=2)


def test_zero_param_status_is_importable_where_deepspeed_has_it():
    from zinf.runtime.zero.partition_parameters import ZeroParamStatus, ZeroParamType
    assert zinf.zero.ZeroParamStatus is ZeroParamStatus and zinf.zero.ZeroParamType is ZeroParamType
    assert {s.name for s in ZeroParamStatus} == {"AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"}


def test_pipeline_specs_build_and_a_pipeline_module_is_refused():
    """Files that define pipeline models beside dense ones (DeepSpeed's own
    test models) import deepspeed.pipe at the top: the specs work, the
    pipeline itself says zinf has none."""
    from zinf.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    spec = LayerSpec(torch.nn.Linear, 4, 2, bias=False)
    built = spec.build()
    assert isinstance(built, torch.nn.Linear) and built.bias is None and built.weight.shape == (2, 4)
    assert repr(spec) == "Linear(4, 2, bias=False)"
    tied = TiedLayerSpec("embed", torch.nn.Embedding, 10, 4, tied_weight_attr="weight")
    assert tied.key == "embed" and tied.tied_weight_attr == ["weight"]
    with pytest.raises(RuntimeError, match="torch.nn.Module subclass"):
        LayerSpec(len)
    with pytest.raises(NotImplementedError, match="no pipeline parallelism"):
        PipelineModule(layers=[spec], num_stages=2)


def test_version_and_op_facts_by_deepspeeds_paths(monkeypatch):
    from zinf.git_version_info import compatible_ops, installed_ops, torch_info, version
    from zinf.ops.op_builder import FusedLambBuilder
    from zinf.runtime.zero.offload_config import OffloadDeviceEnum
    from zinf.runtime.zero.partition_parameters import partitioned_param_data_shape
    from zinf.utils.torch import required_torch_version
    assert version == zinf.__version__ and torch_info["version"] == ".".join(torch.__version__.split(".")[:2])
    assert compatible_ops["cpu_adam"] and not compatible_ops["fused_lamb"] and installed_ops == compatible_ops
    assert not FusedLambBuilder().is_compatible()
    with pytest.raises(RuntimeError, match="no LAMB"):
        FusedLambBuilder().load()
    assert OffloadDeviceEnum("nvme") == "nvme" and OffloadDeviceEnum.cpu.value == "cpu"
    assert partitioned_param_data_shape == [0]
    assert required_torch_version(min_version=1.8) and not required_torch_version(max_version=1.0)
    monkeypatch.setattr(torch, "__version__", "2.2.0a0+git1234")  # a source build's pre-release
    assert required_torch_version(min_version="2.2", max_version=2.2)
    assert not required_torch_version(min_version="2.2.1")
    with pytest.raises(ValueError, match="min_version or max_version"):
        required_torch_version()


def test_lr_schedule_key_names_build_a_scheduler_block():
    from zinf.runtime.lr_schedules import WARMUP_LR, WARMUP_MAX_LR, WARMUP_NUM_STEPS, from_config
    schedule = from_config({"type": WARMUP_LR, "params": {WARMUP_MAX_LR: 0.1, WARMUP_NUM_STEPS: 4}}, [0.1])
    assert type(schedule).__name__ == "WarmupLR" and schedule.warmup_num_steps == 4


def test_optimizer_names_by_deepspeeds_config_path():
    from zinf.runtime.config import ADAM_OPTIMIZER, DEEPSPEED_OPTIMIZERS, DeepSpeedConfigError, ZINF_OPTIMIZERS
    assert ADAM_OPTIMIZER == "adam" and set(ZINF_OPTIMIZERS) <= set(DEEPSPEED_OPTIMIZERS)
    engine, _, _, _ = zinf.initialize(model=make_model(), config={"train_batch_size": 4,
                                                                  "optimizer": {"type": ADAM_OPTIMIZER}})
    assert engine.optimizer_name() == "adam"
    engine.close()
    with pytest.raises(DeepSpeedConfigError, match="optimizer.type"):
        zinf.initialize(model=make_model(), config={"train_batch_size": 4, "optimizer": {"type": "lamb"}})

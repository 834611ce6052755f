"""zinf.initialize against plain PyTorch training.

Multi-rank runs are real processes started with torchrun's variables
(initialize_worker.py, written as a DeepSpeed script), for ZeRO stages 0-3
and the offload combinations; after K steps the parameters equal those of
the same model trained in one process on the whole global batch with
torch.optim.AdamW, within fp32 tolerance. Also: schedulers, checkpoint and
resume, a rank dying, a torch optimizer passed in, configuration errors,
fp16 overflow handling and the 16-bit export.
"""
import json
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

import zinf
from zinf import lr_schedules

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from initialize_model import (ReadsItsChildsWeight, batch, group_lambdas, make_lora_model,  # noqa: E402
                              make_model, param_groups)

ADAMW = {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world, run, directory, timeout=240, master="127.0.0.1", per_node=None, prefix=None):
    """Runs initialize_worker.py in `world` processes with torchrun's
    variables; returns (codes, stderr texts, rank 0's result or None).
    `per_node` ranks share a node (LOCAL_RANK counts within it); `prefix(rank)`
    is a command to run rank's process under (another host's namespace)."""
    run = dict(run, out=os.path.join(directory, "result.pt"))
    path = os.path.join(directory, "run.json")
    with open(path, "w") as file:
        json.dump(run, file)
    per_node = per_node or world
    env_base = dict(os.environ, MASTER_ADDR=master, MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                    LOCAL_WORLD_SIZE=str(per_node), PYTHONPATH=os.pathsep.join([HERE] + sys.path),
                    OMP_NUM_THREADS="1")
    env_base.pop("GLOO_SOCKET_IFNAME", None)  # zinf finds the interface itself
    procs = []
    for rank in range(world):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank % per_node), GROUP_RANK=str(rank // per_node))
        command = [sys.executable, os.path.join(HERE, "initialize_worker.py"), path]
        procs.append(subprocess.Popen((prefix(rank) if prefix else []) + command, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    codes, errors = [], []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise AssertionError("a rank hung past %d s" % timeout)
        codes.append(proc.returncode)
        errors.append(err)
    result = torch.load(run["out"]) if os.path.exists(run["out"]) else None
    return codes, errors, result


def reference(config, steps, world, start_state=None, bias_decay=None, freeze=(), groups_spec=None,
              lambdas=False):
    """Plain single-process training on the global batch: rank r's
    micro-batches of each step, the mean loss over all of them."""
    model = make_model()
    if start_state is not None:
        model.load_state_dict(start_state)
    for name, p in model.named_parameters():
        if name in freeze:
            p.requires_grad_(False)
    micro = config.get("train_micro_batch_size_per_gpu", 4)
    accumulation = config.get("gradient_accumulation_steps", 1)
    params = config["optimizer"]["params"]
    groups = [p for p in model.parameters() if p.requires_grad]
    if bias_decay is not None:
        groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith("bias")]},
                  {"params": [p for n, p in model.named_parameters() if n.endswith("bias")],
                   "weight_decay": bias_decay}]
    if groups_spec is not None:
        groups = param_groups(model, groups_spec, only=groups)
    kind = torch.optim.Adam if config["optimizer"]["type"] == "Adam" else torch.optim.AdamW
    optimizer = kind(groups, lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                     weight_decay=params["weight_decay"])
    scheduler = lr_schedules.from_config(config["scheduler"], optimizer) if "scheduler" in config else None
    if lambdas:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_lambdas(len(optimizer.param_groups)))
    losses, lrs = [], []
    for step in range(steps):
        optimizer.zero_grad()
        for m in range(accumulation):
            for rank in range(world):
                x, y = batch(step, m, rank, micro)
                loss = torch.nn.functional.mse_loss(model(x), y)
                (loss / (accumulation * world)).backward()
                if rank == 0:
                    losses.append(float(loss))
        if config.get("gradient_clipping"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["gradient_clipping"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, lrs


def config_for(stage, offload_optimizer="none", offload_param="none", nvme=None, **extra):
    zero = {"stage": stage, "stage3_param_persistence_threshold": 30, "sub_group_size": 300,
            "stage3_prefetch_bucket_size": 700}
    for key, device in (("offload_optimizer", offload_optimizer), ("offload_param", offload_param)):
        if device != "none":
            zero[key] = {"device": device}
            if device == "nvme":
                zero[key]["nvme_path"] = nvme
    if offload_optimizer == "nvme":
        # These models' sub-groups (300 elements) are under 1 MiB: by
        # default (DeepSpeed's rule) they would stay in host memory. 0
        # swaps them, so the tests run the NVMe path.
        zero["offload_optimizer"]["min_swap_bytes"] = 0
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": ADAMW, "zero_optimization": zero,
              "steps_per_print": 0}
    config.update(extra)
    return config


def train_both(engine, plain, reference, steps, before_step=None, after_step=None):
    """`steps` steps of the engine and of `plain` with the torch optimizer
    `reference` on the same batches; then the engine's params equal plain's.
    Closes the engine."""
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x, y = batch(step, 0, 0, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        reference.step()
        reference.zero_grad()
        if after_step is not None:
            after_step(step)
    got = engine.consolidated_state_dict()
    for name, value in plain.named_parameters():
        assert torch.allclose(got[name], value, atol=2e-5), name
    engine.close()


def assert_matches(result, want_state, want_losses, atol=2e-5):
    for name, value in want_state.items():
        assert torch.allclose(result["state"][name], value, atol=atol, rtol=1e-4), \
            f"{name}: max difference {(result['state'][name] - value).abs().max().item()}"
    assert len(result["losses"]) == len(want_losses)
    for got, want in zip(result["losses"], want_losses):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6), (got, want)


CASES = [
    # (world, stage, offload_optimizer, offload_param, accumulation, clipping)
    (2, 0, "none", "none", 1, 0.0),
    (1, 0, "nvme", "none", 1, 0.0),
    (2, 1, "none", "none", 2, 0.0),
    (2, 1, "nvme", "none", 2, 0.05),
    (2, 2, "cpu", "none", 2, 0.05),
    (2, 2, "nvme", "cpu", 1, 0.0),  # offload_param below stage 3: ignored (said), as DeepSpeed ignores it
    (1, 3, "none", "none", 1, 0.0),
    (2, 3, "cpu", "cpu", 2, 0.05),
    (2, 3, "nvme", "nvme", 1, 0.05),
    (4, 3, "nvme", "cpu", 1, 0.0),
]


@pytest.mark.parametrize("world,stage,optimizer_device,param_device,accumulation,clipping", CASES)
def test_training_equals_plain_pytorch(scratch, world, stage, optimizer_device, param_device, accumulation,
                                       clipping):
    config = config_for(stage, optimizer_device, param_device, nvme=os.path.join(scratch, "nvme"),
                        gradient_accumulation_steps=accumulation, gradient_clipping=clipping)
    steps = 3
    codes, errors, result = launch(world, {"config": config, "steps": steps}, scratch)
    assert codes == [0] * world, "\n".join(errors)
    state, losses, _ = reference(config, steps, world)
    assert_matches(result, state, losses)
    assert result["steps"] == steps
    assert result["collectives"] == ("gloo" if world > 1 else "local")  # a CPU model: Gloo on host memory
    ignored = f'offload_param.device: "{param_device}" is ignored below ZeRO stage 3'
    assert (ignored in errors[0]) == (stage < 3 and param_device != "none"), errors[0]
    if optimizer_device == "nvme":
        assert result["timings"]["nvme_written_bytes"] > 0  # the states did go to NVMe
    # zinf.comm (deepspeed.comm) over the same group, from rank 0's side.
    comm = result["comm"]
    assert (comm["rank"], comm["world"], comm["local_rank"]) == (0, world, 0)
    assert comm["sum"] == world * (world + 1) / 2
    assert comm["gathered"] == [v for r in range(world) for v in (float(r), 10.0 + r)]
    assert comm["scattered"] == 0.0 * world  # rank 0's block of the sum of every rank's arange
    assert comm["gather"] == [100.0 + r for r in range(world)]
    assert comm["all_to_all"] == [10.0 * r for r in range(world)]  # rank r's piece for rank 0
    assert comm["object"] == {"from": world - 1} and comm["group_ranks"] == list(range(world))
    assert comm["reduce_scatter"] == sum(float(r) for r in range(world))  # rank 0's block: sum over r of r + 0


@pytest.mark.parametrize("world,zero_keys", [
    # Stage 3 as axolotl's and Hugging Face's test configs write it: a param
    # per sub-group (0), each gradient reduced alone (0), no prefetch (0),
    # nothing persistent, and the deprecated 16-bit save key.
    (2, {"stage": 3, "sub_group_size": 0, "reduce_bucket_size": 0, "stage3_prefetch_bucket_size": 0,
         "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 1e9,
         "stage3_max_reuse_distance": 1e9, "stage3_gather_fp16_weights_on_model_save": True,
         "offload_optimizer": {"device": "cpu", "pin_memory": True},
         "offload_param": {"device": "cpu", "pin_memory": True}}),
    # A persistence budget smaller than the small params together.
    (2, {"stage": 3, "stage3_param_persistence_threshold": 100, "stage3_model_persistence_threshold": 40,
         "overlap_comm": True, "contiguous_gradients": True, "round_robin_gradients": True}),
])
def test_configs_as_popular_trainers_write_them_train_as_plain_pytorch(scratch, world, zero_keys):
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
              "optimizer": ADAMW, "zero_optimization": zero_keys, "steps_per_print": 0,
              "wall_clock_breakdown": False}
    codes, errors, result = launch(world, {"config": config, "steps": 2}, scratch)
    assert codes == [0] * world, "\n".join(errors)
    state, losses, _ = reference(config, 2, world)
    assert_matches(result, state, losses)


_GROUP_SCRIPT = """
import json, sys, torch, zinf
kwargs = json.loads(sys.argv[1])
rank, world = zinf.init_distributed(**kwargs)
total = torch.tensor([float(rank + 1)])
zinf.comm.all_reduce(total)
print(json.dumps({"rank": rank, "world": world, "local": zinf.comm.get_local_rank(), "sum": float(total)}))
"""


def _group_of_two(envs, kwargs):
    """Two processes running _GROUP_SCRIPT with these environments and
    init_distributed arguments: their (exit code, stdout, stderr)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base["PYTHONPATH"] = os.pathsep.join(sys.path)
    procs = [subprocess.Popen([sys.executable, "-c", _GROUP_SCRIPT, json.dumps(kwargs[r])], env=dict(base, **envs[r]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    return [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]


def test_init_distributed_from_an_mpi_launchers_variables_or_explicit_arguments():
    """DeepSpeed's other ways in: mpirun's variables (Open MPI's here) with
    MASTER_ADDR exported, or init_method/rank/world_size passed; and an MPI
    launch without MASTER_ADDR fails naming it."""
    port = free_port()
    mpi = [{"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
            "MASTER_ADDR": "127.0.0.1"} for r in range(2)]
    results = _group_of_two(mpi, [{"distributed_port": port}] * 2)
    assert [code for code, _, _ in results] == [0, 0], results
    outs = [json.loads(out.splitlines()[-1]) for _, out, _ in results]
    assert [(o["rank"], o["world"], o["local"], o["sum"]) for o in outs] == [(0, 2, 0, 3.0), (1, 2, 1, 3.0)]
    tcp = f"tcp://127.0.0.1:{free_port()}"
    results = _group_of_two([{}, {}], [{"init_method": tcp, "rank": r, "world_size": 2} for r in range(2)])
    assert [json.loads(out.splitlines()[-1])["sum"] for _, out, _ in results] == [3.0, 3.0], results
    # torchrun's variables with init_method="env://", as DeepSpeed scripts pass it.
    port = free_port()
    torchrun = [{"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
                for r in range(2)]
    results = _group_of_two(torchrun, [{"init_method": "env://"}] * 2)
    assert [json.loads(out.splitlines()[-1])["sum"] for _, out, _ in results] == [3.0, 3.0], results
    code, _, err = _group_of_two([{k: v for k, v in m.items() if k != "MASTER_ADDR"} for m in mpi],
                                 [{}, {}])[0]
    assert code != 0 and "launched by MPI (OMPI_COMM_WORLD_RANK) without MASTER_ADDR" in err
    # An explicit init_method without this process's rank is refused before any rendezvous.
    with pytest.raises(ValueError, match="needs this process's rank"):
        zinf.init_distributed(init_method=tcp, world_size=2)


_ONE_PROCESS_SCRIPT = """
import json, torch, zinf
rank, world = zinf.init_distributed()
made = torch.distributed.is_available() and torch.distributed.is_initialized()
if made:
    torch.distributed.barrier()
    answer = (torch.distributed.get_rank(), torch.distributed.get_world_size())
else:
    answer = None
print(json.dumps({"rank": rank, "world": world, "made": made, "torch": answer}))
"""


def test_torchrun_with_one_process_makes_the_group_a_bare_process_does_not():
    """torchrun --nproc_per_node 1: DeepSpeed's init_distributed makes a
    world-1 group, and scripts then call torch.distributed.get_rank() or
    barrier() themselves. A bare `python train.py` joins nothing."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base["PYTHONPATH"] = os.pathsep.join(sys.path)
    torchrun = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
    results = {}
    for name, env in (("torchrun", dict(base, **torchrun)), ("bare", base)):
        out = subprocess.run([sys.executable, "-c", _ONE_PROCESS_SCRIPT], env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        results[name] = json.loads(out.stdout.splitlines()[-1])
    assert results["torchrun"] == {"rank": 0, "world": 1, "made": True, "torch": [0, 1]}
    assert results["bare"] == {"rank": 0, "world": 1, "made": False, "torch": None}


def test_comm_in_one_process_answers_rank_zero_of_one():
    from zinf import comm
    assert (comm.get_rank(), comm.get_world_size(), comm.is_initialized()) == (0, 1, False)
    t = torch.tensor([3.0])
    comm.all_reduce(t)
    comm.barrier()
    out = torch.empty(2)
    comm.all_gather_into_tensor(out, torch.tensor([1.0, 2.0]))
    assert t.item() == 3.0 and out.tolist() == [1.0, 2.0]
    # A single rank's share of the other collectives.
    pieces = [torch.empty(1)]
    comm.gather(torch.tensor([5.0]), gather_list=pieces)
    swapped = [torch.empty(1)]
    comm.all_to_all(swapped, [torch.tensor([6.0])])
    mine = torch.empty(1)
    comm.scatter(mine, scatter_list=[torch.tensor([7.0])])
    objects = [{"a": 1}]
    comm.broadcast_object_list(objects, src=0)
    comm.monitored_barrier()
    assert (pieces[0].item(), swapped[0].item(), mine.item(), objects) == (5.0, 6.0, 7.0, [{"a": 1}])
    assert comm.get_all_ranks_from_group() == [0] and comm.has_all_gather_into_tensor()
    assert comm.all_reduce(t, async_op=True).wait() and comm.all_to_all(swapped, [t], async_op=True).wait()


def test_a_scheduler_from_the_config_sets_the_rate_of_every_step(scratch):
    config = config_for(3, "cpu", "none", gradient_accumulation_steps=2,
                        scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02,
                                                                 "warmup_num_steps": 3, "warmup_type": "linear"}})
    codes, errors, result = launch(2, {"config": config, "steps": 4}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, lrs = reference(config, 4, 2)
    assert result["lrs"] == pytest.approx(lrs)
    assert lrs[0] != lrs[-1]  # the rate did change
    assert_matches(result, state, losses)


def test_checkpoint_and_resume_equals_uninterrupted_training(scratch):
    config = config_for(3, "nvme", "nvme", nvme=os.path.join(scratch, "nvme-a"), gradient_accumulation_steps=2,
                        scheduler={"type": "WarmupDecayLR", "params": {"warmup_max_lr": 0.02, "warmup_num_steps": 2,
                                                                      "total_num_steps": 6}})
    whole_dir = os.path.join(scratch, "whole")
    os.makedirs(whole_dir)
    codes, errors, whole = launch(2, {"config": config, "steps": 4}, whole_dir)
    assert codes == [0, 0], "\n".join(errors)

    config["zero_optimization"]["offload_optimizer"]["nvme_path"] = os.path.join(scratch, "nvme-b")
    config["zero_optimization"]["offload_param"]["nvme_path"] = os.path.join(scratch, "nvme-b")
    checkpoints = os.path.join(scratch, "checkpoints")
    first_dir, second_dir = os.path.join(scratch, "first"), os.path.join(scratch, "second")
    os.makedirs(first_dir)
    os.makedirs(second_dir)
    codes, errors, _ = launch(2, {"config": config, "steps": 2, "save": checkpoints}, first_dir)
    assert codes == [0, 0], "\n".join(errors)
    assert open(os.path.join(checkpoints, "latest")).read() == "global_step2"
    codes, errors, resumed = launch(2, {"config": config, "steps": 4, "load": checkpoints}, second_dir)
    assert codes == [0, 0], "\n".join(errors)
    assert resumed["steps"] == 4
    for name, value in whole["state"].items():
        assert torch.equal(resumed["state"][name], value), name
    assert resumed["lrs"] == whole["lrs"][2:]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_scripts_own_collectives_after_backward_do_not_meet_the_engines(scratch, stage):
    """A script that all-reduces its loss or waits at a barrier right after
    backward, on the default Gloo group, while the engine reduces gradients
    on its own thread: the engine's collectives go over a group of their
    own (before, they shared the default group and the two could pair up
    differently on each rank and hang), and training equals plain training."""
    config = config_for(stage, "cpu", gradient_accumulation_steps=2)
    codes, errors, result = launch(2, {"config": config, "steps": 3, "script_collectives": True}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 3, 2)
    assert_matches(result, state, losses)


@pytest.mark.parametrize("mode", ["Fail", "Warn", "Ignore"])
def test_checkpoint_tags_that_differ_over_the_ranks_follow_tag_validation(scratch, mode):
    """DeepSpeed's checkpoint.tag_validation: a tag per rank is an
    AssertionError on every rank with "Fail"; otherwise the ranks save under
    rank 0's tag (zinf's shards share one directory: before, the ranks hung
    in two), with a warning for "Warn", and the checkpoint resumes."""
    config = config_for(2, "cpu", train_batch_size=8, checkpoint={"tag_validation": mode})
    checkpoints = os.path.join(scratch, "checkpoints")
    codes, errors, result = launch(2, {"config": config, "steps": 1, "save": checkpoints, "tag_per_rank": True},
                                   scratch)
    assert codes == [0, 0], "\n".join(errors)
    if mode == "Fail":
        assert "the tag differs over the ranks" in result["tag_error"] and "tag_validation" in result["tag_error"]
        assert not os.path.exists(checkpoints)
        return
    assert result["tag_error"] is None and os.listdir(checkpoints) and \
        open(os.path.join(checkpoints, "latest")).read() == "tag-0"
    assert ("every rank saves under rank 0's tag" in errors[1]) == (mode == "Warn")
    resume_dir = os.path.join(scratch, "resume")
    os.makedirs(resume_dir)
    codes, errors, resumed = launch(2, {"config": config, "steps": 2, "load": checkpoints}, resume_dir)
    assert codes == [0, 0], "\n".join(errors)
    assert resumed["steps"] == 2


def test_an_unknown_tag_validation_is_a_config_error():
    with pytest.raises(zinf.DeepSpeedConfigError, match="checkpoint.tag_validation"):
        zinf.initialize(model=make_model(), config=config_for(1, train_batch_size=4,
                                                              checkpoint={"tag_validation": "foo"}))
    from zinf.runtime.config_utils import DeepSpeedConfigError
    assert DeepSpeedConfigError is zinf.DeepSpeedConfigError and issubclass(DeepSpeedConfigError, ValueError)


@pytest.mark.parametrize("how", ["load_module_only", "load_optimizer_states"])
def test_loading_weights_only_starts_a_fresh_optimizer_from_them(scratch, how):
    # Fine-tuning from a checkpoint: the weights come back, Adam starts over.
    config = config_for(3, "nvme", "nvme", nvme=os.path.join(scratch, "nvme"), train_batch_size=4)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    for step in range(2):
        x, y = batch(step, 0, 0, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    engine.save_checkpoint(os.path.join(scratch, "ckpt"), client_state={"epoch": 7})
    saved = engine.consolidated_state_dict()
    engine.close()

    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    options = {"load_module_only": True} if how == "load_module_only" else {"load_optimizer_states": False}
    path, client = engine.load_checkpoint(os.path.join(scratch, "ckpt"), **options)
    assert client == {"epoch": 7} and path.endswith("global_step2")
    assert engine.global_steps == (0 if how == "load_module_only" else 2)
    got = engine.consolidated_state_dict()
    for name, value in saved.items():
        assert torch.equal(got[name], value), name
    plain = make_model()
    plain.load_state_dict(saved)
    reference = torch.optim.AdamW(plain.parameters(), **{k: (tuple(v) if k == "betas" else v)
                                                         for k, v in ADAMW["params"].items()})
    train_both(engine, plain, reference, 2)  # a fresh AdamW from the loaded weights


def test_zero_to_fp32_gives_the_trained_weights_whole_without_an_engine(scratch):
    # Two ranks, params and optimizer on NVMe, part of the model frozen; the
    # checkpoint's fp32 weights put back together in this one process.
    freeze = ["embed.weight", "layers.1.bias"]
    config = config_for(3, "nvme", "nvme", nvme=os.path.join(scratch, "nvme"))
    checkpoints = os.path.join(scratch, "ckpt")
    codes, errors, result = launch(2, {"config": config, "steps": 2, "save": checkpoints, "freeze": freeze}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    from zinf.utils import zero_to_fp32
    weights = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoints)
    assert list(weights) == [n for n, _ in make_model().named_parameters()]
    for name, value in result["state"].items():
        assert torch.equal(weights[name], value), name
    trainable = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(checkpoints, tag="global_step2",
                                                                        exclude_frozen_parameters=True)
    assert set(trainable) == set(weights) - set(freeze)
    model = zero_to_fp32.load_state_dict_from_zero_checkpoint(make_model(), checkpoints)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    # The script save_checkpoint left beside the checkpoints, as DeepSpeed's.
    out = os.path.join(scratch, "fp32.bin")
    subprocess.run([sys.executable, os.path.join(checkpoints, "zero_to_fp32.py"), checkpoints, out], check=True,
                   capture_output=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    for name, value in torch.load(out).items():
        assert torch.equal(value, weights[name]), name
    with pytest.raises(ValueError, match="no 'latest' file"):
        zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(scratch)


@pytest.mark.parametrize("stage,device", [(2, "cpu"), (3, "cpu"), (3, "nvme")])
def test_lora_adapters_train_over_a_frozen_base_as_plain_pytorch(scratch, stage, device):
    # A frozen base weight beside trainable adapters in one layer: backward
    # still reads the base after the adapters' gradients are in, so a layer
    # is released only once its backward is done; the base keeps no
    # optimizer state and stays as it was.
    config = config_for(stage, device, device if stage == 3 else "none", nvme=os.path.join(scratch, "nvme"),
                        train_batch_size=4)
    model, plain = make_lora_model(), make_lora_model()
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = zinf.initialize(model=model, model_parameters=trainable, config=config)
    frozen = [engine._index[id(p)] for p in model.parameters() if not p.requires_grad]
    assert frozen and not any(engine._engine.describe(i)["trainable"] for i in frozen)
    reference = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad],
                                  **{k: (tuple(v) if k == "betas" else v) for k, v in ADAMW["params"].items()})
    start = {n: p.detach().clone() for n, p in make_lora_model().named_parameters()}
    train_both(engine, plain, reference, 3)
    for name, value in plain.named_parameters():
        if not value.requires_grad:
            assert torch.equal(value, start[name]), name


def test_what_backward_keeps_of_a_released_layer_holds_no_values():
    # Stage 3 drops a layer's gathered weights once its forward is done:
    # autograd must keep the parameter (gathered again for backward), not a
    # view of the values (torch's linear saves weight.t()), or every layer's
    # weights would stay in memory through the whole forward.
    model = make_model()
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, train_batch_size=4))
    kept = []

    def after_layer(module, inputs, output):
        pending = [output.grad_fn]
        while pending:
            node = pending.pop()
            if node is None:
                continue
            if "LinearSavingParams" in type(node).__name__:
                kept.extend(t for t in node.saved_tensors if t is not None)
                return
            pending.extend(next_node for next_node, _ in node.next_functions)

    model.layers[0].register_forward_hook(after_layer)  # after the engine's post-hook released the layer
    x, y = batch(0, 0, 0, 4)
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    weight = [t for t in kept if t is model.layers[0].weight]
    assert weight, [tuple(t.shape) for t in kept]
    assert model.layers[0].weight.numel() == 0  # released, and backward still had its values
    engine.step()
    engine.close()


def test_a_rank_that_dies_fails_the_others_clearly(scratch):
    config = config_for(3, "cpu", "none")
    config["zinf"] = {"timeout_s": 60}
    codes, errors, _ = launch(2, {"config": config, "steps": 4, "die_at": 1}, scratch, timeout=120)
    assert codes[1] == 17
    assert codes[0] != 0
    assert "torch.distributed" in errors[0] or "Connection" in errors[0], errors[0]


def test_a_torch_optimizer_passed_in_trains_as_its_settings_say():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    config = {"train_batch_size": 4, "zero_optimization": {"stage": 2}}
    engine, returned, _, _ = zinf.initialize(model=model, optimizer=optimizer, config=config)
    assert isinstance(returned, torch.optim.Optimizer)
    for step in range(3):
        x, y = batch(step, 0, 0, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    state, _, _ = reference(config_for(2), 3, 1)
    got = engine.consolidated_state_dict()
    for name, value in state.items():
        assert torch.allclose(got[name], value, atol=2e-5), name
    assert engine.global_steps == 3 and engine.train_batch_size() == 4
    engine.close()


def test_engine_api_counters_and_boundaries():
    model = make_model()
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, gradient_accumulation_steps=3,
                                                                     train_batch_size=12))
    assert engine.gradient_accumulation_steps() == 3 and engine.train_micro_batch_size_per_gpu() == 4
    boundaries = []
    for micro in range(6):
        boundaries.append(engine.is_gradient_accumulation_boundary())
        x, y = batch(0, micro, 0, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    assert boundaries == [False, False, True, False, False, True]
    assert engine.global_steps == 2 and engine.global_samples == 24
    assert engine.get_global_grad_norm() > 0
    timings = engine.timings()
    assert timings["forward_s"] > 0 and timings["gathers"] > 0
    engine.close()


@pytest.mark.parametrize("config,message", [
    ({"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, "optimizer.type"),
    ({"train_batch_size": 6, "train_micro_batch_size_per_gpu": 4}, "train_batch_size"),
    ({}, "train_batch_size or train_micro_batch_size_per_gpu is required"),
    ({"train_batch_size": 4, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "zero_optimization.offload_optimizer.nvme_path"),
])
def test_configuration_errors_name_the_key(config, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        zinf.initialize(model=make_model(), config=config)


def test_an_optimizer_zinf_cannot_step_is_refused():
    """Both a ValueError and the AssertionError DeepSpeed raises for an
    "untested ZeRO optimizer" (its fp16 tests expect that one), naming the
    class and the config key DeepSpeed would ask for."""
    model = make_model()
    for stage in (0, 2):
        with pytest.raises(ValueError, match="SGD.*zero_allow_untested_optimizer"):
            zinf.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            config={"train_batch_size": 4, "zero_optimization": {"stage": stage}})
        with pytest.raises(AssertionError):
            zinf.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            config={"train_batch_size": 4, "zero_optimization": {"stage": stage}})


class HalfParamsFloatMath(torch.nn.Module):
    """fp16 params, fp32 arithmetic (CPU torch has no fp16 matmul)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.first = torch.nn.Linear(8, 16)
        self.second = torch.nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(torch.nn.functional.linear(x, self.first.weight.float(), self.first.bias.float()))
        return torch.nn.functional.linear(h, self.second.weight.float(), self.second.bias.float())


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    model = HalfParamsFloatMath()
    # Stage 2: the params are used by the parent's forward, not their own
    # modules', which stage 3 cannot see (see docs/python.md).
    config = config_for(2, train_batch_size=4, fp16={"enabled": True, "initial_scale_power": 30, "hysteresis": 1})
    engine, optimizer, _, _ = zinf.initialize(model=model, config=config)
    assert engine.loss_scale == 2.0 ** 30 and not optimizer.overflow
    before = engine.consolidated_state_dict(dtype=torch.float32)
    x, y = batch(0, 0, 0, 4)
    # 2^30 x the loss: the fp16 gradients overflow to infinity.
    engine.backward(torch.nn.functional.mse_loss(engine(x) * 1e4, y))
    engine.step()
    assert not engine.was_step_applied()
    assert optimizer.overflow  # what Accelerate's step_was_skipped reads
    assert engine.loss_scale == 2.0 ** 29
    after = engine.consolidated_state_dict(dtype=torch.float32)
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # Each skip halves the scale, until the gradients fit in fp16.
    for _ in range(30):
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        if engine.was_step_applied():
            break
    assert engine.was_step_applied() and not optimizer.overflow
    engine.close()


def test_the_engine_answers_what_deepspeed_scripts_ask_of_the_config(scratch):
    config = config_for(3, "nvme", nvme=os.path.join(scratch, "nvme"), train_batch_size=8, gradient_clipping=0.5,
                        bf16={"enabled": True}, steps_per_print=7)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    assert engine.zero_optimization_stage() == 3
    assert engine.bfloat16_enabled() and not engine.fp16_enabled()
    assert engine.gradient_clipping() == 0.5 and engine.steps_per_print() == 7
    assert engine.zero_offload_optimizer() and not engine.zero_offload_param()
    assert (engine.dp_world_size, engine.mp_world_size) == (1, 1)
    assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps()) == (8, 4, 2)
    engine.close()


def test_the_16bit_export_holds_the_trained_model(scratch):
    safetensors = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed")
    model = make_model()
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, train_batch_size=4, bf16={"enabled": True}))
    x, y = batch(0, 0, 0, 4)
    engine.backward(torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y))
    engine.step()
    engine.save_16bit_model(scratch, "model.safetensors")
    engine.save_16bit_model(scratch)  # DeepSpeed's default: pytorch_model.bin, a torch.save'd state dict
    masters = engine.consolidated_state_dict(dtype=torch.float32)
    for saved in (safetensors.load_file(os.path.join(scratch, "model.safetensors")),
                  torch.load(os.path.join(scratch, "pytorch_model.bin"))):
        assert set(saved) == {n for n, _ in make_model().named_parameters()}
        for name, value in saved.items():
            assert value.dtype == torch.bfloat16
            assert torch.equal(value, masters[name].bfloat16()), name
    engine.close()


@pytest.mark.parametrize("how, init_in_zero_init", [(True, False), ("module", False), (True, True)],
                         ids=["context", "module", "context-joins-the-group"])
def test_a_model_built_under_zero_init_trains_as_the_plain_model(scratch, how, init_in_zero_init):
    """zinf.zero.Init on two ranks with params and optimizer on NVMe: the
    module holds nothing after construction (or after Init(module=model)
    converts it, DeepSpeed's other form), each rank stages its shard, and
    training equals plain training of the model built as usual. A script
    that builds under Init before any init_distributed gets the process
    group from Init, as with DeepSpeed (before, each rank staged the whole
    model as a world of one)."""
    config = config_for(3, "nvme", "nvme", nvme=os.path.join(scratch, "nvme"), gradient_accumulation_steps=2)
    codes, errors, result = launch(2, {"config": config, "steps": 3, "zero_init": how,
                                       "init_in_zero_init": init_in_zero_init}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 3, 2)
    assert_matches(result, state, losses)
    # The staging directories are gone once the engine is built.
    assert not [d for d in os.listdir(os.path.join(scratch, "nvme")) if d.startswith("zinf-init.")]


@pytest.mark.parametrize("offload", ["nvme", "cpu"])
def test_a_checkpoint_loaded_into_a_model_built_under_zero_init_is_what_trains(scratch, offload):
    """The pretrained-model path: a model built empty under zinf.zero.Init
    on two ranks, a checkpoint written into it module by module inside
    GatheredParameters(modifier_rank=0) (rank 0 reads the file), then
    zinf.initialize: training starts from the checkpoint's values, and
    equals plain training from them."""
    torch.manual_seed(77)
    pretrained = {name: torch.randn_like(p) for name, p in make_model().named_parameters()}
    torch.save(pretrained, os.path.join(scratch, "pretrained.pt"))
    config = config_for(3, offload, offload, nvme=os.path.join(scratch, "nvme"))
    codes, errors, result = launch(2, {"config": config, "steps": 2, "zero_init": True,
                                       "load_under_init": os.path.join(scratch, "pretrained.pt")}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 2, 2, start_state=pretrained)
    assert_matches(result, state, losses)


def test_gathered_parameters_on_an_init_built_param_listed_twice_writes_it_once():
    """A tied weight listed under both its names: the modifier's value is
    its shard, not the empty tensor left after the first release."""
    with zinf.zero.Init(config_dict_or_path=config_for(3, train_batch_size=4)):
        model = make_model()
    weight = model.layers[0].weight
    with zinf.zero.GatheredParameters([weight, weight], modifier_rank=0):
        weight.data.fill_(0.25)
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, train_batch_size=4))
    assert torch.equal(engine.consolidated_state_dict()["layers.0.weight"], torch.full((24, 24), 0.25))
    engine.close()


def test_gathered_parameters_reads_and_modifies_the_masters():
    model = make_model()
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, train_batch_size=4))
    plain = make_model()
    assert model.layers[0].weight.numel() == 0
    with zinf.zero.GatheredParameters(model.layers[0].weight):
        assert torch.equal(model.layers[0].weight, plain.layers[0].weight)  # read only: nothing written back
        model.layers[0].weight.data.fill_(3.0)
    assert model.layers[0].weight.numel() == 0
    assert torch.equal(engine.consolidated_state_dict()["layers.0.weight"], plain.layers[0].weight.detach())
    with zinf.zero.GatheredParameters([model.layers[0].weight, model.layers[0].bias], modifier_rank=0):
        model.layers[0].weight.data.fill_(0.5)
    assert torch.equal(engine.consolidated_state_dict()["layers.0.weight"], torch.full((24, 24), 0.5))
    with torch.no_grad():
        plain.layers[0].weight.fill_(0.5)
    x, _ = batch(0, 0, 0, 4)
    assert torch.allclose(engine(x), plain(x), atol=1e-6)
    # Not zinf's: passes through.
    free = torch.nn.Parameter(torch.ones(3))
    with zinf.zero.GatheredParameters(free, modifier_rank=0):
        free.data.fill_(2.0)
    assert torch.equal(free, torch.full((3,), 2.0))
    engine.close()


@pytest.mark.parametrize("registered", [False, True])
def test_a_parameter_used_outside_its_module_trains_as_plain_pytorch(caplog, registered):
    """Unregistered, the op that gets the empty parameter gathers it on
    demand and the log says so once; registered, the parent gathers it."""
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    config = config_for(3, train_batch_size=2, train_micro_batch_size_per_gpu=2)
    model, plain = ReadsItsChildsWeight(), ReadsItsChildsWeight()
    if registered:
        zinf.zero.register_external_parameter(model, model.embed.weight)
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    params = config["optimizer"]["params"]
    reference = torch.optim.AdamW(plain.parameters(), lr=params["lr"], betas=tuple(params["betas"]),
                                  eps=params["eps"], weight_decay=params["weight_decay"])
    with caplog.at_level("WARNING", logger="zinf"):
        for step in range(3):
            target = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.mse_loss(engine(ids), target)
            engine.backward(loss)
            engine.step()
            want = torch.nn.functional.mse_loss(plain(ids), target)
            want.backward()
            reference.step()
            reference.zero_grad()
            assert float(loss) == pytest.approx(float(want), rel=1e-5)
            assert model.embed.weight.numel() == 0  # dropped again once backward is done
    said = [r.getMessage() for r in caplog.records if "outside its module" in r.getMessage()]
    assert said == ([] if registered else [said[0]]) and (registered or "embed.weight" in said[0]), said
    got = engine.consolidated_state_dict()
    for name, value in plain.named_parameters():
        assert torch.allclose(got[name], value, atol=1e-5), name
    engine.close()


def test_the_step_line_reports_nvme_writes_and_drive_lifetime(scratch, capsys):
    config = config_for(3, "nvme", "nvme", nvme=os.path.join(scratch, "nvme"), train_batch_size=4,
                        steps_per_print=1, wall_clock_breakdown=True, zinf={"tbw": 600})
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    for step in range(2):
        x, y = batch(step, 0, 0, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("zinf: step")]
    assert len(lines) == 2, lines
    assert "per step: forward" in lines[1] and "NVMe read" in lines[1] and "a 600 TBW drive lasts" in lines[1], \
        lines
    # Reads and writes per step and as rates: the second step read back
    # its masters and moments (12 B per element) and wrote them again.
    units = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}
    found = re.search(r"NVMe read ([\d.]+) (\w+)/step \(([\d.]+) (\w+)/s\), written ([\d.]+) (\w+)/step", lines[1])
    assert found, lines
    read = float(found[1]) * units[found[2]]
    assert read >= 12 * sum(p.numel() for p in make_model().parameters()) and float(found[3]) > 0, lines
    assert float(found[5]) * units[found[6]] >= read, lines
    # Per-step figures over the interval, not totals since the start: one
    # step per line, so the lines add up to the total (to their rounding).
    forward = [float(line.split("forward ")[1].split("s")[0]) for line in lines]
    assert sum(forward) == pytest.approx(engine.timings()["forward_s"], abs=0.0011), (lines, engine.timings())
    # A step rewrites at least the fp32 masters and both Adam moments of every param.
    written = engine.timings()["nvme_written_bytes"]
    assert written >= 2 * 12 * sum(p.numel() for p in make_model().parameters())
    assert engine.timings()["nvme_read_bytes"] >= read * 0.99
    engine.close()


def test_units_can_be_chosen_by_the_caller():
    model, plain = make_model(), make_model()
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, train_batch_size=4),
                                      units=[model.embed, model.head])
    # The layers' params, in no chosen unit, are the model's own unit.
    assert [u.name for u in engine._units] == ["embed", "head", "(root)"]
    reference = torch.optim.AdamW(plain.parameters(), **{k: (tuple(v) if k == "betas" else v)
                                                         for k, v in ADAMW["params"].items()})
    train_both(engine, plain, reference, 2)
    with pytest.raises(ValueError, match="not a submodule"):
        zinf.initialize(model=make_model(), config=config_for(3, train_batch_size=4), units=[torch.nn.Linear(2, 2)])


@pytest.mark.parametrize("state_format,groups", [("bf16", None), ("int8", None),
                                                 ("int8", [{"suffix": "bias", "lr": 0.02}])])
def test_compressed_optimizer_states_train_like_fp32(scratch, state_format, groups):
    # offload_optimizer.state_format: Adam's moments kept compressed on
    # NVMe; the fp32 masters stay exact, the loss follows plain AdamW's.
    # With the biases in a group of another lr, the groups meet inside
    # 8-bit moment blocks (each bias next to its weight in the partition).
    config = config_for(3, "nvme", "none", nvme=os.path.join(scratch, "nvme"))
    config["zero_optimization"]["offload_optimizer"]["state_format"] = state_format
    steps = 12
    codes, errors, result = launch(2, {"config": config, "steps": steps, "groups": groups}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    want_state, want_losses, _ = reference(config, steps, 2, groups_spec=groups)
    assert len(result["losses"]) == len(want_losses)
    tolerance = 0.01 if state_format == "bf16" else 0.05
    for step, (got, want) in enumerate(zip(result["losses"], want_losses)):
        assert got == pytest.approx(want, rel=tolerance), (step, got, want)
    # The params moved as plain AdamW's did, within the moments' precision
    # (largest error over largest move, measured: bf16 0.7 %, int8 12 %).
    start = dict(make_model().named_parameters())
    for name, want in want_state.items():
        moved = (want - start[name]).abs().max().item()
        error = (result["state"][name] - want).abs().max().item()
        assert error <= (0.02 if state_format == "bf16" else 0.25) * moved, (name, error, moved)


@pytest.mark.parametrize("stage,optimizer_device", [(1, "none"), (2, "cpu"), (3, "nvme")])
def test_param_groups_with_their_own_weight_decay_train_as_torch_adamw(scratch, stage, optimizer_device):
    # Hugging Face scripts give biases (and norms) no weight decay through
    # model_parameters groups; DeepSpeed honours each group's weight_decay.
    config = config_for(stage, optimizer_device, nvme=os.path.join(scratch, "nvme"))
    config["optimizer"] = {"type": "AdamW", "params": dict(ADAMW["params"], weight_decay=0.5)}
    codes, errors, result = launch(2, {"config": config, "steps": 3, "bias_decay": 0.0}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 3, 2, bias_decay=0.0)
    assert_matches(result, state, losses)
    # Not the same as decaying everything: the groups made a difference.
    uniform, _, _ = reference(config, 3, 2)
    assert not torch.allclose(uniform["embed.bias"], state["embed.bias"], atol=1e-5)


# Param groups with their own lr, betas, eps and weight decay (a new head
# trained faster, biases without decay), each group's lr moved by its own
# LambdaLR, as DeepSpeed steps torch's param_groups.
GROUPS = [{"suffix": "bias", "lr": 0.03, "weight_decay": 0.0},
          {"prefix": "head", "lr": 0.002, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.2}]


@pytest.mark.parametrize("stage,optimizer_device,kind", [(0, "none", "AdamW"), (2, "cpu", "Adam"),
                                                         (3, "nvme", "AdamW")])
def test_param_groups_with_their_own_lr_betas_and_eps_train_as_torch(scratch, stage, optimizer_device, kind):
    config = config_for(stage, optimizer_device, nvme=os.path.join(scratch, "nvme"), gradient_accumulation_steps=2)
    config["optimizer"] = {"type": kind, "params": dict(ADAMW["params"], weight_decay=0.05)}
    if kind == "Adam":
        config["optimizer"]["params"]["adam_w_mode"] = False  # torch's Adam: L2 decay
    codes, errors, result = launch(2, {"config": config, "steps": 4, "groups": GROUPS, "group_lambdas": True},
                                   scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 4, 2, groups_spec=GROUPS, lambdas=True)
    assert_matches(result, state, losses)
    # The groups made a difference: one lr for everything trains otherwise.
    uniform, _, _ = reference(config, 4, 2, lambdas=True)
    for name in ("embed.bias", "head.weight"):
        assert not torch.allclose(uniform[name], state[name], atol=1e-4), name


def test_a_torch_optimizer_with_groups_of_their_own_lr_trains_as_itself():
    model, plain = make_model(), make_model()
    def groups_of(m):
        return [{"params": [p for n, p in m.named_parameters() if n.startswith("head")], "lr": 0.05},
                {"params": [p for n, p in m.named_parameters() if not n.startswith("head")]}]
    optimizer = torch.optim.AdamW(groups_of(model), lr=0.01, betas=(0.9, 0.99), weight_decay=0.01)
    reference = torch.optim.AdamW(groups_of(plain), lr=0.01, betas=(0.9, 0.99), weight_decay=0.01)
    config = config_for(2, "cpu", train_batch_size=4)
    del config["optimizer"]  # the torch optimizer's settings are used
    engine, zinf_optimizer, _, _ = zinf.initialize(model=model, optimizer=optimizer, config=config)
    assert [g["lr"] for g in zinf_optimizer.param_groups] == [0.05, 0.01]
    def hand_made_schedule(step):  # what the caller writes into a group is used
        if step == 2:
            for optimizers in (zinf_optimizer, reference):
                optimizers.param_groups[0]["lr"] = 0.001
    train_both(engine, plain, reference, 3, before_step=hand_made_schedule)


def test_what_zinf_has_no_kernel_for_is_refused_naming_it(scratch):
    model = make_model()
    bare = {"train_batch_size": 4, "zero_optimization": {"stage": 0}}
    with pytest.raises(ValueError, match="param group 0 has amsgrad=True"):
        zinf.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), amsgrad=True), config=bare)
    with pytest.raises(ValueError, match="param group 0 has lr_decay=0.1"):
        zinf.initialize(model=model, optimizer=torch.optim.Adagrad(model.parameters(), lr_decay=0.1), config=bare)
    model = make_model()
    with pytest.raises(ValueError, match="param group 1: lr is -1"):
        zinf.initialize(model=model, config=config_for(0, train_batch_size=4),
                        model_parameters=param_groups(model, [{"suffix": "bias", "lr": -1.0}]))


@pytest.mark.parametrize("stage,optimizer_device,param_device", [(0, "none", "none"), (2, "cpu", "none"),
                                                                 (3, "nvme", "nvme"), (3, "cpu", "cpu")])
def test_frozen_parameters_stay_exactly_as_they_were_and_the_rest_train_as_torch(scratch, stage, optimizer_device,
                                                                                 param_device):
    # Fine-tuning freezes part of a model (requires_grad=False) and hands the
    # optimizer the rest; a whole unit frozen (the embedding) and half of
    # another (a layer's weight).
    freeze = ["embed.weight", "embed.bias", "layers.1.weight"]
    config = config_for(stage, optimizer_device, param_device, nvme=os.path.join(scratch, "nvme"),
                        gradient_accumulation_steps=2)
    codes, errors, result = launch(2, {"config": config, "steps": 3, "freeze": freeze}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 3, 2, freeze=freeze)
    assert_matches(result, state, losses)
    start = dict(make_model().named_parameters())
    for name in freeze:
        assert torch.equal(result["state"][name], start[name].detach()), f"{name} changed"
    assert not torch.equal(result["state"]["layers.1.bias"], start["layers.1.bias"].detach())

"""One rank of a zinf.initialize training run, written as a DeepSpeed script
is (`import zinf as deepspeed`), for test_initialize.py. Launched with
torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set.

    python initialize_worker.py RUN.json

RUN.json: {"config": {...}, "steps": K, "out": path, "save": dir|null,
"load": dir|null, "die_at": step|null, "module_state_on_rank0": bool, "zero_init": bool (build the model
under zinf.zero.Init), "bias_decay": weight decay of a param group of the
biases, or null, "groups": param groups with their own settings
(initialize_model.param_groups' spec), "group_lambdas": a LambdaLR of its
own per group (initialize_model.group_lambdas), "freeze": names of params
made requires_grad=False (the optimizer gets the others, as fine-tuning
scripts pass them), "device": where the model computes ("cpu" default, or
"cuda"), "backend": the default group's backend the script asks
deepspeed.init_distributed for (default gloo), "gpu_per_rank": with
device "cuda", each rank on GPU LOCAL_RANK, "init_in_zero_init": the
script does not call deepspeed.init_distributed (zinf.zero.Init must),
"tag_per_rank": save under tag-<rank> (an AssertionError is recorded as
"tag_error"), "script_collectives": an all_reduce and a barrier of the
script's own after every backward, "inspect": after the steps,
one more backward, then every param's values as deepspeed.utils'
safe_get_full_* read them}. Rank 0 writes
{"losses": [...], "state": {name: fp32 tensor}, "lrs": [...]} to `out`.
"""
import json
import os
import sys

import torch

import zinf as deepspeed
from initialize_model import batch, group_lambdas, make_model, param_groups


def main():
    with open(sys.argv[1]) as file:
        run = json.load(file)
    if not run.get("init_in_zero_init"):
        deepspeed.init_distributed(dist_backend=run.get("backend"))
    if run.get("zero_init") == "module":
        model = make_model()  # built as usual, then converted, as DeepSpeed's Init(module=...) does
        deepspeed.zero.Init(module=model, config_dict_or_path=run["config"])
    elif run.get("zero_init"):
        with deepspeed.zero.Init(config_dict_or_path=run["config"]):
            model = make_model()
    else:
        model = make_model()
    if run.get("zero_init"):
        assert all(p.numel() == 0 for p in model.parameters()), "zero.Init left values in the module"
        # Init joined torchrun's group itself where the script had not.
        assert torch.distributed.get_world_size() == int(os.environ["WORLD_SIZE"])
        if run.get("load_under_init"):
            # A pretrained checkpoint into the empty model, module by module
            # as Hugging Face's loader does: rank 0 writes, every rank keeps
            # its shard of it.
            state = torch.load(run["load_under_init"])
            for prefix, module in model.named_modules():
                own = list(module.parameters(recurse=False))
                if not own:
                    continue
                with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                    assert all(p.ds_status == deepspeed.zero.ZeroParamStatus.AVAILABLE for p in own)
                    if int(os.environ.get("RANK", "0")) == 0:
                        with torch.no_grad():
                            for name, p in module.named_parameters(recurse=False):
                                p.copy_(state[f"{prefix}.{name}" if prefix else name])
                assert all(p.numel() == 0 for p in own)
    if run.get("device") == "cuda" and run.get("gpu_per_rank"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # as DeepSpeed's engine does
    model.to(run.get("device", "cpu"))
    for name, p in model.named_parameters():
        if name in run.get("freeze", []):
            p.requires_grad_(False)
    parameters = model.parameters() if not run.get("freeze") else [p for p in model.parameters() if p.requires_grad]
    if run.get("bias_decay") is not None:
        # Hugging Face's grouping: no weight decay for biases.
        parameters = [{"params": [p for n, p in model.named_parameters() if not n.endswith("bias")]},
                      {"params": [p for n, p in model.named_parameters() if n.endswith("bias")],
                       "weight_decay": run["bias_decay"]}]
    if run.get("groups") is not None:
        parameters = param_groups(model, run["groups"], only=list(parameters))
    scheduler = None
    if run.get("group_lambdas"):
        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, group_lambdas(len(optimizer.param_groups)))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=parameters,
                                                           config=run["config"], lr_scheduler=scheduler)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    start = 0
    if run.get("load"):
        path, client = engine.load_checkpoint(run["load"])
        assert path is not None, "no checkpoint found"
        start = client["next_step"]
    losses, lrs = [], []
    for step in range(start, run["steps"]):
        if run.get("die_at") == step and rank == world - 1:
            os._exit(17)  # a rank dying mid-training: the others must fail, not hang
        for micro in range(engine.gradient_accumulation_steps()):
            x, y = batch(step, micro, rank, engine.train_micro_batch_size_per_gpu())
            x, y = x.to(engine.device), y.to(engine.device)
            loss = torch.nn.functional.mse_loss(engine(x).float(), y)
            engine.backward(loss)
            if run.get("script_collectives"):
                # As scripts do right after backward, on the default group,
                # while the engine may still be reducing gradients.
                ones = torch.ones(3)
                deepspeed.comm.all_reduce(ones)
                assert ones.tolist() == [float(world)] * 3, ones
                deepspeed.comm.barrier()
            engine.step()
            losses.append(float(loss))
        lrs.append(engine.get_lr()[0])
    inspected = None
    if run.get("inspect"):
        # One more micro-step's backward, then every param's whole values
        # as deepspeed.utils reads them (collective: every rank asks).
        x, y = batch(run["steps"], 0, rank, engine.train_micro_batch_size_per_gpu())
        engine.backward(torch.nn.functional.mse_loss(engine(x).float(), y))
        inspected = {name: {"param": deepspeed.utils.safe_get_full_fp32_param(p),
                            "grad": deepspeed.utils.safe_get_full_grad(p),
                            "exp_avg": deepspeed.utils.safe_get_full_optimizer_state(p, "exp_avg"),
                            "exp_avg_sq": deepspeed.utils.safe_get_full_optimizer_state(p, "exp_avg_sq")}
                     for name, p in model.named_parameters()}
        # This rank's shards (rank 0's are returned), and values written
        # whole and read back, as DeepSpeed's test_zero_tensor_fragment does.
        for name, p in model.named_parameters():
            inspected[name]["local_exp_avg"] = deepspeed.utils.safe_get_local_optimizer_state(p, "exp_avg")
            inspected[name]["local_grad"] = deepspeed.utils.safe_get_local_grad(p)
            # DeepSpeed's ds_tensor: this rank's shard of the working copy,
            # ceil(numel / world) long, zeros past the param's end.
            ds_tensor, shard = p.ds_tensor, (p.ds_numel + world - 1) // world
            assert ds_tensor.shape == (shard,) and ds_tensor.ds_numel == shard, (name, ds_tensor.shape)
            mine = p.ds_numel - rank * shard  # this rank's part of the param (its shard before padding)
            assert torch.equal(ds_tensor, deepspeed.utils.safe_get_local_fp32_param(p).to(ds_tensor.dtype)), name
            assert not ds_tensor[max(mine, 0):].any(), name
            inspected[name]["ds_tensor"] = ds_tensor
            generator = torch.Generator().manual_seed(len(name))
            for key in ("grad", "param", "exp_avg_sq"):
                value = torch.rand(p.ds_shape, generator=generator)  # zinf sets it at stage 3, as DeepSpeed
                if key == "grad":
                    deepspeed.utils.safe_set_full_grad(p, value)
                    back = deepspeed.utils.safe_get_full_grad(p)
                elif key == "param":
                    deepspeed.utils.safe_set_full_fp32_param(p, value)
                    back = deepspeed.utils.safe_get_full_fp32_param(p)
                else:
                    deepspeed.utils.safe_set_full_optimizer_state(p, value, key)
                    back = deepspeed.utils.safe_get_full_optimizer_state(p, key)
                assert torch.equal(back, value), f"{name} {key}: written and read back differ"
        engine.step()  # not a boundary: the window stays open
    tag_error = None
    if run.get("save"):
        # "tag_per_rank": each rank asks for its own tag (checkpoint.tag_validation's case).
        tag = f"tag-{rank}" if run.get("tag_per_rank") else None
        try:
            engine.save_checkpoint(run["save"], tag=tag, client_state={"next_step": run["steps"]})
        except AssertionError as error:
            if not run.get("tag_per_rank"):
                raise
            tag_error = str(error)
    module_state = None
    if run.get("module_state_on_rank0"):
        # As scripts save: rank 0 alone; the others go straight on to a
        # barrier, which a collective on rank 0 would be paired with.
        if rank == 0:
            module_state = engine.module_state_dict()
        deepspeed.comm.barrier()
    state = engine.consolidated_state_dict(dtype=torch.float32)
    # deepspeed.comm, as scripts use it over the group zinf trains on (Gloo:
    # host tensors; an NCCL default group takes the script's GPU tensors).
    dist = deepspeed.comm
    if run.get("backend") == "nccl":
        dist = None
    comm = None
    if dist is not None:
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        gathered = torch.empty(2 * dist.get_world_size())
        dist.all_gather_into_tensor(gathered, torch.tensor([float(rank), 10.0 + rank]))
        scattered = torch.empty(1)
        dist.reduce_scatter_tensor(scattered, torch.arange(float(dist.get_world_size())))
        world = dist.get_world_size()
        pieces = [torch.empty(1) for _ in range(world)] if rank == 0 else None
        dist.gather(torch.tensor([100.0 + rank]), gather_list=pieces, dst=0)
        swapped = [torch.empty(1) for _ in range(world)]
        dist.all_to_all(swapped, [torch.tensor([10.0 * rank + r]) for r in range(world)])
        block = torch.empty(1)
        dist.reduce_scatter(block, [torch.tensor([float(rank + r)]) for r in range(world)])
        objects = [{"from": rank}]
        dist.broadcast_object_list(objects, src=world - 1)
        dist.monitored_barrier()
        dist.barrier()
        comm = {"rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": dist.get_local_rank(),
                "sum": float(total), "gathered": gathered.tolist(), "scattered": float(scattered),
                "gather": [float(p) for p in pieces] if pieces else None, "all_to_all": [float(s) for s in swapped],
                "object": objects[0], "group_ranks": dist.get_all_ranks_from_group(),
                "reduce_scatter": float(block)}
    if rank == 0:
        torch.save({"losses": losses, "state": state, "lrs": lrs, "grad_norm": engine.get_global_grad_norm(),
                    "steps": engine.global_steps, "timings": engine.timings(), "comm": comm,
                    "inspected": inspected, "module_state": module_state,
                    "collectives": engine.collectives_backend, "tag_error": tag_error}, run["out"])
    engine.close()


if __name__ == "__main__":
    main()

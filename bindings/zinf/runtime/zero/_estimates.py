"""DeepSpeed's model-state memory estimators, answered with what zinf's
engine allocates (swap/memory_plan.hpp, as `zinf-config plan` prints it)
rather than DeepSpeed's formulas: zinf steps the optimizer on the CPU
whatever offload_optimizer says, so its GPU figures are smaller and its
host figures different. The engine planned is zinf.initialize's, which
keeps its state in host memory whatever the model's device: offload_param
"none" keeps the working copy in host memory as "cpu" does. The model is
trained in 16-bit (bf16) with AdamW, as DeepSpeed's estimates assume."""
import json

from ... import _zinf

NVME_SUB_GROUP = 10**8  # sub_group_size of the rows with offload_optimizer "nvme"
_PATH = "/local_nvme"  # any path: the plan needs one for "nvme" and reads nothing there


def params_of(model):
    """(total params, largest layer's params): shared params once, a
    layer's own params (not its children's), as DeepSpeed counts them."""
    def count(p):
        return getattr(p, "ds_numel", p.numel())  # built under zinf.zero.Init: the values are in the shards

    total = sum({id(p): count(p) for p in model.parameters()}.values())
    largest = max((sum(count(p) for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def estimate(stage, total_params, largest_layer_params, num_gpus_per_node, num_nodes, optimizer_device,
             param_device, zero_init, additional_buffer_factor):
    """(host bytes per node, GPU bytes per GPU, NVMe bytes per node). The host figure is
    scaled by additional_buffer_factor, as DeepSpeed scales its own; without
    zero_init each rank first builds the whole model in fp32 (4 bytes per
    param per rank)."""
    zero = {"stage": stage, "offload_optimizer": {"device": optimizer_device}}
    if optimizer_device == "nvme":
        zero["offload_optimizer"]["nvme_path"] = _PATH
        # The swapper pins three sub-groups of states: at the default 1e9
        # that is a whole partition, and NVMe would save no host memory.
        zero["sub_group_size"] = NVME_SUB_GROUP
    if stage == 3:
        zero["offload_param"] = {"device": param_device}
        if param_device == "nvme":
            zero["offload_param"]["nvme_path"] = _PATH
    config = {"zero_optimization": zero, "bf16": {"enabled": True}, "optimizer": {"type": "AdamW"}}
    ranks = int(num_gpus_per_node)
    plan = _zinf.plan_memory(json.dumps(config), int(total_params), ranks * int(num_nodes),
                             int(largest_layer_params), ranks, device_is_host=True)
    chosen = next(s for s in plan["stages"] if s["stage"] == stage)
    tiers = chosen["per_rank"]
    host = (tiers["pinned"] + tiers["pageable"] + plan["transient_host"]) * ranks
    if not zero_init:
        host = max(host, 4 * int(total_params) * ranks)
    return int(host * additional_buffer_factor), int(tiers["gpu"]), int(tiers["nvme"]) * ranks


def print_table(title_params, rows, num_gpus_per_node, num_nodes):
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    print("Estimated memory needed for params, optim states and gradients (zinf's engine) for a:\n"
          f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
          f"SW: Model with {title_params}.")
    print("  per CPU  |  per GPU |  per NVMe | Options")
    for (host, gpu, nvme), options in rows:
        print(f" {host / 2**30:7.2f}GB | {gpu / 2**30:6.2f}GB | {nvme / 2**30:7.2f}GB | {options}")

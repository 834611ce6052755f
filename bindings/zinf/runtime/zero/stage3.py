"""``deepspeed.runtime.zero.stage3``'s memory estimators, with zinf's figures
(see _estimates): host memory per node, GPU memory per GPU and, which
DeepSpeed's table lacks, NVMe per node; and unwrap_model_for_generation."""
import contextlib

from ...zero import GatheredParameters
from ._estimates import NVME_SUB_GROUP, estimate, params_of, print_table


@contextlib.contextmanager
def unwrap_model_for_generation(model):
    """Every param of `model` (an engine) whole for the block, with stage
    3's gather/release hooks off: generation runs many forwards, and each
    would otherwise gather every unit again. Collective over the ranks, as
    GatheredParameters is; the hooks are back on exit."""
    with GatheredParameters(list(model.parameters())):
        optimizer = getattr(model, "optimizer", None)
        offload = getattr(optimizer, "parameter_offload", None) if optimizer is not None else None
        if offload is not None:
            for handle in offload.forward_hooks:
                handle.remove()
            offload.forward_hooks = []
        try:
            yield model
        finally:
            if offload is not None:
                offload._register_deepspeed_module(offload.module)

# (offload_param, offload_optimizer): DeepSpeed's three rows, and NVMe's.
_OPTIONS = [("nvme", "nvme"), ("cpu", "nvme"), ("cpu", "cpu"), ("none", "cpu"), ("none", "none")]


def model_to_params(model):
    return params_of(model)


def estimate_zero3_model_states_mem_needs(total_params, largest_layer_params, num_gpus_per_node=1, num_nodes=1,
                                          cpu_offload=True, cpu_offload_params=True, zero_init=True,
                                          additional_buffer_factor=1.5):
    """(host bytes per node, GPU bytes per GPU, largest layer's fp32 bytes)
    for ZeRO-3 with offload_optimizer "cpu" (`cpu_offload`) or "none" and
    offload_param "cpu" (`cpu_offload_params`) or "none", as DeepSpeed's
    function returns them, with zinf's figures."""
    got = estimate(3, total_params, largest_layer_params, num_gpus_per_node, num_nodes,
                   "cpu" if cpu_offload else "none", "cpu" if cpu_offload_params else "none", zero_init,
                   additional_buffer_factor)
    return got[0], got[1], 4 * int(largest_layer_params)


def estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer_params, num_gpus_per_node=1,
                                                   num_nodes=1, additional_buffer_factor=1.5):
    """Prints, for a model of `total_params` whose largest layer holds
    `largest_layer_params`, what each offload choice needs per node's host,
    per GPU and per node's NVMe."""
    rows = []
    for param_device, optimizer_device in _OPTIONS:
        for zero_init in (True, False):
            got = estimate(3, total_params, largest_layer_params, num_gpus_per_node, num_nodes, optimizer_device,
                           param_device, zero_init, additional_buffer_factor)
            options = f"offload_param={param_device:4}, offload_optimizer={optimizer_device:4}, zero_init={int(zero_init)}"
            if optimizer_device == "nvme":
                options += f", sub_group_size={NVME_SUB_GROUP:.0e}".replace("e+0", "e")
            rows.append((got, options))
    print_table(f"{int(total_params / 1e6)}M total params, {int(largest_layer_params / 1e6)}M largest layer params",
                rows, num_gpus_per_node, num_nodes)


def estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """estimate_zero3_model_states_mem_needs_all_cold for `model`'s sizes."""
    total, largest = params_of(model)
    estimate_zero3_model_states_mem_needs_all_cold(total, largest, num_gpus_per_node, num_nodes,
                                                   additional_buffer_factor)

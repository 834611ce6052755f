"""``deepspeed.runtime.zero.stage_1_and_2``'s memory estimators, with zinf's
figures (see _estimates)."""
from ._estimates import estimate, params_of, print_table


def model_to_params(model):
    return params_of(model)[0]


def estimate_zero2_model_states_mem_needs(total_params, num_gpus_per_node=1, num_nodes=1, cpu_offload=True,
                                          additional_buffer_factor=1.5):
    """(host bytes per node, GPU bytes per GPU) for ZeRO-2 with
    offload_optimizer "cpu" (`cpu_offload`) or "none", as DeepSpeed's
    function returns them, with zinf's figures (the model built whole in
    each rank first, as without zero.Init)."""
    host, gpu, _ = estimate(2, total_params, 0, num_gpus_per_node, num_nodes, "cpu" if cpu_offload else "none",
                            "none", False, additional_buffer_factor)
    return host, gpu


def _table(total_params, largest_layer_params, num_gpus_per_node, num_nodes, additional_buffer_factor):
    rows = [(estimate(2, total_params, largest_layer_params, num_gpus_per_node, num_nodes, device, "none", False,
                      additional_buffer_factor), f"offload_optimizer={device:4}") for device in ("cpu", "none")]
    print_table(f"{int(total_params / 1e6)}M total params", rows, num_gpus_per_node, num_nodes)


def estimate_zero2_model_states_mem_needs_all_cold(total_params, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """Prints what ZeRO-2 needs per node's host and per GPU, for each
    offload_optimizer choice (the largest layer, which DeepSpeed's
    arguments do not give, taken as min(total, 1e8) params)."""
    _table(total_params, 0, num_gpus_per_node, num_nodes, additional_buffer_factor)


def estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=1, num_nodes=1,
                                                   additional_buffer_factor=1.5):
    """estimate_zero2_model_states_mem_needs_all_cold for `model`'s sizes."""
    total, largest = params_of(model)
    _table(total, largest, num_gpus_per_node, num_nodes, additional_buffer_factor)

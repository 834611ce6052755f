"""``deepspeed.moe.utils``: the param group helpers scripts call around the
optimizer. A param is an expert's when DeepSpeed's MoE marked it
(``param.allreduce`` False); zinf builds no such params, and refuses them
where they would change the training."""
import torch

from .layer import MoE

# DeepSpeed's default bound on the elements of one expert param group.
_MAX_GROUP_SIZE = 178956971


def is_moe_param(param):
    """True for a param DeepSpeed's MoE made (its `allreduce` False)."""
    return hasattr(param, "allreduce") and not param.allreduce


def has_moe_layers(module):
    """(whether `module` holds an MoE layer, its experts): (False, 0) for
    every model zinf trains."""
    for child in module.modules():
        if isinstance(child, MoE):
            return True, child.num_experts
    return False, 0


def split_params_into_shared_and_expert_params(params):
    """(dense params, expert params), in their order."""
    params = list(params)
    return [p for p in params if not is_moe_param(p)], [p for p in params if is_moe_param(p)]


def split_params_grads_into_shared_and_expert_params(group):
    """The gradients of `group`'s params (those that have one), in their
    params' dtype: (dense, expert)."""
    dense, expert = split_params_into_shared_and_expert_params(p for p in group if p.grad is not None)
    return [p.grad.to(p.dtype) for p in dense], [p.grad.to(p.dtype) for p in expert]


def _as_group_list(param_groups):
    if isinstance(param_groups, dict):
        return [param_groups]
    if isinstance(param_groups, (list, tuple)):
        return list(param_groups)
    raise ValueError(f"Unknown param group type of {type(param_groups)}")


def split_params_into_different_moe_groups_for_optimizer(param_groups, max_group_size=_MAX_GROUP_SIZE):
    """DeepSpeed's: param groups (a dict, or a list or tuple of dicts) as a
    list, expert params moved to groups of their own. Dense groups come
    back as given; expert params are refused (zinf has no expert
    parallelism: it would average each expert over every rank), so
    `max_group_size`, which bounds expert groups, has nothing to bound."""
    groups = _as_group_list(param_groups)
    for group in groups:
        experts = [p for p in group["params"] if isinstance(p, torch.Tensor) and is_moe_param(p)]
        if experts:
            raise ValueError(f"param group {group.get('name', groups.index(group))!r} holds {len(experts)} "
                             "mixture-of-experts param(s): zinf has no expert parallelism")
    return groups


def is_moe_param_group(param_group):
    return param_group.get("moe", False)


def configure_moe_param_groups(model_parameters):
    """DeepSpeed's: a list of params becomes one group named "dense-params";
    a list of groups is kept (both checked as above)."""
    if not isinstance(model_parameters, list):
        raise TypeError("model_parameters must be a list")
    for p in model_parameters:
        if not isinstance(p, (torch.Tensor, dict)):
            raise TypeError("param argument that would be given to the optimizer should be an iterable of "
                            f"Tensors or dicts, but got {type(p)}")
    if model_parameters and isinstance(model_parameters[0], torch.nn.Parameter):
        return split_params_into_different_moe_groups_for_optimizer({"params": model_parameters,
                                                                     "name": "dense-params"})
    # Groups already split (a "moe" key) are checked all the same.
    return split_params_into_different_moe_groups_for_optimizer(model_parameters)

"""DeepSpeed's CPU optimizers (DeepSpeedCPUAdam, DeepSpeedCPUAdagrad,
DeepSpeedCPULion) on zinf's kernels, as torch.optim.Optimizer subclasses.

Each step makes one multi-tensor call per parameter group (per distinct step
count, when some params missed steps), with the GIL released. Params must be
CPU tensors (a GPU param is refused with an error that is both a ValueError
and, as DeepSpeed's assert, an AssertionError); fp32 params may have bf16 or
fp16 gradients (torch refuses a .grad of another dtype, so those come as
step(grads={param: grad})); bf16/fp16 params keep fp32 states unless
fp32_optimizer_states is False. Non-contiguous params are stepped through a
contiguous copy that is written back; CPUAdagrad takes sparse gradients
(only the rows they name are updated, as torch's Adagrad does).

The attributes DeepSpeed's code reads are there: opt_id (a counter per
class), adam_w_mode, fp32_optimizer_states; CPUAdam has step_subgroup /
rollback_subgroup (state kept under an integer sub-group id, as DeepSpeed's
SuperOffload uses them).
"""
import os

import torch

from . import _zinf
from ._tensors import cpu_bytes, dtype_name

# Gradient dtypes the kernels take for each param dtype; others are
# converted to fp32 first.
_GRADS_FOR = {
    torch.float32: (torch.float32, torch.bfloat16, torch.float16),
    torch.bfloat16: (torch.bfloat16, torch.float32),
    torch.float16: (torch.float16, torch.float32),
}


class DeviceError(ValueError, AssertionError):
    """A param or gradient that is not on the CPU. DeepSpeed asserts there,
    so both `except ValueError` and `except AssertionError` catch it."""


def _check_cpu(owner, tensor, where):
    if tensor.device.type != "cpu":
        raise DeviceError(f"{owner} steps CPU tensors; {where} is on {tensor.device} and must be 'cpu' "
                          "(keep the optimizer's params on the CPU: 'offload_optimizer': 'cpu' in your "
                          "ZeRO config, or use a GPU optimizer)")


def cpu_kernel(threads=None):
    """zinf's CPU optimizer kernels on `threads` threads (default:
    $ZINF_CPU_ADAM_THREADS, else torch's thread count)."""
    threads = threads or int(os.environ.get("ZINF_CPU_ADAM_THREADS", 0)) or torch.get_num_threads()
    return _zinf.CpuOptimizer(threads)


def adagrad_tuple(description):
    """A kernel tuple with its one state moved to the second slot, where the
    Adagrad kernel keeps the sum of squares."""
    return description[:5] + (0, description[5]) + description[7:]


def kernel_tuple(owner, where, p, grad, states, copy, keep, writebacks):
    """The kernel's tuple for one param (`owner` names the caller in
    errors): param, gradient and state tensors checked, non-contiguous ones
    replaced by contiguous copies (listed in `writebacks` as (original,
    copy) to copy back after the call), and everything that must outlive
    the call appended to `keep`."""
    _check_cpu(owner, p, where)
    if grad.device.type != "cpu":
        raise DeviceError(f"the gradient of {where} is on {grad.device} and must be 'cpu'")
    if grad.shape != p.shape:
        raise ValueError(f"the gradient of {where} has shape {tuple(grad.shape)}, the param {tuple(p.shape)}")
    param_dtype = dtype_name(p.dtype, where)
    work = p.detach()
    if not work.is_contiguous():
        work = work.contiguous()
        writebacks.append((p, work))
    if grad.dtype not in _GRADS_FOR[p.dtype]:
        grad = grad.float()
    grad = grad.contiguous()
    keep.append(grad)
    tensors = list(states)
    for index, tensor in enumerate(tensors):
        _check_cpu(owner, tensor, f"the state of {where}")
        if tensor.shape != p.shape:
            raise ValueError(f"a state tensor of {where} has shape {tuple(tensor.shape)}, the param "
                             f"{tuple(p.shape)}")
        if not tensor.is_contiguous():
            tensors[index] = tensor.contiguous()
            writebacks.append((tensor, tensors[index]))
    keep.extend(tensors)
    first = tensors[0].data_ptr() if tensors else 0
    second = tensors[1].data_ptr() if len(tensors) > 1 else 0
    state_dtype = dtype_name(tensors[0].dtype, where) if tensors else "fp32"
    if any(tensor.dtype != tensors[0].dtype for tensor in tensors):
        raise ValueError(f"the state tensors of {where} must share one dtype")
    copy_address, copy_dtype = 0, "fp32"
    if copy is not None:
        if p.dtype != torch.float32 or copy.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"the 16-bit copy of {where} must be bfloat16 or float16 of an fp32 param")
        if copy.numel() != p.numel():
            raise ValueError(f"the 16-bit copy of {where} has {copy.numel()} elements, the param {p.numel()}")
        copy_address, _ = cpu_bytes(copy, f"the 16-bit copy of {where}")
        copy_dtype = dtype_name(copy.dtype, where)
    return (work.data_ptr(), param_dtype, work.numel(), grad.data_ptr(), dtype_name(grad.dtype, where),
            first, second, state_dtype, copy_address, copy_dtype)


class _CpuOptimizer(torch.optim.Optimizer):
    _states = ()        # state tensors the kernel updates, in kernel order
    _extra_states = ()  # state tensors DeepSpeed also creates (kept, unused)
    _takes_sparse = False
    _torch_state_names = {}  # torch's name of a state tensor -> this optimizer's
    optimizer_id = 0

    def __init__(self, params, defaults, fp32_optimizer_states, threads):
        super().__init__(params, defaults)
        self.fp32_optimizer_states = fp32_optimizer_states
        # DeepSpeed numbers the instances of each optimizer class.
        cls = type(self)
        self.opt_id = cls.optimizer_id
        cls.optimizer_id = self.opt_id + 1
        self._kernel = cpu_kernel(threads)

    @property
    def kernel_tier(self):
        """"avx512", "avx2" or "scalar": the kernels this CPU runs."""
        return self._kernel.tier

    def _check_device(self, tensor, where):
        _check_cpu(type(self).__name__, tensor, where)

    def _state_names(self, param_state):
        """A saved param state's tensor names as this optimizer calls them
        (torch's Adagrad says "sum")."""
        return {self._torch_state_names.get(key, key) for key in param_state}

    def load_state_dict(self, state_dict):
        """Also takes torch's optimizers' state dicts (AdamW, Adam,
        Adagrad): their groups lack DeepSpeed's keys (bias_correction ...),
        their steps are tensors, Adagrad's sum is "sum". What this optimizer
        cannot continue (another optimizer's state, AMSGrad) is refused
        before anything changes. With fp32_optimizer_states the states stay
        fp32 for 16-bit params (torch casts them to the param's dtype)."""
        name = type(self).__name__
        for index, group in enumerate(state_dict["param_groups"]):
            if group.get("amsgrad"):
                raise ValueError(f"{name}.load_state_dict: param group {index} has amsgrad=True, which zinf's CPU "
                                 "optimizers do not have")
        for param_state in state_dict["state"].values():
            missing = [key for key in self._states if param_state and key not in self._state_names(param_state)]
            if missing:
                raise ValueError(f"{name}.load_state_dict: a param's state has "
                                 f"{sorted(k for k in param_state if k != 'step')}, not {missing}")
        saved = state_dict["state"]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        if self.fp32_optimizer_states:
            params = [p for group in self.param_groups for p in group["params"]]
            for saved_id, p in zip(saved_ids, params):
                for key, value in saved.get(saved_id, {}).items():
                    key = self._torch_state_names.get(key, key)
                    if key in self._states + self._extra_states and torch.is_tensor(value) and \
                            value.dtype == torch.float32:
                        self.state[p][key] = value.to(torch.float32, copy=True)

    def __setstate__(self, state):
        """What load_state_dict (and unpickling) ends in: the defaults fill
        what the groups lack, steps become ints, torch's state names
        become this optimizer's."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        for param_state in self.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = int(param_state["step"].item())
            for torch_name, name in self._torch_state_names.items():
                if torch_name in param_state and name not in param_state:
                    param_state[name] = param_state.pop(torch_name)

    def _init_state(self, state, p):
        if not state:
            state_dtype = torch.float32 if self.fp32_optimizer_states else p.dtype
            state["step"] = 0
            for name in self._states + self._extra_states:
                state[name] = torch.zeros(p.shape, dtype=state_dtype)

    def _prepare(self, where, p, grad, state, copy, keep, writebacks):
        """Checks one param and returns the kernel's tuple for it (its step
        count is bumped by the caller once every param checked out); what
        must outlive the call goes to `keep`, contiguous copies to write
        back to `writebacks`."""
        self._check_device(p, where)
        self._init_state(state, p)
        return kernel_tuple(type(self).__name__, where, p, grad, [state[name] for name in self._states], copy, keep,
                            writebacks)

    def _describe(self, group_index, group, grads, copies, keep, writebacks):
        """The group's params with a gradient, checked: [(state, kernel
        tuple)] for the dense ones and [(p, grad, where)] for the sparse."""
        dense, sparse = [], []
        if copies is not None and len(copies) != len(group["params"]):
            raise ValueError(f"fp16_param_groups[{group_index}] has {len(copies)} tensors for "
                             f"{len(group['params'])} params")
        for index, p in enumerate(group["params"]):
            grad = grads.get(p, p.grad) if grads else p.grad
            if grad is None:
                continue
            where = f"param {index} of group {group_index}"
            if grad.is_sparse:
                if not self._takes_sparse:
                    raise ValueError(f"{where} has a sparse gradient, which {type(self).__name__} does not take")
                self._check_device(p, where)
                if grad.shape != p.shape:
                    raise ValueError(f"the gradient of {where} has shape {tuple(grad.shape)}, the param "
                                     f"{tuple(p.shape)}")
                sparse.append((p, grad, where))
                continue
            copy = copies[index] if copies is not None else None
            dense.append((self.state[p], self._prepare(where, p, grad, self.state[p], copy, keep, writebacks)))
        return dense, sparse

    @torch.no_grad()
    def step(self, closure=None, fp16_param_groups=None, grads=None):
        """One step over every param with a gradient. `fp16_param_groups`
        (DeepSpeed's: per group, a bf16/fp16 tensor per fp32 param) receive
        the updated params rounded, in the same pass. `grads` ({param:
        tensor}) supplies gradients in place of .grad, e.g. bf16 gradients
        for fp32 params. Every param is checked before any is stepped: a
        refused step changes nothing (params, states, step counts)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keep, writebacks, plans = [], [], []
        for group_index, group in enumerate(self.param_groups):
            copies = fp16_param_groups[group_index] if fp16_param_groups is not None else None
            plans.append((group, *self._describe(group_index, group, grads, copies, keep, writebacks)))
        for group, dense, sparse in plans:
            by_step = {}
            for state, description in dense:
                state["step"] += 1
                by_step.setdefault(state["step"], []).append(description)
            for step, tensors in by_step.items():
                self._run(group, step, tensors)
            for p, grad, where in sparse:
                self._sparse_step(group, p, grad, where)
        for original, work in writebacks:
            original.detach().copy_(work)
        del keep
        return loss


class CPUAdam(_CpuOptimizer):
    """DeepSpeedCPUAdam: Adam (adamw_mode=False: L2 weight decay) or AdamW
    (the default: decoupled weight decay), torch's update."""
    _states = ("exp_avg", "exp_avg_sq")
    optimizer_id = 0

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adamw_mode=True, fp32_optimizer_states=True, threads=None):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported: zinf's CPU Adam has no AMSGrad variant")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        amsgrad=amsgrad)
        super().__init__(model_params, defaults, fp32_optimizer_states, threads)
        self.adam_w_mode = adamw_mode  # DeepSpeed's attribute name (its keyword is adamw_mode)

    @property
    def adamw_mode(self):
        return self.adam_w_mode

    def _run(self, group, step, tensors):
        beta1, beta2 = group["betas"]
        self._kernel.adam_step(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], self.adam_w_mode,
                               group["bias_correction"], step, tensors)

    def _subgroup_param(self, subgroup_id):
        """The one param with a gradient that a sub-group step works on
        (DeepSpeed's callers put a sub-group's flat buffer in the groups)."""
        found = [(group, index, p) for group in self.param_groups for index, p in enumerate(group["params"])
                 if p.grad is not None]
        if len(found) > 1:
            raise ValueError(f"sub_group_id {subgroup_id}: {len(found)} params have gradients; a sub-group step "
                             "works on one (the sub-group's flat buffer)")
        return found[0] if found else None

    @torch.no_grad()
    def step_subgroup(self, subgroup_id, closure=None):
        """One Adam step of the sub-group's param with its state kept under
        self.state[subgroup_id] (DeepSpeed's SuperOffload interface)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found = self._subgroup_param(subgroup_id)
        if found is None:
            return loss
        group, index, p = found
        keep, writebacks = [], []
        description = self._prepare(f"param {index} of sub_group_id {subgroup_id}", p, p.grad,
                                    self.state[subgroup_id], None, keep, writebacks)
        self.state[subgroup_id]["step"] += 1
        self._run(group, self.state[subgroup_id]["step"], [description])
        for original, work in writebacks:
            original.detach().copy_(work)
        return loss

    @torch.no_grad()
    def rollback_subgroup(self, sub_group_id, closure=None):
        """Undoes the last step_subgroup(sub_group_id) with the same
        gradient: the param, exp_avg and exp_avg_sq go back (up to float
        rounding; 16-bit params are recomputed in fp32 and rounded) and the
        step count drops by one."""
        state = self.state.get(sub_group_id)
        if not state:
            raise RuntimeError(f"Cannot rollback optimizer state for sub_group_id {sub_group_id} as it has not "
                               "been initialized.")
        step = state.get("step", 0)
        if step <= 0:
            raise RuntimeError(f"Cannot rollback sub_group_id {sub_group_id}: step count is {step}")
        found = self._subgroup_param(sub_group_id)
        if found is not None:
            group, index, p = found
            self._check_device(p, f"param {index} of sub_group_id {sub_group_id}")
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            weight_decay = group["weight_decay"]
            if group["bias_correction"]:
                correction1, correction2 = 1 - beta1 ** step, 1 - beta2 ** step
            else:
                correction1 = correction2 = 1.0
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            m, v = exp_avg.float(), exp_avg_sq.float()
            grad = p.grad.float().reshape(m.shape)
            param = p.detach().float()
            update = (m / correction1) / (v.sqrt() / correction2 ** 0.5 + eps)
            if self.adam_w_mode:
                param = (param + lr * update) / (1 - lr * weight_decay)
            else:
                param = param + lr * update
                grad = grad + weight_decay * param
            m = (m - (1 - beta1) * grad) / beta1
            v = ((v - (1 - beta2) * grad * grad) / beta2).clamp_(min=0)
            p.detach().copy_(param)
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
        state["step"] = step - 1
        return None


class CPUAdagrad(_CpuOptimizer):
    """DeepSpeedCPUAdagrad: torch's Adagrad (no lr decay, zero initial
    sum); sparse gradients update only the entries they name."""
    _states = ("exp_avg_sq",)
    _takes_sparse = True
    _torch_state_names = {"sum": "exp_avg_sq"}  # torch's Adagrad keeps it as "sum"
    optimizer_id = 0

    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
                 fp32_optimizer_states=True, threads=None):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by Adagrad")
        super().__init__(model_params, dict(lr=lr, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad),
                         fp32_optimizer_states, threads)

    def _run(self, group, step, tensors):
        self._kernel.adagrad_step(group["lr"], group["eps"], group["weight_decay"], step,
                                  [adagrad_tuple(t) for t in tensors])

    def _sparse_step(self, group, p, grad, where):
        """Steps the entries a sparse gradient names: they are gathered
        (param and sum of squares), stepped by the dense kernel and
        scattered back (its shape checked in _describe)."""
        grad = grad.coalesce()
        index = tuple(grad.indices())
        values = grad.values()
        if values.dtype not in _GRADS_FOR[p.dtype]:
            values = values.float()
        values = values.contiguous()
        state = self.state[p]
        self._init_state(state, p)
        state["step"] += 1
        param = p.detach()
        rows = param[index].contiguous()
        squares = state["exp_avg_sq"][index].contiguous()
        description = (rows.data_ptr(), dtype_name(p.dtype, where), rows.numel(), values.data_ptr(),
                       dtype_name(values.dtype, where), squares.data_ptr(), 0,
                       dtype_name(squares.dtype, where), 0, "fp32")
        self._run(group, state["step"], [description])
        param[index] = rows
        state["exp_avg_sq"][index] = squares


class CPULion(_CpuOptimizer):
    """DeepSpeedCPULion: the Lion update (sign of the interpolated
    momentum). Its state holds exp_avg and, as DeepSpeed's does, an unused
    exp_avg_sq, so checkpoints have DeepSpeed's keys."""
    _states = ("exp_avg",)
    _extra_states = ("exp_avg_sq",)
    optimizer_id = 0

    def __init__(self, model_params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0, fp32_optimizer_states=True,
                 threads=None):
        super().__init__(model_params, dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         fp32_optimizer_states, threads)

    def _run(self, group, step, tensors):
        beta1, beta2 = group["betas"]
        self._kernel.lion_step(group["lr"], beta1, beta2, group["weight_decay"], step, tensors)


# DeepSpeed's class names.
DeepSpeedCPUAdam = CPUAdam
DeepSpeedCPUAdagrad = CPUAdagrad
DeepSpeedCPULion = CPULion

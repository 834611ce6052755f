"""DeepSpeed's CPU optimizers (DeepSpeedCPUAdam, DeepSpeedCPUAdagrad,
DeepSpeedCPULion) on zinf's kernels, as torch.optim.Optimizer subclasses.

Each step makes one multi-tensor call per parameter group (per distinct step
count, when some params missed steps), with the GIL released. Params must be
CPU tensors (a GPU param is refused with a clear error); fp32 params may
have bf16 or fp16 gradients (torch refuses a .grad of another dtype, so
those come as step(grads={param: grad})); bf16/fp16 params keep fp32 states
unless fp32_optimizer_states is False.
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


class _CpuOptimizer(torch.optim.Optimizer):
    _states = ()  # state tensors the optimizer keeps, in kernel order

    def __init__(self, params, defaults, fp32_optimizer_states, threads):
        super().__init__(params, defaults)
        self.fp32_optimizer_states = fp32_optimizer_states
        threads = threads or int(os.environ.get("ZINF_CPU_ADAM_THREADS", 0)) or torch.get_num_threads()
        self._kernel = _zinf.CpuOptimizer(threads)

    @property
    def kernel_tier(self):
        """"avx512", "avx2" or "scalar": the kernels this CPU runs."""
        return self._kernel.tier

    def _describe(self, group_index, group, grads, copies):
        """One tuple per param with a gradient, grouped by step count, and
        the tensors that must stay alive through the call."""
        by_step, keep = {}, []
        if copies is not None and len(copies) != len(group["params"]):
            raise ValueError(f"fp16_param_groups[{group_index}] has {len(copies)} tensors for "
                             f"{len(group['params'])} params")
        for index, p in enumerate(group["params"]):
            grad = grads.get(p, p.grad) if grads else p.grad
            if grad is None:
                continue
            where = f"param {index} of group {group_index}"
            if p.device.type != "cpu":
                raise ValueError(f"{type(self).__name__} steps CPU tensors; {where} is on {p.device} "
                                 "(keep the optimizer's params on the CPU, or use a GPU optimizer)")
            if grad.is_sparse:
                raise ValueError(f"{where} has a sparse gradient, which {type(self).__name__} does not take")
            if grad.shape != p.shape:
                raise ValueError(f"the gradient of {where} has shape {tuple(grad.shape)}, the param {tuple(p.shape)}")
            cpu_bytes(p, where)  # CPU and contiguous: the update is in place
            param_dtype = dtype_name(p.dtype, where)
            if grad.dtype not in _GRADS_FOR[p.dtype]:
                grad = grad.float()
            grad = grad.contiguous()
            if grad.device.type != "cpu":
                raise ValueError(f"the gradient of {where} is on {grad.device}")
            keep.append(grad)
            state = self.state[p]
            if not state:
                state_dtype = torch.float32 if self.fp32_optimizer_states else p.dtype
                state["step"] = 0
                for name in self._states:
                    state[name] = torch.zeros(p.shape, dtype=state_dtype)
            state["step"] += 1
            tensors = [state[name] for name in self._states]
            first = tensors[0].data_ptr() if tensors else 0
            second = tensors[1].data_ptr() if len(tensors) > 1 else 0
            state_dtype = dtype_name(tensors[0].dtype, where) if tensors else "fp32"
            copy_address, copy_dtype = 0, "fp32"
            if copies is not None:
                copy = copies[index]
                if p.dtype != torch.float32 or copy.dtype not in (torch.bfloat16, torch.float16):
                    raise ValueError(f"the 16-bit copy of {where} must be bfloat16 or float16 of an fp32 param")
                if copy.numel() != p.numel():
                    raise ValueError(f"the 16-bit copy of {where} has {copy.numel()} elements, the param {p.numel()}")
                copy_address, _ = cpu_bytes(copy, f"the 16-bit copy of {where}")
                copy_dtype = dtype_name(copy.dtype, where)
            description = (p.data_ptr(), param_dtype, p.numel(), grad.data_ptr(), dtype_name(grad.dtype, where),
                           first, second, state_dtype, copy_address, copy_dtype)
            by_step.setdefault(state["step"], []).append(description)
        return by_step, keep

    @torch.no_grad()
    def step(self, closure=None, fp16_param_groups=None, grads=None):
        """One step over every param with a gradient. `fp16_param_groups`
        (DeepSpeed's: per group, a bf16/fp16 tensor per fp32 param) receive
        the updated params rounded, in the same pass. `grads` ({param:
        tensor}) supplies gradients in place of .grad, e.g. bf16 gradients
        for fp32 params."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            copies = fp16_param_groups[group_index] if fp16_param_groups is not None else None
            by_step, keep = self._describe(group_index, group, grads, copies)
            for step, tensors in by_step.items():
                self._run(group, step, tensors)
            del keep
        return loss


class CPUAdam(_CpuOptimizer):
    """DeepSpeedCPUAdam: Adam (adamw_mode=False: L2 weight decay) or AdamW
    (the default: decoupled weight decay), torch's update."""
    _states = ("exp_avg", "exp_avg_sq")

    def __init__(self, model_params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0, amsgrad=False, adamw_mode=True, fp32_optimizer_states=True, threads=None):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported: zinf's CPU Adam has no AMSGrad variant")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                        amsgrad=amsgrad)
        super().__init__(model_params, defaults, fp32_optimizer_states, threads)
        self.adamw_mode = adamw_mode

    def _run(self, group, step, tensors):
        beta1, beta2 = group["betas"]
        self._kernel.adam_step(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], self.adamw_mode,
                               group["bias_correction"], step, tensors)


class CPUAdagrad(_CpuOptimizer):
    """DeepSpeedCPUAdagrad: torch's Adagrad (no lr decay, zero initial sum)."""
    _states = ("exp_avg_sq",)

    def __init__(self, model_params, lr=1e-2, eps=1e-10, weight_decay=0, amsgrad=False,
                 fp32_optimizer_states=True, threads=None):
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by Adagrad")
        super().__init__(model_params, dict(lr=lr, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad),
                         fp32_optimizer_states, threads)

    def _run(self, group, step, tensors):
        # The kernel keeps Adagrad's sum of squares in the exp_avg_sq slot.
        tensors = [t[:5] + (0, t[5]) + t[7:] for t in tensors]
        self._kernel.adagrad_step(group["lr"], group["eps"], group["weight_decay"], step, tensors)


class CPULion(_CpuOptimizer):
    """DeepSpeedCPULion: the Lion update (sign of the interpolated momentum)."""
    _states = ("exp_avg",)

    def __init__(self, model_params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0, fp32_optimizer_states=True,
                 threads=None):
        super().__init__(model_params, dict(lr=lr, betas=betas, weight_decay=weight_decay),
                         fp32_optimizer_states, threads)

    def _run(self, group, step, tensors):
        beta1, beta2 = group["betas"]
        self._kernel.lion_step(group["lr"], beta1, beta2, group["weight_decay"], step, tensors)

"""``deepspeed.ops.lion``: DeepSpeedCPULion (zinf's CPU Lion) and FusedLion."""
import torch

from ..optim import DeepSpeedCPULion
from .op_builder import FusedLionBuilder


class FusedLion(torch.optim.Optimizer):
    """DeepSpeed's FusedLion (its constructor, state keys and set_grad_none)
    for params on any device: each step is FusedLionBuilder's
    multi_tensor_lion, torch arithmetic on the params' device (zinf has no
    CUDA Lion kernel of its own). Offloaded optimizers use DeepSpeedCPULion."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, set_grad_none=True):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.set_grad_none = set_grad_none
        self.multi_tensor_lion = FusedLionBuilder().load().multi_tensor_lion

    def zero_grad(self, set_to_none=None):
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    @torch.no_grad()
    def step(self, closure=None, grads=None, output_params=None, scale=None, grad_norms=None, grad_scaler=None):
        if any(arg is not None for arg in (grads, output_params, scale, grad_norms, grad_scaler)):
            raise RuntimeError("FusedLion has been updated.")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_step = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise NotImplementedError("FusedLion does not support sparse gradients")
                if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                    raise RuntimeError("FusedLion only support fp16, bf16 and fp32.")
                state = self.state[p]
                if not state:
                    state["step"] = group.get("step", 0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                lists = by_step.setdefault(state["step"], ([], [], []))
                for target, tensor in zip(lists, (p.grad, p, state["exp_avg"])):
                    target.append(tensor)
            for step, lists in by_step.items():
                self.multi_tensor_lion(2048 * 32, None, list(lists), group["lr"], beta1, beta2, step,
                                       group["weight_decay"])
        return loss


__all__ = ["DeepSpeedCPULion", "FusedLion"]

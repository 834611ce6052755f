"""``deepspeed.ops.adam``: DeepSpeedCPUAdam (zinf's CPU Adam) and FusedAdam."""
import inspect

import torch

from ..optim import DeepSpeedCPUAdam


class FusedAdam(torch.optim.Adam):
    """DeepSpeed's FusedAdam (its constructor, adam_w_mode and
    set_grad_none) for params on the device. zinf has no GPU optimizer
    kernel of its own: a step is torch's Adam, through torch's fused CUDA
    kernel where torch has one and every param is on CUDA, its multi-tensor
    path otherwise. adam_w_mode (the default) decouples the weight decay as
    AdamW does: params are scaled by 1 - lr * weight_decay before the Adam
    update; adam_w_mode=False adds it to the gradient (L2). Offloaded
    optimizers use DeepSpeedCPUAdam."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0, amsgrad=False, set_grad_none=True):
        if amsgrad:
            raise RuntimeError("FusedAdam does not support the AMSGrad variant.")
        if not bias_correction:
            raise ValueError("FusedAdam with bias_correction=False is not supported: torch's Adam always corrects "
                             "the bias")
        params = list(params)
        tensors = [p for entry in params for p in (entry["params"] if isinstance(entry, dict) else [entry])]
        options = {}
        if "fused" in inspect.signature(torch.optim.Adam.__init__).parameters and tensors and \
                all(p.device.type == "cuda" and p.is_floating_point() for p in tensors):
            options["fused"] = True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, **options)
        # torch's fused Adam would take GradScaler's scale into step(); the
        # decoupled decay below runs before that step, so a skipped step
        # would still decay. GradScaler unscales and skips by itself instead
        # (as with DeepSpeed's FusedAdam).
        self._step_supports_amp_scaling = False
        self.adam_w_mode = 1 if adam_w_mode else 0
        self.set_grad_none = set_grad_none

    def zero_grad(self, set_to_none=None):
        """Drops the gradients (set_grad_none, DeepSpeed's default) or zeroes
        them."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    @torch.no_grad()
    def step(self, closure=None, grads=None, output_params=None, scale=None, grad_norms=None, grad_scaler=None):
        if any(arg is not None for arg in (grads, output_params, scale, grad_norms, grad_scaler)):
            raise RuntimeError("FusedAdam has been updated. Simply initialize it identically to torch.optim.Adam, "
                               "and call step() with no arguments.")
        if not self.adam_w_mode:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        decays = []
        for group in self.param_groups:
            decays.append(group["weight_decay"])
            if group["weight_decay"]:
                with_grads = [p for p in group["params"] if p.grad is not None]
                if with_grads:
                    torch._foreach_mul_(with_grads, 1.0 - group["lr"] * group["weight_decay"])
            group["weight_decay"] = 0.0
        try:
            super().step()
        finally:
            for group, decay in zip(self.param_groups, decays):
                group["weight_decay"] = decay
        return loss


__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]

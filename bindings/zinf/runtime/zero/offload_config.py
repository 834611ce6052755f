"""``deepspeed.runtime.zero.offload_config``: the offload device and state
names, as the enums scripts and DeepSpeed's tests build configs from."""
from enum import Enum


class OffloadDeviceEnum(str, Enum):
    """``offload_param.device`` / ``offload_optimizer.device``."""
    none = "none"
    cpu = "cpu"
    nvme = "nvme"


class OffloadStateTypeEnum(str, Enum):
    """The kinds of state DeepSpeed's ``offload_states`` names (zinf keeps
    optimizer states and masters off the GPU always)."""
    optim_states = "optim_states"
    hp_params = "hp_params"
    lp_params = "lp_params"
    lp_grads = "lp_grads"
    contiguous_grad_buffer = "contiguous_grad_buffer"


__all__ = ["OffloadDeviceEnum", "OffloadStateTypeEnum"]

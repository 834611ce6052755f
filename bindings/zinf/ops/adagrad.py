"""``deepspeed.ops.adagrad``: DeepSpeedCPUAdagrad (zinf's CPU Adagrad)."""
from ..optim import DeepSpeedCPUAdagrad

__all__ = ["DeepSpeedCPUAdagrad"]

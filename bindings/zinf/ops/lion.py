"""``deepspeed.ops.lion``: DeepSpeedCPULion (zinf's CPU Lion)."""
from ..optim import DeepSpeedCPULion

__all__ = ["DeepSpeedCPULion"]

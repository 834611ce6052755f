"""DeepSpeed's ``deepspeed.utils`` helpers that scripts reach for, over
zinf's checkpoints: ``zinf.utils.zero_to_fp32``."""
from . import zero_to_fp32

__all__ = ["zero_to_fp32"]

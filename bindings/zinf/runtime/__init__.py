"""DeepSpeed's ``deepspeed.runtime`` module paths that training scripts
import from (``from deepspeed.runtime.lr_schedules import WarmupLR``,
``from deepspeed.runtime.zero.stage3 import estimate_zero3_...``), with
``deepspeed`` replaced by ``zinf``: each is zinf's own implementation."""

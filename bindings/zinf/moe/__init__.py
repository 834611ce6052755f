"""DeepSpeed's ``deepspeed.moe`` paths, so scripts that import them (for an
optional mixture-of-experts mode) run their dense models on zinf. zinf has
no expert parallelism: ``layer.MoE`` refuses to be built, and the param
group helpers in ``utils`` pass dense params through and refuse expert
params, which zinf would otherwise average over every rank as dense ones."""
from . import layer, utils  # noqa: F401

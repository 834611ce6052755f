"""``deepspeed.runtime.engine``: the engine class zinf.initialize returns,
under DeepSpeed's name too, for scripts (and Accelerate) that check
``isinstance(model, DeepSpeedEngine)``."""
from ..engine import ZinfEngine

DeepSpeedEngine = ZinfEngine

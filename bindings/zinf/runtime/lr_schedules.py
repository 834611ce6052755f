"""``deepspeed.runtime.lr_schedules``: zinf's schedulers (zinf.lr_schedules)."""
from ..lr_schedules import *  # noqa: F401,F403
from ..lr_schedules import __all__  # noqa: F401

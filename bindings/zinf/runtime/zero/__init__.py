"""``deepspeed.runtime.zero``: zinf.zero's Init and GatheredParameters, and
the memory estimators (stage3, stage_1_and_2) with zinf's own figures."""
from ...zero import (GatheredParameters, Init, MiCS_Init, ZeroParamStatus, ZeroParamType,  # noqa: F401
                     register_external_parameter, unregister_external_parameter)
from .stage3 import unwrap_model_for_generation  # noqa: F401,E402

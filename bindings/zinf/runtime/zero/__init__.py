"""``deepspeed.runtime.zero``: zinf.zero's Init and GatheredParameters, and
the memory estimators (stage3, stage_1_and_2) with zinf's own figures."""
from ...zero import (GatheredParameters, Init, ZeroParamStatus, ZeroParamType,  # noqa: F401
                     register_external_parameter, unregister_external_parameter)

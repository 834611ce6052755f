"""``deepspeed.runtime.zero.partition_parameters``: zinf.zero's context managers."""
from ...zero import (GatheredParameters, Init, ZeroParamStatus, ZeroParamType,  # noqa: F401
                     register_external_parameter, unregister_external_parameter)

"""``deepspeed.runtime.zero.partition_parameters``: zinf.zero's context managers."""
from ...zero import (GatheredParameters, Init, ZeroParamStatus, ZeroParamType,  # noqa: F401
                     register_external_parameter, unregister_external_parameter)

# The shape of a released stage-3 param's .data (its values live in the
# shards), as DeepSpeed's: scripts and tests compare p.shape with it.
partitioned_param_data_shape = [0]

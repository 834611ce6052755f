"""``deepspeed.runtime.activation_checkpointing.checkpointing`` (Megatron-style
scripts import it by this path): the very module ``zinf.checkpointing``,
so configuration made through either path is one and the same."""
import sys

from ... import checkpointing

sys.modules[__name__ + ".checkpointing"] = checkpointing

"""DeepSpeed's ``deepspeed.ops`` on zinf: the op builders
(``zinf.ops.op_builder``: AsyncIOBuilder, CPUAdamBuilder, ...), the CPU
optimizers by their DeepSpeed module paths (``zinf.ops.adam``,
``zinf.ops.adagrad``, ``zinf.ops.lion``), ``zinf.ops.aio`` and
``__compatible_ops__``, so code written against ``deepspeed.ops`` runs with
``deepspeed`` replaced by ``zinf``. Nothing is compiled at run time: every op
is zinf's prebuilt extension."""
from . import adagrad, adam, aio, lion, op_builder
from .op_builder import compatible_ops as _compatible_ops

# {builder NAME: whether it loads here}, as deepspeed.ops.__compatible_ops__.
__compatible_ops__ = _compatible_ops()

__all__ = ["adagrad", "adam", "aio", "lion", "op_builder", "__compatible_ops__"]

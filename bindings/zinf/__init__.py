"""zinf: ZeRO-Infinity memory offload and NVMe I/O for PyTorch trainers.

- ``zinf.aio_handle``, ``aio_read``, ``aio_write``, ``deepspeed_memcpy``:
  DeepSpeed's async_io op (same constructor, methods, keywords and return
  values), raising OSError with path, offset and errno instead of returning
  -1: ``zinf`` stands where ``AsyncIOBuilder().load()`` did.
- ``zinf.CPUAdam``, ``zinf.CPUAdagrad``, ``zinf.CPULion``: DeepSpeed's CPU
  optimizers as torch.optim.Optimizer subclasses, one multi-tensor call per
  parameter group, AVX-512 / AVX2 / scalar kernels picked at run time.
- ``zinf.TensorSwapper``: tensors on NVMe by key (swap out, prefetch, swap
  in, release, commit).
- ``zinf.torch.offload(module, config)``: a module's parameters on NVMe or
  pinned host memory, streamed in around forward and backward.
- ``zinf.initialize(model=, config=)``: DeepSpeed's engine (ZeRO stages 0-3,
  offload to cpu or NVMe) over zinf's C++ engine, for scripts written for
  DeepSpeed (``import zinf as deepspeed``); schedulers in
  ``zinf.lr_schedules``; ``zinf.utils.zero_to_fp32`` puts a checkpoint's
  fp32 weights back together, as DeepSpeed's does; ``zinf.comm`` is
  ``deepspeed.comm`` over the torch.distributed group zinf trains on.
- ``zinf.ops`` (op builders, ``zinf.ops.adam.DeepSpeedCPUAdam`` ...) and
  ``zinf.accelerator.get_accelerator()``: DeepSpeed's ``deepspeed.ops`` and
  ``deepspeed.accelerator`` by the same paths; ``zinf.checkpointing`` is
  ``deepspeed.checkpointing`` (activation checkpointing); ``zinf.runtime``
  holds ``deepspeed.runtime``'s paths scripts import from (lr_schedules,
  utils.see_memory_usage, the zero memory estimators, engine.DeepSpeedEngine);
  ``zinf.moe`` has ``deepspeed.moe``'s param group helpers for dense
  models (zinf has no expert parallelism: MoE layers are refused).

Errors: ValueError for bad configuration or arguments, OSError (with errno
and filename) for I/O, RuntimeError for the rest. Every wait releases the GIL.
"""
from ._zinf import __version__
from .aio import aio_handle, aio_read, aio_write, deepspeed_memcpy
from .optim import CPUAdagrad, CPUAdam, CPULion, DeepSpeedCPUAdagrad, DeepSpeedCPUAdam, DeepSpeedCPULion
from .swap import TensorSwapper
from .engine import ZinfEngine, add_config_arguments, init_distributed, initialize
from .errors import DeepSpeedConfigError
from . import accelerator, checkpointing, comm, moe, ops, runtime, utils, zero
from .runtime.engine import DeepSpeedEngine
from .accelerator import get_accelerator

__all__ = ["__version__", "aio_handle", "aio_read", "aio_write", "deepspeed_memcpy", "CPUAdam", "CPUAdagrad",
           "CPULion", "DeepSpeedCPUAdam", "DeepSpeedCPUAdagrad", "DeepSpeedCPULion", "TensorSwapper",
           "ZinfEngine", "DeepSpeedEngine", "DeepSpeedConfigError", "add_config_arguments", "init_distributed",
           "initialize", "accelerator", "checkpointing", "comm", "get_accelerator", "moe", "ops", "utils", "zero"]

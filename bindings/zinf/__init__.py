"""zinf: ZeRO-Infinity memory offload and NVMe I/O for PyTorch trainers.

- ``zinf.aio_handle``: DeepSpeed's async I/O handle (same constructor,
  methods and return values) that raises OSError with path, offset and errno
  instead of returning -1.
- ``zinf.CPUAdam``, ``zinf.CPUAdagrad``, ``zinf.CPULion``: DeepSpeed's CPU
  optimizers as torch.optim.Optimizer subclasses, one multi-tensor call per
  parameter group, AVX-512 / AVX2 / scalar kernels picked at run time.
- ``zinf.TensorSwapper``: tensors on NVMe by key (swap out, prefetch, swap
  in, release, commit).
- ``zinf.torch.offload(module, config)``: a module's parameters on NVMe or
  pinned host memory, streamed in around forward and backward.

Errors: ValueError for bad configuration or arguments, OSError (with errno
and filename) for I/O, RuntimeError for the rest. Every wait releases the GIL.
"""
from ._zinf import __version__
from .aio import aio_handle
from .optim import CPUAdagrad, CPUAdam, CPULion
from .swap import TensorSwapper

__all__ = ["__version__", "aio_handle", "CPUAdam", "CPUAdagrad", "CPULion", "TensorSwapper"]

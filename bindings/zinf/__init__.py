"""zinf: ZeRO-Infinity memory offload and NVMe I/O for PyTorch trainers.

- ``zinf.aio_handle``: DeepSpeed's async I/O handle (same constructor,
  methods and return values) that raises OSError with path, offset and errno
  instead of returning -1.
- ``zinf.CPUAdam``, ``zinf.CPUAdagrad``, ``zinf.CPULion``: DeepSpeed's CPU
  optimizers as torch.optim.Optimizer subclasses, one multi-tensor call per
  parameter group, AVX-512 / AVX2 / scalar kernels picked at run time.

Errors: ValueError for bad configuration or arguments, OSError (with errno
and filename) for I/O, RuntimeError for the rest. Every wait releases the GIL.
"""
from ._zinf import __version__
from .aio import aio_handle
from .optim import CPUAdagrad, CPUAdam, CPULion

__all__ = ["__version__", "aio_handle", "CPUAdam", "CPUAdagrad", "CPULion"]

"""``deepspeed.ops.aio``: AsyncIOBuilder, and the op it loads (aio_handle,
aio_read, aio_write, deepspeed_memcpy) by name."""
from ..aio import aio_handle, aio_read, aio_write, deepspeed_memcpy
from .op_builder import AsyncIOBuilder

__all__ = ["AsyncIOBuilder", "aio_handle", "aio_read", "aio_write", "deepspeed_memcpy"]

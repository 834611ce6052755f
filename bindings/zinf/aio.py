"""DeepSpeed's aio_handle on zinf's io_uring engine."""
import os

import torch

from . import _zinf
from ._tensors import cpu_bytes


class aio_handle:  # noqa: N801 - DeepSpeed's name
    """Reads and writes whole CPU tensors from and to files at a file offset.

    The constructor's defaults are DeepSpeed's aio_handle defaults (they
    differ from the JSON "aio" block's). Any tensor size works: the part that
    is not a multiple of the O_DIRECT alignment goes through buffered I/O.
    Queued (async) transfers keep their tensors alive until wait().
    """

    def __init__(self, block_size=1048576, queue_depth=128, single_submit=False,
                 overlap_events=False, intra_op_parallelism=1):
        self._handle = _zinf.AioHandle(block_size, queue_depth, single_submit, overlap_events,
                                       intra_op_parallelism)
        self._queued = []  # (tensor, filename, offset, validate) until wait()
        self._pinned = {}  # data_ptr -> PinnedMemory of tensors handed out

    # -- transfers ---------------------------------------------------------
    def _transfer(self, write, buffer, filename, validate, async_op, file_offset):
        if file_offset < 0:
            raise ValueError(f"file_offset {file_offset} is negative")
        address, nbytes = cpu_bytes(buffer, "buffer")
        path = os.fspath(filename)
        if write:
            self._handle.write(address, nbytes, path, file_offset, async_op)
        else:
            self._handle.read(address, nbytes, path, file_offset, async_op)
        if async_op:
            self._queued.append((buffer, path, file_offset, validate))
            return 0
        if validate:
            _validate(buffer, path, file_offset)
        return 1

    def sync_pread(self, buffer, filename, file_offset=0):
        return self._transfer(False, buffer, filename, False, False, file_offset)

    def sync_pwrite(self, buffer, filename, file_offset=0):
        return self._transfer(True, buffer, filename, False, False, file_offset)

    def async_pread(self, buffer, filename, file_offset=0):
        return self._transfer(False, buffer, filename, False, True, file_offset)

    def async_pwrite(self, buffer, filename, file_offset=0):
        return self._transfer(True, buffer, filename, False, True, file_offset)

    def pread(self, buffer, filename, validate, async_op, file_offset=0):
        return self._transfer(False, buffer, filename, validate, async_op, file_offset)

    def pwrite(self, buffer, filename, validate, async_op, file_offset=0):
        return self._transfer(True, buffer, filename, validate, async_op, file_offset)

    def wait(self):
        """Blocks (without the GIL) until every queued transfer is done;
        returns how many there were. Raises the first transfer's error."""
        queued, self._queued = self._queued, []
        count = self._handle.wait()
        for buffer, path, offset, validate in queued:
            if validate:
                _validate(buffer, path, offset)
        return count

    # -- pinned tensors ----------------------------------------------------
    def new_cpu_locked_tensor(self, num_elem, example_tensor):
        """A page-locked CPU tensor of num_elem elements of example_tensor's dtype."""
        if num_elem < 0:
            raise ValueError(f"num_elem {num_elem} is negative")
        dtype = example_tensor.dtype
        element = torch.tensor([], dtype=dtype).element_size()
        memory = _zinf.PinnedMemory(num_elem * element)
        if num_elem == 0:
            return torch.empty(0, dtype=dtype)
        # The tensor holds a reference to `memory` (buffer protocol): the
        # page-locked pages go back when the last reference goes.
        tensor = torch.frombuffer(memory, dtype=dtype, count=num_elem)
        self._pinned[tensor.data_ptr()] = memory
        return tensor

    def free_cpu_locked_tensor(self, tensor):
        """Forgets the handle's reference; the memory is returned once no
        tensor uses it."""
        if self._pinned.pop(tensor.data_ptr(), None) is None and tensor.numel() > 0:
            raise ValueError("free_cpu_locked_tensor: the tensor did not come from new_cpu_locked_tensor "
                             "of this handle (or was freed already)")

    # -- accessors -----------------------------------------------------------
    def get_block_size(self):
        return self._handle.block_size

    def get_queue_depth(self):
        return self._handle.queue_depth

    def get_single_submit(self):
        return self._handle.single_submit

    def get_overlap_events(self):
        return self._handle.overlap_events

    def get_intra_op_parallelism(self):
        return self._handle.intra_op_parallelism

    def get_engine(self):
        """"io_uring" or "posix" (the fallback where io_uring is refused)."""
        return self._handle.engine()


def _validate(buffer, path, offset):
    nbytes = buffer.numel() * buffer.element_size()
    with open(path, "rb") as file:
        file.seek(offset)
        expected = file.read(nbytes)
    actual = buffer.reshape(-1).view(torch.uint8).numpy().tobytes() if nbytes else b""
    if actual != expected:
        raise RuntimeError(f"validation failed: {nbytes} bytes of {path} at offset {offset} differ from "
                           "what a plain read of the file returns")

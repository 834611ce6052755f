"""DeepSpeed's aio_handle (and the async_io op's module functions) on zinf's
io_uring engine.

The names, argument orders, keyword spellings and return values are
DeepSpeed's (``deepspeed.ops.op_builder.AsyncIOBuilder().load()``), so its
swappers and tests run unchanged; where DeepSpeed returns -1 or aborts,
zinf raises (OSError with path, offset and errno; ValueError for bad
arguments).
"""
import os
import weakref

import torch

from . import _zinf
from ._tensors import cpu_bytes

# Every live handle, so is_pinned() sees buffers locked by any of them (as
# DeepSpeed's process-wide pinned-tensor manager does).
_HANDLES = weakref.WeakSet()

_NOT_GIVEN = object()


def _needs_bounce(tensor):
    """True for a tensor zinf cannot hand to the engine as it is: off the
    CPU (a GPU tensor) or not contiguous. Those go through a contiguous CPU
    copy, as DeepSpeed's bounce buffers do."""
    return isinstance(tensor, torch.Tensor) and (tensor.device.type != "cpu" or not tensor.is_contiguous())


class aio_handle:  # noqa: N801 - DeepSpeed's name
    """Reads and writes whole tensors from and to files at a file offset.

    The constructor's defaults are DeepSpeed's aio_handle defaults (they
    differ from the JSON "aio" block's); block_size may be any multiple of
    1 KiB (pieces are rounded up to whole 4 KiB). Any tensor size works: the
    part that is not a multiple of the O_DIRECT alignment goes through
    buffered I/O. GPU and non-contiguous tensors go through a contiguous CPU
    copy. Queued (async) transfers keep their tensors alive until wait().
    """

    def __init__(self, block_size=1048576, queue_depth=128, single_submit=False,
                 overlap_events=False, intra_op_parallelism=1):
        self._handle = _zinf.AioHandle(block_size, queue_depth, single_submit, overlap_events,
                                       intra_op_parallelism)
        self._queued = []  # (write, tensor, filename, offset, validate, bounce) until wait()
        self._pinned = {}  # data_ptr -> (PinnedMemory, nbytes) of tensors handed out
        _HANDLES.add(self)

    # -- transfers ---------------------------------------------------------
    def _transfer(self, write, buffer, filename, validate, async_op, file_offset, fd=None):
        if file_offset < 0:
            raise ValueError(f"file_offset {file_offset} is negative")
        path = _path_of(filename, fd)
        bounce = None
        if _needs_bounce(buffer):
            bounce = buffer.detach().to("cpu", copy=True).contiguous() if write else \
                torch.empty(buffer.shape, dtype=buffer.dtype)
        target = bounce if bounce is not None else buffer
        address, nbytes = cpu_bytes(target, "buffer")
        if write:
            self._handle.write(address, nbytes, path, file_offset, async_op)
        else:
            self._handle.read(address, nbytes, path, file_offset, async_op)
        if async_op:
            self._queued.append((write, buffer, path, file_offset, validate, bounce))
            return 0
        self._finish(write, buffer, path, file_offset, validate, bounce)
        return 1

    @staticmethod
    def _finish(write, buffer, path, offset, validate, bounce):
        if bounce is not None and not write:
            with torch.no_grad():
                buffer.copy_(bounce)
        if validate:
            _validate(bounce if bounce is not None else buffer, path, offset)

    def sync_pread(self, buffer, filename, file_offset=0):
        return self._transfer(False, buffer, filename, False, False, file_offset)

    def sync_pwrite(self, buffer, filename, file_offset=0):
        return self._transfer(True, buffer, filename, False, False, file_offset)

    def async_pread(self, buffer, filename=None, file_offset=0, fd=None):
        """Queues a read; `filename` may be a path or an open file descriptor
        (also as fd=). Returns 0."""
        return self._transfer(False, buffer, filename, False, True, file_offset, fd)

    def async_pwrite(self, buffer, filename=None, file_offset=0, fd=None):
        """Queues a write; `filename` may be a path or an open file
        descriptor (also as fd=; the caller keeps it open and closes it).
        Returns 0."""
        return self._transfer(True, buffer, filename, False, True, file_offset, fd)

    def pread(self, buffer, filename, validate=False, async_op=_NOT_GIVEN, file_offset=0, **kwargs):
        """DeepSpeed's pread(buffer, filename, validate, async, file_offset):
        returns 0 when queued, 1 when done. `async` (DeepSpeed's keyword)
        and `async_op` are the same argument."""
        async_op = _async_flag(async_op, kwargs, "pread")
        return self._transfer(False, buffer, filename, validate, async_op, file_offset)

    def pwrite(self, buffer, filename, validate=False, async_op=_NOT_GIVEN, file_offset=0, **kwargs):
        async_op = _async_flag(async_op, kwargs, "pwrite")
        return self._transfer(True, buffer, filename, validate, async_op, file_offset)

    def read(self, buffer, filename, validate=False, file_offset=0):
        """Synchronous read of the whole buffer; returns 0 (DeepSpeed's
        read and write return 0 on success)."""
        self._transfer(False, buffer, filename, validate, False, file_offset)
        return 0

    def write(self, buffer, filename, validate=False, file_offset=0):
        self._transfer(True, buffer, filename, validate, False, file_offset)
        return 0

    def wait(self):
        """Blocks (without the GIL) until every queued transfer is done;
        returns how many there were (0 with nothing queued). Raises the
        first transfer's error."""
        queued, self._queued = self._queued, []
        count = self._handle.wait()
        for write, buffer, path, offset, validate, bounce in queued:
            self._finish(write, buffer, path, offset, validate, bounce)
        return count

    # -- pinned tensors ----------------------------------------------------
    def new_cpu_locked_tensor(self, num_elem, example_tensor=None, example_tenosr=None):
        """A page-locked 1-D CPU tensor of num_elem elements of the example
        tensor's dtype (DeepSpeed spells the keyword example_tenosr; both
        are accepted)."""
        example = example_tensor if example_tensor is not None else example_tenosr
        if example is None:
            raise TypeError("new_cpu_locked_tensor() needs example_tensor (a tensor of the wanted dtype)")
        if num_elem < 0:
            raise ValueError(f"num_elem {num_elem} is negative")
        dtype = example.dtype
        element = torch.tensor([], dtype=dtype).element_size()
        memory = _zinf.PinnedMemory(num_elem * element)
        if num_elem == 0:
            return torch.empty(0, dtype=dtype)
        # The tensor holds a reference to `memory` (buffer protocol): the
        # page-locked pages go back when the last reference goes.
        tensor = torch.frombuffer(memory, dtype=dtype, count=num_elem)
        self._pinned[tensor.data_ptr()] = (memory, num_elem * element)
        return tensor

    def free_cpu_locked_tensor(self, tensor):
        """Forgets the handle's reference (the memory is returned once no
        tensor uses it). True if `tensor` came from this handle's
        new_cpu_locked_tensor; False (as DeepSpeed) for any other tensor or
        one freed already."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return False
        return self._pinned.pop(tensor.data_ptr(), None) is not None

    def is_pinned(self, buffer):
        """True for page-locked memory: a tensor (or a slice of one) from
        any handle's new_cpu_locked_tensor, or a torch pinned tensor."""
        if not isinstance(buffer, torch.Tensor) or buffer.device.type != "cpu":
            return False
        start = buffer.data_ptr()
        end = start + buffer.numel() * buffer.element_size()
        for handle in list(_HANDLES):
            for base, (_, nbytes) in handle._pinned.items():
                if base <= start and end <= base + nbytes:
                    return True
        try:
            return bool(buffer.is_pinned())
        except RuntimeError:  # torch without a usable CUDA runtime
            return False

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

    def get_alignment(self):
        """Bytes that sizes and offsets should be multiples of for a
        transfer to go entirely through O_DIRECT: DeepSpeed's
        intra_op_parallelism * 512, raised to a multiple of 4096 (other
        sizes work too, their tail through buffered I/O)."""
        deepspeeds = 512 * self._handle.intra_op_parallelism
        page = 4096
        while deepspeeds % page:
            deepspeeds += 512 * self._handle.intra_op_parallelism
        return deepspeeds

    def get_engine(self):
        """"io_uring" or "posix" (the fallback where io_uring is refused)."""
        return self._handle.engine()


def _async_flag(async_op, kwargs, name):
    if "async" in kwargs:
        if async_op is not _NOT_GIVEN:
            raise TypeError(f"{name}() got both async and async_op")
        async_op = kwargs.pop("async")
    if kwargs:
        raise TypeError(f"{name}() got unexpected keyword arguments {sorted(kwargs)}")
    if async_op is _NOT_GIVEN:
        raise TypeError(f"{name}() missing the argument async (True: queue until wait(); False: wait now)")
    return bool(async_op)


def _path_of(filename, fd):
    """A path for a filename or an open file descriptor (whose file the
    engine opens again by name with its own flags, O_DIRECT included)."""
    if fd is not None:
        if filename is not None:
            raise TypeError("give filename or fd, not both")
        filename = fd
    if filename is None:
        raise TypeError("a filename (or fd=) is required")
    if isinstance(filename, int) and not isinstance(filename, bool):
        if filename < 0:
            raise ValueError(f"fd {filename} is not an open file descriptor")
        try:
            opened = os.fstat(filename)
            path = os.readlink(f"/proc/self/fd/{filename}")
        except OSError as error:
            raise OSError(error.errno, f"fd {filename} is not an open file descriptor: {error.strerror}") from None
        # The engine opens the file again by name with its own flags; the
        # name must still lead to the same file.
        try:
            named = os.stat(path)
        except OSError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            raise ValueError(f"fd {filename} ({path}) is not a file zinf can reopen by name (deleted, or not "
                             "a regular file): pass the filename instead")
        return path
    return os.fspath(filename)


def _validate(buffer, path, offset):
    nbytes = buffer.numel() * buffer.element_size()
    with open(path, "rb") as file:
        file.seek(offset)
        expected = file.read(nbytes)
    actual = buffer.reshape(-1).view(torch.uint8).numpy().tobytes() if nbytes else b""
    if actual != expected:
        raise RuntimeError(f"validation failed: {nbytes} bytes of {path} at offset {offset} differ from "
                           "what a plain read of the file returns")


# -- the async_io op's module functions --------------------------------------
def _whole_file(write, buffer, filename, block_size, queue_depth, single_submit, overlap_events, validate):
    path = os.fspath(filename)
    if not write:
        size = os.stat(path).st_size
        nbytes = buffer.numel() * buffer.element_size()
        if size != nbytes:
            raise ValueError(f"aio_read: {path} holds {size} bytes, the buffer {nbytes}: they must be equal")
    handle = aio_handle(block_size, queue_depth, single_submit, overlap_events, 1)
    handle._transfer(write, buffer, path, validate, False, 0)
    return 0


def aio_read(buffer, filename, block_size, queue_depth, single_submit, overlap_events, validate):
    """Reads all of `filename` (its size must be the buffer's) into
    `buffer`; returns 0 (raises instead of DeepSpeed's -1)."""
    return _whole_file(False, buffer, filename, block_size, queue_depth, single_submit, overlap_events, validate)


def aio_write(buffer, filename, block_size, queue_depth, single_submit, overlap_events, validate):
    """Writes `buffer` at offset 0 of `filename`; returns 0."""
    return _whole_file(True, buffer, filename, block_size, queue_depth, single_submit, overlap_events, validate)


def deepspeed_memcpy(dest, src):
    """Copies src's bytes into dest (equal sizes); returns 0."""
    for name, tensor in (("dest", dest), ("src", src)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"deepspeed_memcpy: {name} must be a torch.Tensor, not {type(tensor).__name__}")
    dest_bytes, src_bytes = dest.numel() * dest.element_size(), src.numel() * src.element_size()
    if dest_bytes != src_bytes:
        raise ValueError(f"deepspeed_memcpy: dest has {dest_bytes} bytes, src {src_bytes}")
    with torch.no_grad():
        if dest.dtype == src.dtype:
            dest.copy_(src.reshape(dest.shape))
        else:
            staged = src.contiguous().reshape(-1).view(torch.uint8).view(dest.dtype).reshape(dest.shape)
            dest.copy_(staged)
    return 0

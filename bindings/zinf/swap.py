"""TensorSwapper: CPU tensors kept on NVMe under stable keys.

    swapper = zinf.TensorSwapper("/mnt/nvme0")
    swapper.swap_out("layer0.weight", tensor)   # a checksummed copy on NVMe
    swapper.prefetch(["layer0.weight"])         # start reading, return at once
    t = swapper.swap_in("layer0.weight")        # wait for that key only
    swapper.release("layer0.weight")            # drop the host copy
    swapper.commit()                            # make every swap_out durable

Host copies live in page-locked buffers; reads and waits release the GIL.
Shapes and dtypes are kept in the store's manifest, so a reopened directory
knows its tensors.
"""
import json
import os

import torch

from . import _zinf
from ._tensors import cpu_bytes

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                               torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)}


class TensorSwapper:
    def __init__(self, nvme_path, block_size=1 << 20, queue_depth=32, intra_op_parallelism=2, sync=True):
        paths = [os.fspath(p) for p in (nvme_path if isinstance(nvme_path, (list, tuple)) else [nvme_path])]
        self._store = _zinf.SwapStore(paths, block_size, queue_depth, intra_op_parallelism, sync)
        self._reads = {}     # key -> (ticket, PinnedMemory) in flight
        self._resident = {}  # key -> PinnedMemory holding the bytes
        # Writes are synchronous, so one staging buffer per size serves them
        # all: page-locking fresh memory for every swap_out would cost more
        # than the write.
        self._write_staging = {}

    def _meta(self, key):
        text = self._store.attribute("tensor." + key)
        if text is None:
            raise KeyError(f"no tensor '{key}' in the swapper")
        meta = json.loads(text)
        return _DTYPES[meta["dtype"]], tuple(meta["shape"])

    def _staging(self, nbytes):
        return _zinf.PinnedMemory(self._store.padded_size(nbytes))

    def swap_out(self, key, tensor):
        """Stores a copy of `tensor` (CPU; any shape) under `key`, replacing
        what was there; durable after commit()."""
        if key in self._reads:
            self._finish(key)
        _, nbytes = cpu_bytes(tensor, f"tensor '{key}'")
        padded = self._store.padded_size(nbytes)
        staging = self._write_staging.get(padded)
        if staging is None:
            staging = self._write_staging[padded] = _zinf.PinnedMemory(padded)
        if nbytes:
            view = torch.frombuffer(staging, dtype=torch.uint8, count=nbytes)
            view.copy_(tensor.reshape(-1).view(torch.uint8))
        self._store.write(key, staging.address, nbytes, staging.size)
        self._store.set_attribute("tensor." + key, json.dumps({"dtype": str(tensor.dtype),
                                                                "shape": list(tensor.shape)}))
        self._resident.pop(key, None)

    def prefetch(self, keys):
        """Starts reading each key not already on its way or resident."""
        for key in keys:
            if key in self._reads or key in self._resident:
                continue
            dtype, shape = self._meta(key)
            nbytes = self._store.size_of(key)
            staging = self._staging(nbytes)
            self._reads[key] = (self._store.read_async(key, staging.address, staging.size), staging)

    def _finish(self, key):
        ticket, staging = self._reads.pop(key)
        self._store.wait(ticket)
        self._resident[key] = staging

    def swap_in(self, key):
        """The tensor stored under `key` (waiting for its read only), in
        page-locked memory that stays valid until release(key)."""
        if key not in self._resident:
            if key not in self._reads:
                self.prefetch([key])
            self._finish(key)
        dtype, shape = self._meta(key)
        staging = self._resident[key]
        count = 1
        for extent in shape:
            count *= extent
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(staging, dtype=dtype, count=count).view(shape)

    def release(self, key):
        """Drops the host copy (tensors from swap_in keep their memory alive
        until they go)."""
        if key in self._reads:
            self._finish(key)
        self._resident.pop(key, None)

    def commit(self):
        self._store.commit()

    def keys(self):
        return list(self._store.keys())

    def resident(self, key):
        return key in self._resident

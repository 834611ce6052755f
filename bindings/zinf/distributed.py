"""The engine's collectives over a torch.distributed process group.

zinf's C++ engine calls these from its worker thread (the GIL taken for the
call) with memoryviews over its own buffers: host memory on CPU runs, so
Gloo moves the bytes; the same calls work over NCCL for tensors the views
describe on the device. All ranks issue the same calls in the same order,
which is the engine's contract. Gloo in torch 1.13 has no reduce-scatter:
it all-reduces a copy and keeps this rank's block (twice the traffic of a
ring reduce-scatter), and NCCL groups use the real one.
"""
import os

import torch
import torch.distributed as dist


def _bytes(view):
    return torch.frombuffer(view, dtype=torch.uint8)


def _floats(view):
    return torch.frombuffer(view, dtype=torch.float32)


class TorchCollectives:
    """What PythonCommunicator (bindings/python_module.cpp) calls."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def all_gather(self, send, recv, nbytes):
        out = _bytes(recv)
        blocks = list(out.split(nbytes))
        mine = _bytes(send)
        if mine.data_ptr() == blocks[self.rank].data_ptr():
            mine = mine.clone()  # in place: the input is one of the outputs
        dist.all_gather(blocks, mine, group=self.group)

    def reduce_scatter(self, send, recv, count):
        values = _floats(send)
        out = _floats(recv)
        if self.backend == "nccl" and hasattr(dist, "reduce_scatter"):
            dist.reduce_scatter(out, list(values.split(count)), group=self.group)
            return
        total = values.clone()
        dist.all_reduce(total, group=self.group)
        out.copy_(total[self.rank * count:(self.rank + 1) * count])

    def all_reduce(self, data, count, op):
        dist.all_reduce(_floats(data), op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=self.group)

    def broadcast(self, data, nbytes, root):
        dist.broadcast(_bytes(data), src=root, group=self.group)

    def barrier(self):
        dist.barrier(group=self.group)


def init_from_environment(timeout_s=None):
    """Initialises the default process group from torchrun's variables
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when they are set and it
    is not yet initialised: Gloo for CPU training. Returns (rank, world)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ValueError("WORLD_SIZE is %d but RANK, MASTER_ADDR or MASTER_PORT is not set: launch with torchrun, "
                         "or call torch.distributed.init_process_group first" % world)
    import datetime
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", **kwargs)
    return dist.get_rank(), dist.get_world_size()

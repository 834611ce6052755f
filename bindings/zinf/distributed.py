"""The engine's collectives over a torch.distributed process group.

zinf's C++ engine calls these from its worker thread (the GIL taken for the
call) with memoryviews over its own buffers: host memory on CPU runs, so
Gloo moves the bytes; the same calls work over NCCL for tensors the views
describe on the device. All ranks issue the same calls in the same order,
which is the engine's contract. Gloo in torch 1.13 has no reduce-scatter:
it all-reduces a copy and keeps this rank's block (twice the traffic of a
ring reduce-scatter), and NCCL groups use the real one.
"""
import atexit
import os

import torch
import torch.distributed as dist


def _bytes(view):
    return torch.frombuffer(view, dtype=torch.uint8)


def _floats(view):
    return torch.frombuffer(view, dtype=torch.float32)


class TorchCollectives:
    """What PythonCommunicator (bindings/python_module.cpp) calls.

    The collectives run on tensors torch allocated, copied from and to the
    engine's memory: a tensor over a memoryview holds a Python reference,
    and Gloo's worker threads may drop their last reference to it late,
    while the interpreter exits, which aborts the process."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def all_gather(self, send, recv, nbytes):
        out = _bytes(recv)
        mine = _bytes(send).clone()
        gathered = torch.empty(nbytes * self.world_size, dtype=torch.uint8)
        dist.all_gather(list(gathered.split(nbytes)), mine, group=self.group)
        out.copy_(gathered)

    def reduce_scatter(self, send, recv, count):
        total = _floats(send).clone()
        if self.backend == "nccl" and hasattr(dist, "reduce_scatter"):
            mine = torch.empty(count, dtype=torch.float32)
            dist.reduce_scatter(mine, list(total.split(count)), group=self.group)
        else:
            dist.all_reduce(total, group=self.group)
            mine = total[self.rank * count:(self.rank + 1) * count]
        _floats(recv).copy_(mine)

    def all_reduce(self, data, count, op):
        values = _floats(data)
        total = values.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        values.copy_(total)

    def broadcast(self, data, nbytes, root):
        target = _bytes(data)
        values = target.clone()
        dist.broadcast(values, src=root, group=self.group)
        target.copy_(values)

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
    # DeepSpeed scripts never destroy the group they got from initialize;
    # a Gloo group left to the interpreter's teardown can abort the process
    # ("terminate called without an active exception", pytorch#190489):
    # the group zinf made, zinf takes down while the interpreter is whole.
    atexit.register(_destroy_own_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_own_group():
    if dist.is_initialized():
        dist.destroy_process_group()

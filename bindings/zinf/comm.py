"""DeepSpeed's ``deepspeed.comm`` for scripts that use it (``from deepspeed
import comm as dist`` becomes ``from zinf import comm as dist``): the
torch.distributed default group zinf trains over, with DeepSpeed's few
additions. A world of one (no torchrun variables, no group) answers rank 0
of 1 and its collectives are identities, as scripts run without a launcher
expect."""
import os

import torch
import torch.distributed as _dist
from torch.distributed import ReduceOp  # noqa: F401  (DeepSpeed re-exports it)

from .distributed import settle_at_exit
from .engine import init_distributed  # noqa: F401


def is_available():
    return _dist.is_available()


def is_initialized():
    return _dist.is_available() and _dist.is_initialized()


def get_rank(group=None):
    return _dist.get_rank(group) if is_initialized() else 0


def get_world_size(group=None):
    return _dist.get_world_size(group) if is_initialized() else 1


def get_local_rank():
    """LOCAL_RANK as torchrun sets it (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_global_rank(group=None, group_rank=0):
    if not is_initialized():
        return group_rank
    if group is None:
        return group_rank
    public = getattr(_dist, "get_global_rank", None)  # torch >= 2.0; 1.13 has only the private one
    return public(group, group_rank) if public else _dist.distributed_c10d._get_global_rank(group, group_rank)


def barrier(group=None, **kwargs):
    if is_initialized():
        settle_at_exit()
        _dist.barrier(group=group, **kwargs)


class _Finished:
    """What an async_op=True call returns where the work is already done
    (a world of one, or a Gloo stand-in that ran synchronously)."""

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True


def _done(async_op):
    return _Finished() if async_op else None


def _collective(name):
    def call(*args, **kwargs):
        if not is_initialized():
            return _done(kwargs.get("async_op", False))  # one process: the tensors are already the result
        settle_at_exit()
        return getattr(_dist, name)(*args, **kwargs)
    call.__name__ = name
    call.__doc__ = f"torch.distributed.{name} over the default group (nothing to do in a world of one)."
    return call


all_reduce = _collective("all_reduce")
broadcast = _collective("broadcast")
reduce = _collective("reduce")
all_to_all_single = _collective("all_to_all_single")
send = _collective("send")
recv = _collective("recv")
isend = _collective("isend")
irecv = _collective("irecv")
broadcast_object_list = _collective("broadcast_object_list")
inference_all_reduce = all_reduce  # DeepSpeed's fused inference path; here the plain all-reduce


def gather(tensor, gather_list=None, dst=0, group=None, async_op=False):
    if not is_initialized():
        if gather_list:
            gather_list[0].copy_(tensor)
        return _done(async_op)
    settle_at_exit()
    return _dist.gather(tensor, gather_list=gather_list, dst=dst, group=group, async_op=async_op)


def scatter(tensor, scatter_list=None, src=0, group=None, async_op=False):
    if not is_initialized():
        if scatter_list:
            tensor.copy_(scatter_list[0])
        return _done(async_op)
    settle_at_exit()
    return _dist.scatter(tensor, scatter_list=scatter_list, src=src, group=group, async_op=async_op)


def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False):
    """Rank r's input_tensor_list[j] lands in rank j's output_tensor_list[r].
    Gloo has no all-to-all: one scatter from each rank in turn there."""
    if not is_initialized():
        output_tensor_list[0].copy_(input_tensor_list[0])
        return _done(async_op)
    settle_at_exit()
    if _dist.get_backend(group) != "gloo":
        return _dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)
    me = _dist.get_rank(group)
    for r in range(_dist.get_world_size(group)):
        _dist.scatter(output_tensor_list[r], scatter_list=list(input_tensor_list) if r == me else None,
                      src=get_global_rank(group, r), group=group)
    return _done(async_op)


def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False):
    """This rank's block of the reduction of every rank's input_list. Gloo
    has no reduce-scatter: an all-reduce of the stacked list there."""
    if not is_initialized():
        output.copy_(input_list[0])
        return _done(async_op)
    settle_at_exit()
    if _dist.get_backend(group) != "gloo":
        return _dist.reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
    total = torch.stack([t.reshape(output.shape) for t in input_list])
    _dist.all_reduce(total, op=op, group=group)
    output.copy_(total[_dist.get_rank(group)])
    return _done(async_op)


def monitored_barrier(group=None, timeout=None, wait_all_ranks=False):
    """torch's monitored barrier where the backend has one (Gloo), a plain
    barrier elsewhere."""
    if not is_initialized():
        return
    settle_at_exit()
    if _dist.get_backend(group) == "gloo":
        _dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)
    else:
        _dist.barrier(group=group)


def get_world_group():
    return _dist.group.WORLD


def get_all_ranks_from_group(group=None):
    """The global ranks of `group`'s members, in group-rank order."""
    return [get_global_rank(group, r) for r in range(get_world_size(group))]


def has_all_gather_into_tensor():
    return True  # on every backend (above)


def has_reduce_scatter_tensor():
    return True


def has_coalescing_manager():
    return False


def has_all_reduce_coalesced():
    return False


def configure(deepspeed_config=None, enabled=None, prof_all=None, prof_ops=None, verbose=None, debug=None):
    """DeepSpeed's comms-logger settings: zinf has no comms logger, so
    there is nothing to configure (the engine's own timings are
    engine.timings())."""


def log_summary(show_straggler=False):
    """DeepSpeed's comms-logger summary: zinf keeps none; nothing printed."""


def all_gather(tensor_list, tensor, group=None, async_op=False):
    if not is_initialized():
        tensor_list[0].copy_(tensor)
        return _done(async_op)
    settle_at_exit()
    return _dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


def all_gather_into_tensor(output, tensor, group=None, async_op=False):
    """Every rank's `tensor`, concatenated into `output` (Gloo in torch 1.13
    has no flat all-gather: a list of views of `output` takes it)."""
    if not is_initialized():
        output.copy_(tensor.reshape(output.shape))
        return _done(async_op)
    settle_at_exit()
    if _dist.get_backend(group) == "nccl":
        gather = getattr(_dist, "all_gather_into_tensor", None) or _dist._all_gather_base
        return gather(output, tensor, group=group, async_op=async_op)
    return _dist.all_gather(list(output.view(-1).chunk(_dist.get_world_size(group))), tensor.reshape(-1),
                            group=group, async_op=async_op)


def reduce_scatter_tensor(output, tensor, op=ReduceOp.SUM, group=None, async_op=False):
    """Gloo in torch 1.13 has no reduce-scatter: an all-reduce of a copy and
    this rank's block of it (what zinf's engine does too)."""
    if not is_initialized():
        output.copy_(tensor.reshape(output.shape))
        return _done(async_op)
    settle_at_exit()
    if _dist.get_backend(group) == "nccl":
        scatter = getattr(_dist, "reduce_scatter_tensor", None) or _dist._reduce_scatter_base
        return scatter(output, tensor, op=op, group=group, async_op=async_op)
    total = tensor.clone()
    _dist.all_reduce(total, op=op, group=group)
    rank = _dist.get_rank(group)
    output.copy_(total.reshape(-1)[rank * output.numel():(rank + 1) * output.numel()].view(output.shape))
    return _done(async_op)


def new_group(ranks=None, **kwargs):
    return _dist.new_group(ranks=ranks, **kwargs)


def destroy_process_group(group=None):
    if is_initialized():
        _dist.destroy_process_group(group)

"""Checks and conversions between torch tensors and the C++ core."""
import torch

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype, what):
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"{what} is {dtype}: zinf's kernels take float32, bfloat16 or float16") from None


def cpu_bytes(tensor, what):
    """(address, nbytes) of a CPU tensor's memory; clear errors otherwise."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, not {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(
            f"{what} is on {tensor.device}: zinf reads and writes CPU tensors "
            "(copy it with .cpu(), or use a pinned tensor from new_cpu_locked_tensor)")
    if not tensor.is_contiguous():
        raise ValueError(f"{what} is not contiguous: call .contiguous() first")
    return tensor.data_ptr(), tensor.numel() * tensor.element_size()

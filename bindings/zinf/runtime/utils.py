"""``deepspeed.runtime.utils.see_memory_usage``."""
import gc
import logging
import os

import torch.distributed as dist

from ..accelerator import get_accelerator


def _host_memory():
    """(used GiB, percent used) of this machine's memory, from /proc/meminfo
    as psutil's virtual_memory() reads it (total - available)."""
    fields = {}
    with open("/proc/meminfo") as file:
        for line in file:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    total, available = fields["MemTotal"], fields.get("MemAvailable", fields.get("MemFree", 0))
    return (total - available) / 2**30, 100.0 * (total - available) / total


def see_memory_usage(message, force=False):
    """Logs `message` and the accelerator's memory (allocated, its peak,
    reserved, its peak) and the host's, on rank 0, when `force` is True, as
    DeepSpeed's does (to the ``zinf`` logger at INFO, or printed where the
    script set up no logging); then resets the peaks. Returns nothing."""
    if not force:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    gc.collect()  # what Python still holds for no one is not counted
    accelerator = get_accelerator()
    log = logging.getLogger("zinf")
    gib = 2**30
    used, percent = _host_memory()
    lines = [message,
             "MA %.2f GB Max_MA %.2f GB CA %.2f GB Max_CA %.2f GB" % (
                 accelerator.memory_allocated() / gib, accelerator.max_memory_allocated() / gib,
                 accelerator.memory_reserved() / gib, accelerator.max_memory_reserved() / gib),
             "CPU Virtual Memory:  used = %.2f GB, percent = %.1f%% (pid %d)" % (used, percent, os.getpid())]
    for line in lines:
        if log.hasHandlers():
            log.info(line)  # as the script configured logging
        else:
            print(line, flush=True)  # no logging set up: shown, as DeepSpeed's own handler shows it
    accelerator.reset_peak_memory_stats()

"""DeepSpeed's ``deepspeed.utils.logging``: ``logger`` (here the "zinf"
logger) and ``log_dist``."""
import logging

import torch.distributed as _dist

logger = logging.getLogger("zinf")


def log_dist(message, ranks=None, level=logging.INFO):
    """Logs `message` as "[Rank r] message" on the ranks listed (-1 first:
    every rank), as DeepSpeed's does: with torch.distributed initialised and
    no ranks given, nothing; in one process without a group, always."""
    initialized = _dist.is_available() and _dist.is_initialized()
    rank = _dist.get_rank() if initialized else -1
    ranks = list(ranks or [])
    if initialized and not (ranks and (ranks[0] == -1 or rank in ranks)):
        return
    text = f"[Rank {rank}] {message}"
    if logger.hasHandlers():
        logger.log(level, text)  # as the script configured logging
    elif level >= logging.INFO:
        print(text, flush=True)  # no logging set up: shown, as DeepSpeed's own handler shows it

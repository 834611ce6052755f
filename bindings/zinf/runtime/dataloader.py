"""``deepspeed.runtime.dataloader``: RepeatingLoader, where scripts import it from."""
from ..utils import RepeatingLoader  # noqa: F401

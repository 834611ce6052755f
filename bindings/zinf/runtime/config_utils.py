"""``deepspeed.runtime.config_utils``: the config error class."""
from ..errors import DeepSpeedConfigError  # noqa: F401

__all__ = ["DeepSpeedConfigError"]

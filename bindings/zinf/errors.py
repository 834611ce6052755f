"""The error a bad config raises, by DeepSpeed's name.

``DeepSpeedConfigError`` is a ValueError, so code catching either works;
its message names the key path (``zero_optimization.offload_param.
nvme_path: ...``). Also ``zinf.DeepSpeedConfigError`` and
``zinf.runtime.config_utils.DeepSpeedConfigError``, as in DeepSpeed."""


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON config zinf refuses: the message names the key."""


__all__ = ["DeepSpeedConfigError"]

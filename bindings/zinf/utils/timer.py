"""DeepSpeed's ``deepspeed.utils.timer.ThroughputTimer``: samples per
second over training steps, as ``engine.tput_timer`` (scripts print
``engine.tput_timer.avg_samples_per_sec()``).

The engine starts it in ``forward`` and stops it in ``step``; the steps
before ``start_step`` (2) are left out of the average (warm-up: the first
steps build buffers and, at stage 3, record the prefetch order). The config
is DeepSpeed's ``"timers": {"throughput": {"enabled": true, "synchronized":
true}}``; ``synchronized`` waits for the accelerator before reading the
clock."""
import time
from types import SimpleNamespace

from ..errors import DeepSpeedConfigError


def throughput_config(settings):
    """The ``timers.throughput`` block of a config dict as an object with
    ``enabled`` and ``synchronized`` (both default true); a value of the
    wrong type is a DeepSpeedConfigError naming its key."""
    timers = settings.get("timers", {})
    if not isinstance(timers, dict):
        raise DeepSpeedConfigError(f"timers: expected an object, got {timers!r}")
    throughput = timers.get("throughput", {})
    if not isinstance(throughput, dict):
        raise DeepSpeedConfigError(f"timers.throughput: expected an object, got {throughput!r}")
    values = {}
    for key in ("enabled", "synchronized"):
        value = throughput.get(key, True)
        if not isinstance(value, bool):
            raise DeepSpeedConfigError(f"timers.throughput.{key}: expected true or false, got {value!r}")
        values[key] = value
    return SimpleNamespace(**values)


class ThroughputTimer:
    """Counts micro-steps and global steps between start() and stop() and
    sums the time from global step ``start_step`` on; the same attributes
    and rules as DeepSpeed's (``batch_size`` is the global batch,
    ``train_batch_size()``)."""

    def __init__(self, config, batch_size, start_step=2, steps_per_output=None, monitor_memory=False,
                 logging_fn=None):
        self.config = config
        self.batch_size = 1 if batch_size is None else batch_size
        self.start_step = start_step
        self.steps_per_output = steps_per_output
        self.monitor_memory = monitor_memory
        if logging_fn is None:
            from .logging import logger
            logging_fn = logger.info
        self.logging = logging_fn
        self.start_time = 0
        self.end_time = 0
        self.started = False
        self.initialized = False
        self.epoch_count = 0
        self.micro_step_count = 0
        self.global_step_count = 0
        self.total_elapsed_time = 0
        self.step_elapsed_time = 0

    def update_epoch_count(self):
        self.epoch_count += 1
        self.micro_step_count = 0

    def _synchronize(self):
        if self.config.synchronized:
            from ..accelerator import get_accelerator
            get_accelerator().synchronize()

    def start(self):
        if not self.config.enabled:
            return
        self.initialized = True
        self.started = True
        # Before start_step the clock is not read: those steps count, their
        # time does not.
        if self.global_step_count >= self.start_step:
            self._synchronize()
            self.start_time = time.time()

    def stop(self, global_step=False, report_speed=True):
        if not self.config.enabled or not self.started:
            return
        self.started = False
        self.micro_step_count += 1
        if global_step:
            self.global_step_count += 1
        if self.start_time <= 0:
            return
        self._synchronize()
        self.end_time = time.time()
        duration = self.end_time - self.start_time
        self.total_elapsed_time += duration
        self.step_elapsed_time += duration
        if not global_step:
            return
        if report_speed and self.steps_per_output and self.global_step_count % self.steps_per_output == 0:
            self.logging(f"epoch={self.epoch_count}/micro_step={self.micro_step_count}/"
                         f"global_step={self.global_step_count}, RunningAvgSamplesPerSec={self.avg_samples_per_sec()}, "
                         f"CurrSamplesPerSec={self.batch_size / max(self.step_elapsed_time, 1e-12)}")
        self.step_elapsed_time = 0

    def avg_samples_per_sec(self):
        """Global batches per second x batch_size over the timed steps (from
        start_step on); -inf before any was timed (DeepSpeed divides by zero
        at start_step itself)."""
        timed_steps = self.global_step_count - self.start_step
        if timed_steps > 0 and self.total_elapsed_time > 0:
            return self.batch_size / (self.total_elapsed_time / timed_steps)
        return float("-inf")

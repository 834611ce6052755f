"""Learning-rate schedules configured like DeepSpeed's: WarmupLR, WarmupDecayLR, WarmupCosineLR, LRRangeTest and
OneCycle (and, as DeepSpeed, torch.optim.lr_scheduler's by name).

The values, parameter names, defaults and edge cases follow DeepSpeed's ``deepspeed/runtime/lr_schedules.py``
(v0.19.5), so a DeepSpeed JSON block ``"scheduler": {"type": "WarmupLR", "params": {...}}`` gives the same learning
rate at every step. ``from_config(block, optimizer_or_base_lrs)`` builds one from such a block.

zinf steps its own C++ optimizer, so a schedule does not need a torch optimizer: it takes either ``base_lrs`` (one
float per parameter group) or any object with ``param_groups`` (a list of dicts holding "lr"). In the second case
the constructor and every ``step()`` also write the new rate into each group's "lr", as DeepSpeed does, so a torch
optimizer works too. The step counter is ``last_batch_iteration``: it starts at -1 ("not started") and ``step()``
without an argument adds one, so the first ``step()`` gives the rate of step 0.

Errors are ValueError naming the config key (``scheduler.params.<key>``); a value left as "auto" (Hugging Face's
placeholder) must be resolved by the caller first.
"""
import inspect
import math
import numbers
import warnings

# DeepSpeed's names for the schedule types and their ``params`` keys, which
# scripts and DeepSpeed's tests build config blocks from.
LR_SCHEDULE = "lr_schedule"
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]
LR_RANGE_TEST_MIN_LR = "lr_range_test_min_lr"
LR_RANGE_TEST_STEP_RATE = "lr_range_test_step_rate"
LR_RANGE_TEST_STEP_SIZE = "lr_range_test_step_size"
LR_RANGE_TEST_STAIRCASE = "lr_range_test_staircase"
EDGE_VALUE = "edge_value"
MID_VALUE = "mid_value"
CYCLE_FIRST_STEP_SIZE = "cycle_first_step_size"
CYCLE_FIRST_STAIR_COUNT = "cycle_first_stair_count"
CYCLE_SECOND_STEP_SIZE = "cycle_second_step_size"
CYCLE_SECOND_STAIR_COUNT = "cycle_second_stair_count"
DECAY_STEP_SIZE = "decay_step_size"
CYCLE_MIN_LR = "cycle_min_lr"
CYCLE_MAX_LR = "cycle_max_lr"
DECAY_LR_RATE = "decay_lr_rate"
CYCLE_MIN_MOM = "cycle_min_mom"
CYCLE_MAX_MOM = "cycle_max_mom"
DECAY_MOM_RATE = "decay_mom_rate"
WARMUP_MIN_LR = "warmup_min_lr"
WARMUP_MAX_LR = "warmup_max_lr"
WARMUP_NUM_STEPS = "warmup_num_steps"
WARMUP_TYPE = "warmup_type"
WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"
WARMUP_MIN_RATIO = "warmup_min_ratio"
COS_MIN_RATIO = "cos_min_ratio"
TOTAL_NUM_STEPS = "total_num_steps"
_KEY_NAMES = [name for name in list(globals()) if name.isupper()]

__all__ = ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "LRRangeTest", "OneCycle", "SCHEDULERS",
           "from_config"] + _KEY_NAMES


def _path(name):
    return f"scheduler.params.{name}"


def _resolved(value, name):
    if isinstance(value, str) and value == "auto":
        raise ValueError(f'{_path(name)} is "auto": the caller must resolve it to a value before building the '
                         "scheduler (Hugging Face's Trainer does this from its own arguments)")
    return value


def _number(value, name):
    _resolved(value, name)
    # bool is an int in Python, but true/false in a config is a mistake, not a rate.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{_path(name)} must be a number, got {value!r}")
    return value


def _integer(value, name):
    _resolved(value, name)
    # numbers.Integral also takes numpy's integers, which a loaded checkpoint may hold.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{_path(name)} must be an integer, got {value!r}")
    return int(value)


def _per_group(value, count, name):
    """A scalar applies to every param group; a list or tuple gives one value per group (DeepSpeed's rule)."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{_path(name)} has {len(value)} values but there are {count} param groups")
        return [_number(v, name) for v in value]
    return [_number(value, name)] * count


class _Schedule:
    """What every schedule shares: the param groups (or base rates), the iteration counter, stepping, the saved
    state."""

    def __init__(self, optimizer_or_base_lrs, last_batch_iteration):
        groups = getattr(optimizer_or_base_lrs, "param_groups", None)
        self.optimizer = optimizer_or_base_lrs if groups is not None else None
        try:
            lrs = [group["lr"] for group in groups] if groups is not None else list(optimizer_or_base_lrs)
            # float() also takes a one-element tensor, which a torch optimizer may hold as its lr.
            self.base_lrs = [float(lr) for lr in lrs]
        except (TypeError, ValueError, KeyError):
            raise ValueError("optimizer_or_base_lrs: expected a list of numbers (one per param group) or an object "
                             f"with param_groups holding \"lr\", got {optimizer_or_base_lrs!r}") from None
        self.last_batch_iteration = _integer(last_batch_iteration, "last_batch_iteration")
        self._last_lr = None

    def _start(self, last_batch_iteration):
        # A fresh schedule (-1) sets the groups to its "not started" rate at once; one built with a later
        # iteration (resuming) leaves them alone until the next step(), as DeepSpeed does.
        if last_batch_iteration == -1:
            self._last_lr = self._write(self.get_lr())

    def _write(self, lrs):
        if self.optimizer is not None:
            for group, lr in zip(self.optimizer.param_groups, lrs):
                if hasattr(group["lr"], "fill_"):
                    group["lr"].fill_(lr)  # a tensor lr is updated in place, as DeepSpeed does, not replaced
                else:
                    group["lr"] = lr
        return list(lrs)

    def get_lr(self):
        raise NotImplementedError

    def step(self, last_batch_iteration=None):
        """Move to ``last_batch_iteration`` (the next one when None) and apply that iteration's rates."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = _integer(last_batch_iteration, "last_batch_iteration")
        self._last_lr = self._write(self.get_lr())

    def get_last_lr(self):
        """The rates the last step() (or the constructor) applied, one per param group."""
        if self._last_lr is None:
            raise RuntimeError("get_last_lr(): no rate applied yet, call step() first")
        return list(self._last_lr)

    def state_dict(self):
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd):
        # Like DeepSpeed, only the counter is restored: get_lr() gives the rate there, the next step() applies
        # the one after it.
        self.last_batch_iteration = _integer(sd["last_batch_iteration"], "last_batch_iteration")


class _WarmupSchedule(_Schedule):
    """What the three warmup schedules share: the warmup curve."""

    def __init__(self, optimizer_or_base_lrs, warmup_num_steps, warmup_type, last_batch_iteration):
        # DeepSpeed refuses a non-positive or non-integer warmup before anything else.
        warmup_num_steps = _integer(warmup_num_steps, "warmup_num_steps")
        if warmup_num_steps <= 0:
            raise ValueError(f"{_path('warmup_num_steps')} must be positive, got {warmup_num_steps}")
        super().__init__(optimizer_or_base_lrs, last_batch_iteration)
        # log(1) would be 0 in the log curve's denominator, so DeepSpeed warms up over at least 2 steps.
        self.warmup_num_steps = max(2, warmup_num_steps)
        _resolved(warmup_type, "warmup_type")
        if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
            # DeepSpeed accepts an unknown curve with a warning and uses "log"; refusing would break its configs.
            warnings.warn(f"{_path('warmup_type')}: unknown value {warmup_type!r}, using {WARMUP_LOG_RATE!r}",
                          stacklevel=3)
            warmup_type = WARMUP_LOG_RATE
        self.warmup_type = warmup_type
        # DeepSpeed multiplies by the reciprocal rather than dividing; doing the same keeps the last bit equal.
        self._inverse_log_warmup = 1.0 / math.log(self.warmup_num_steps)

    def _warmup_fraction(self):
        """Where the warmup curve is, from 0 at iteration 0 towards 1 at warmup_num_steps."""
        if self.warmup_type == WARMUP_LOG_RATE:
            return self._inverse_log_warmup * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps


class WarmupLR(_WarmupSchedule):
    """Warm each group's rate up from warmup_min_lr to warmup_max_lr over warmup_num_steps, then hold it.

    lr = min + (max - min) * f, where f = log(i + 1) / log(n) ("log") or i / n ("linear") for iteration i < n,
    and f = 1 from i = n on; n = max(2, warmup_num_steps). Before the first step (i = -1) lr = min.
    warmup_min_lr and warmup_max_lr are a number or one per group; warmup_max_lr None (DeepSpeed's default for
    this class) takes each group's own rate from ``optimizer_or_base_lrs``.
    """

    def __init__(self, optimizer_or_base_lrs, warmup_min_lr=0.0, warmup_max_lr=None, warmup_num_steps=1000,
                 warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        super().__init__(optimizer_or_base_lrs, warmup_num_steps, warmup_type, last_batch_iteration)
        count = len(self.base_lrs)
        self.min_lrs = _per_group(warmup_min_lr, count, "warmup_min_lr")
        self.max_lrs = self.base_lrs if warmup_max_lr is None else _per_group(warmup_max_lr, count, "warmup_max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        self._start(last_batch_iteration)

    def _gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction()
        return 1.0

    def get_lr(self):
        """The rates at the current iteration, one per param group."""
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [small + delta * gamma for small, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR's warmup, then a straight line from warmup_max_lr at iteration n down to warmup_min_lr at
    total_num_steps, held there after it.

    After warmup f = max(0, (total - i) / max(1, total - n)). Unlike WarmupLR, warmup_max_lr defaults to 0.001.
    """

    def __init__(self, optimizer_or_base_lrs, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001,
                 warmup_num_steps=1000, warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        self.total_num_steps = _number(total_num_steps, "total_num_steps")
        super().__init__(optimizer_or_base_lrs, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            # DeepSpeed only warns: every step after warmup is then at warmup_min_lr.
            warnings.warn(f"{_path('total_num_steps')} ({total_num_steps}) is less than "
                          f"{_path('warmup_num_steps')} ({self.warmup_num_steps})", stacklevel=2)

    def _gamma(self):
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_fraction()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration)
                   / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_WarmupSchedule):
    """Scale each group's own rate (from ``optimizer_or_base_lrs``) by a ratio that warms up from warmup_min_ratio
    to 1 over warmup_num_steps, then follows half a cosine down to cos_min_ratio at total_num_steps - 1.

    Warmup (i < n): ratio = wmin + (1 - wmin) * f, f as in WarmupLR. After it: p = min(1, (i - n + 1) /
    max(1, total - n)), ratio = max(0, cmin + (1 - cmin) * (1 + cos(pi * p)) / 2). Before the first step lr = 0.
    """

    def __init__(self, optimizer_or_base_lrs, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type=WARMUP_LOG_RATE, last_batch_iteration=-1):
        self.total_num_steps = _number(total_num_steps, "total_num_steps")
        self.warmup_min_ratio = _number(warmup_min_ratio, "warmup_min_ratio")
        self.cos_min_ratio = _number(cos_min_ratio, "cos_min_ratio")
        # The groups' rates are read here, before _start() overwrites them with the ratio-scaled ones.
        super().__init__(optimizer_or_base_lrs, warmup_num_steps, warmup_type, last_batch_iteration)
        if self.total_num_steps < self.warmup_num_steps:
            # DeepSpeed only warns: every step after warmup is then at cos_min_ratio.
            warnings.warn(f"{_path('total_num_steps')} ({total_num_steps}) is less than "
                          f"{_path('warmup_num_steps')} ({self.warmup_num_steps})", stacklevel=2)
        self._start(last_batch_iteration)

    def get_lr_ratio(self):
        """The factor applied to every group's own rate at the current iteration."""
        if self.last_batch_iteration < 0:
            return 0.0
        if self.last_batch_iteration < self.warmup_num_steps:
            return self.warmup_min_ratio + self._warmup_fraction() * (1.0 - self.warmup_min_ratio)
        done = self.last_batch_iteration - self.warmup_num_steps + 1
        # Clamped, so the rate stays at the floor past total_num_steps instead of rising again along the cosine.
        progress = min(1.0, done / max(1, self.total_num_steps - self.warmup_num_steps))
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ((1 + math.cos(math.pi * progress)) / 2))

    def get_lr(self):
        """The rates at the current iteration, one per param group."""
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.base_lrs]
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.base_lrs]


class LRRangeTest(_Schedule):
    """The learning-rate range test: each group's rate grows from lr_range_test_min_lr by
    lr_range_test_step_rate every lr_range_test_step_size iterations, continuously or (staircase) in steps.

    lr = min * (1 + rate * x), x = (i + 1) / size, floored with staircase. Before the first step lr = min.
    """

    def __init__(self, optimizer_or_base_lrs, lr_range_test_min_lr=1e-3, lr_range_test_step_size=2000,
                 lr_range_test_step_rate=1.0, lr_range_test_staircase=False, last_batch_iteration=-1):
        super().__init__(optimizer_or_base_lrs, last_batch_iteration)
        self.min_lrs = _per_group(lr_range_test_min_lr, len(self.base_lrs), "lr_range_test_min_lr")
        self.step_size = _number(lr_range_test_step_size, "lr_range_test_step_size")
        if self.step_size <= 0:
            raise ValueError(f"{_path('lr_range_test_step_size')} must be positive, got {lr_range_test_step_size}")
        self.step_rate = _number(lr_range_test_step_rate, "lr_range_test_step_rate")
        self.staircase = bool(_resolved(lr_range_test_staircase, "lr_range_test_staircase"))
        if last_batch_iteration == -1:
            self._last_lr = self._write(list(self.min_lrs))

    def get_lr(self):
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lr * (1 + self.step_rate * interval) for lr in self.min_lrs]


class OneCycle(_Schedule):
    """The 1-cycle policy: the rate climbs from cycle_min_lr to cycle_max_lr over cycle_first_step_size
    iterations and comes back down over cycle_second_step_size (default: the same), while beta1 moves the other
    way between cycle_max_mom and cycle_min_mom; after the cycle, with decay_step_size and decay_lr_rate set,
    lr = cycle_min_lr / (1 + decay_lr_rate * k / decay_step_size) and beta1 = cycle_max_mom * (1 +
    decay_mom_rate * k / decay_step_size), k iterations past the cycle (held at cycle_min_lr and cycle_max_mom
    otherwise).

    As DeepSpeed's, the momentum is written as betas = (beta1, 0.99): the schedule sets beta2 to 0.99 too. It
    cycles only where every param group has betas (Adam, AdamW, Lion), and warns and leaves them otherwise
    (Adagrad). cycle_first_stair_count and cycle_second_stair_count are accepted and, as in DeepSpeed, unused.
    """

    def __init__(self, optimizer_or_base_lrs, cycle_min_lr, cycle_max_lr, decay_lr_rate=0.0,
                 cycle_first_step_size=2000, cycle_second_step_size=None, cycle_first_stair_count=0,
                 cycle_second_stair_count=None, decay_step_size=0, cycle_momentum=True, cycle_min_mom=0.8,
                 cycle_max_mom=0.9, decay_mom_rate=0.0, last_batch_iteration=-1):
        super().__init__(optimizer_or_base_lrs, last_batch_iteration)
        count = len(self.base_lrs)
        first = float(_number(cycle_first_step_size, "cycle_first_step_size"))
        second = first if cycle_second_step_size is None else \
            float(_number(cycle_second_step_size, "cycle_second_step_size"))
        if first <= 0 or second <= 0:
            raise ValueError(f"{_path('cycle_first_step_size')} and cycle_second_step_size must be positive")
        self.total_size = first + second
        self.step_ratio = first / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None else \
            cycle_second_stair_count
        self.decay_step_size = _number(decay_step_size, "decay_step_size")
        self.min_lrs = _per_group(cycle_min_lr, count, "cycle_min_lr")
        self.max_lrs = _per_group(cycle_max_lr, count, "cycle_max_lr")
        self.decay_lr_rate = _number(decay_lr_rate, "decay_lr_rate")
        self.skip_lr_decay = math.isclose(self.decay_step_size, 0) or math.isclose(self.decay_lr_rate, 0)
        self.cycle_momentum = bool(_resolved(cycle_momentum, "cycle_momentum"))
        if self.cycle_momentum and (self.optimizer is None or
                                    any("betas" not in group for group in self.optimizer.param_groups)):
            warnings.warn("scheduler.params.cycle_momentum: the optimizer has no betas (momentum) to cycle; "
                          "cycling the learning rate only", stacklevel=2)
            self.cycle_momentum = False
        self.min_moms = [(_number(cycle_min_mom, "cycle_min_mom"), 0.99)] * count
        self.max_moms = [(_number(cycle_max_mom, "cycle_max_mom"), 0.99)] * count
        self.decay_mom_rate = _number(decay_mom_rate, "decay_mom_rate")
        self.skip_mom_decay = math.isclose(self.decay_step_size, 0) or math.isclose(self.decay_mom_rate, 0)
        if last_batch_iteration == -1:
            self._last_lr = self._write(list(self.min_lrs))
            if self.cycle_momentum:
                self._write_betas(self.min_moms)

    def _scale_factor(self):
        iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + iteration / self.total_size)
        x = 1.0 + iteration / self.total_size - cycle
        return x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)

    def get_lr(self):
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [small + (big - small) * scale for small, big in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1 + self.decay_lr_rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [small / factor for small in self.min_lrs]

    def get_mom(self):
        """Each group's (beta1, beta2) at the current iteration, or None when momentum is not cycled."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [(big[0] - (big[0] - small[0]) * scale, small[1]) for small, big in zip(self.min_moms,
                                                                                           self.max_moms)]
        if self.skip_mom_decay:
            return list(self.max_moms)
        factor = 1 + self.decay_mom_rate * (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size
        return [(beta1 * factor, beta2) for beta1, beta2 in self.max_moms]

    def _write_betas(self, betas):
        for group, value in zip(self.optimizer.param_groups, betas):
            group["betas"] = value

    def step(self, last_batch_iteration=None):
        super().step(last_batch_iteration)
        if self.cycle_momentum:
            self._write_betas(self.get_mom())


# The "type" names DeepSpeed accepts for these schedules (case-sensitive, as DeepSpeed looks them up by name).
SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR,
              "LRRangeTest": LRRangeTest, "OneCycle": OneCycle}


def _torch_scheduler(name):
    """torch.optim.lr_scheduler's class of that name, or None."""
    import torch.optim.lr_scheduler as torch_schedulers
    found = getattr(torch_schedulers, name, None)
    base = getattr(torch_schedulers, "LRScheduler", None) or torch_schedulers._LRScheduler
    ok = isinstance(found, type) and (issubclass(found, base) or found is torch_schedulers.ReduceLROnPlateau)
    return found if ok and not name.startswith("_") else None


def from_config(scheduler_block, optimizer_or_base_lrs):
    """Build the schedule a DeepSpeed ``"scheduler": {"type": ..., "params": {...}}`` block names.

    None (no block) gives None, as DeepSpeed then runs without a schedule.
    """
    if scheduler_block is None:
        return None
    if not isinstance(scheduler_block, dict):
        raise ValueError(f"scheduler: expected an object with \"type\" and \"params\", got {scheduler_block!r}")
    for key in scheduler_block:
        if key not in ("type", "params"):
            raise ValueError(f"scheduler.{key}: unknown key (expected \"type\" and \"params\")")
    kind = scheduler_block.get("type")
    if kind is None:
        raise ValueError(f"scheduler.type is required; supported: {', '.join(SCHEDULERS)}")
    params = scheduler_block.get("params")
    params = {} if params is None else params
    if not isinstance(params, dict):
        raise ValueError(f"scheduler.params: expected an object, got {params!r}")
    if isinstance(kind, str) and kind not in SCHEDULERS and _torch_scheduler(kind) is not None:
        # As DeepSpeed: a name from torch.optim.lr_scheduler, built on the optimizer with the params.
        if getattr(optimizer_or_base_lrs, "param_groups", None) is None:
            raise ValueError(f"scheduler.type: {kind} is torch's and needs an optimizer, not base rates")
        try:
            return _torch_scheduler(kind)(optimizer_or_base_lrs, **params)
        except TypeError as error:
            raise ValueError(f"scheduler.params: {kind} refused them: {error}") from None
    if not isinstance(kind, str) or kind not in SCHEDULERS:
        raise ValueError(f"scheduler.type: unsupported {kind!r}; supported: {', '.join(SCHEDULERS)} and the "
                         "schedulers of torch.optim.lr_scheduler by name")
    cls = SCHEDULERS[kind]
    # The config keys are the constructor's keyword arguments, as in DeepSpeed (which passes **params).
    accepted = list(inspect.signature(cls).parameters.values())[1:]
    names = [p.name for p in accepted]
    for key in params:
        if key not in names:
            raise ValueError(f"{_path(key)}: unknown key for {kind}; accepted: {', '.join(names)}")
    for p in accepted:
        if p.default is inspect.Parameter.empty and p.name not in params:
            raise ValueError(f"{_path(p.name)} is required for {kind}")
    # The constructors check every value ("auto" included), naming its key.
    return cls(optimizer_or_base_lrs, **params)

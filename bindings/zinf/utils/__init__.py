"""DeepSpeed's ``deepspeed.utils`` helpers that scripts reach for:
``zinf.utils.zero_to_fp32`` puts a checkpoint's fp32 weights back together,
and the ``safe_get_*`` / ``safe_set_*`` functions read and write one
parameter's fp32 master, optimizer state or gradient wherever the engine
keeps its shards (host memory or NVMe), as DeepSpeed's do for debugging,
inspection and surgery between micro-steps.

``full`` forms take or give the whole parameter, shaped as it; they are
collective when the engine runs on several ranks: every rank calls them for
the same parameter, in the same order, and a setter the same value (each
rank keeps its shard of it, as DeepSpeed's setters do).
``local`` forms take or give this rank's shard, 1-D (DeepSpeed's
``ds_tensor``: zeros past the parameter's end), at ZeRO stage 3 only, as in
DeepSpeed; the local setter of a master is collective (the working copies
are gathered again). A parameter no zinf engine trains gives None, as in
DeepSpeed; so does a frozen one (no master, no state, no gradient). The
gradient is the one the next optimizer step takes before clipping (averaged
over ranks, divided by gradient_accumulation_steps, fp16's loss scale taken
out), None before any backward since the last step.

``logger`` (the "zinf" logger) and ``log_dist(message, ranks)`` are
DeepSpeed's ``deepspeed.utils.logger`` and ``log_dist`` (also in
``zinf.utils.logging``, DeepSpeed's ``deepspeed.utils.logging``);
``RepeatingLoader`` is DeepSpeed's; ``set_z3_leaf_modules`` and its
companions (``zinf.utils.z3_leaf_module``) make a module one stage-3 unit."""
from . import zero_to_fp32
from .logging import log_dist, logger
from .z3_leaf_module import (get_z3_leaf_modules, set_z3_leaf_module, set_z3_leaf_modules,  # noqa: F401
                             unset_z3_leaf_modules, z3_leaf_module, z3_leaf_parameter)
from .. import zero as _zero



class RepeatingLoader:
    """DeepSpeed's deepspeed.utils.RepeatingLoader: iterates `loader`
    forever, starting it again each time it runs out (a training loop
    counted in steps, not epochs)."""

    def __init__(self, loader):
        self.loader = loader
        self.data_iter = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


def _trained_by(param):
    engine = _zero.engine_of(param)
    if engine is None or not param.requires_grad:
        return None
    return engine


def _get(param, what, local):
    engine = _trained_by(param)
    if engine is None or (what == "grad" and not engine._has_gradients):
        return None
    return engine._local_values(param, what) if local else engine._full_values(param, what)


def _set(param, value, what, local):
    engine = _trained_by(param)
    if engine is None:
        return
    if local:
        engine._set_local_values(param, what, value)
    else:
        engine._set_full_values(param, what, value)
    if what == "grad":
        engine._has_gradients = True


def safe_get_full_fp32_param(param):
    return _get(param, "param", local=False)


def safe_set_full_fp32_param(param, value):
    _set(param, value, "param", local=False)


def safe_get_full_optimizer_state(param, optim_state_key):
    """optim_state_key: "exp_avg", "exp_avg_sq" (Adam, AdamW), ...: the
    optimizer's own names; another is a ValueError naming them."""
    return _get(param, str(optim_state_key), local=False)


def safe_set_full_optimizer_state(param, value, optim_state_key):
    _set(param, value, str(optim_state_key), local=False)


def safe_get_full_grad(param):
    return _get(param, "grad", local=False)


def safe_set_full_grad(param, value):
    _set(param, value, "grad", local=False)


def safe_get_local_fp32_param(param):
    return _get(param, "param", local=True)


def safe_set_local_fp32_param(param, value):
    _set(param, value, "param", local=True)


def safe_get_local_optimizer_state(param, optim_state_key):
    return _get(param, str(optim_state_key), local=True)


def safe_set_local_optimizer_state(param, value, optim_state_key):
    _set(param, value, str(optim_state_key), local=True)


def safe_get_local_grad(param):
    return _get(param, "grad", local=True)


def safe_set_local_grad(param, value):
    _set(param, value, "grad", local=True)


__all__ = ["logger", "log_dist", "RepeatingLoader", "zero_to_fp32", "safe_get_full_fp32_param", "safe_get_full_grad", "safe_get_full_optimizer_state",
           "safe_set_full_fp32_param", "safe_set_full_grad", "safe_set_full_optimizer_state",
           "safe_get_local_fp32_param", "safe_get_local_grad", "safe_get_local_optimizer_state",
           "safe_set_local_fp32_param", "safe_set_local_grad", "safe_set_local_optimizer_state",
           "z3_leaf_module", "z3_leaf_parameter", "get_z3_leaf_modules", "set_z3_leaf_module", "set_z3_leaf_modules",
           "unset_z3_leaf_modules"]

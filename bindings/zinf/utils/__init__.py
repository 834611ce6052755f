"""DeepSpeed's ``deepspeed.utils`` helpers that scripts reach for:
``zinf.utils.zero_to_fp32`` puts a checkpoint's fp32 weights back together,
and the ``safe_get_full_*`` / ``safe_set_full_*`` functions read and write one
parameter's whole fp32 master, optimizer state or gradient wherever the
engine keeps its shards (host memory or NVMe), as DeepSpeed's do for
debugging, inspection and surgery between steps.

Each is collective when the engine runs on several ranks: every rank calls it
for the same parameter, in the same order (a setter writes rank 0's value).
A parameter no zinf engine trains gives None, as in DeepSpeed; so does a
frozen one (no master, no state, no gradient)."""
from . import zero_to_fp32
from .. import zero as _zero


def _trained_by(param):
    engine = _zero.engine_of(param)
    if engine is None or not param.requires_grad:
        return None
    return engine


def safe_get_full_fp32_param(param):
    """The whole fp32 master weights of `param`, shaped as it, on the model's device."""
    engine = _trained_by(param)
    return None if engine is None else engine._full_values(param, "param")


def safe_set_full_fp32_param(param, value):
    """Replaces `param`'s fp32 master weights (and its working copy) with
    `value`; the optimizer's moments stay."""
    engine = _trained_by(param)
    if engine is not None:
        engine._set_full_values(param, "param", value)


def safe_get_full_optimizer_state(param, optim_state_key):
    """One optimizer state of `param` ("exp_avg", "exp_avg_sq"), whole, in fp32."""
    engine = _trained_by(param)
    return None if engine is None else engine._full_values(param, str(optim_state_key))


def safe_set_full_optimizer_state(param, value, optim_state_key):
    engine = _trained_by(param)
    if engine is not None:
        engine._set_full_values(param, str(optim_state_key), value)


def safe_get_full_grad(param):
    """The whole fp32 gradient of `param` accumulated since the last optimizer
    step, as the step takes it before clipping: averaged over ranks, divided
    by gradient_accumulation_steps (unless the backward was told not to) and
    with fp16's loss scale taken out. None before any backward since that
    step."""
    engine = _trained_by(param)
    if engine is None or not engine._has_gradients:
        return None
    return engine._full_values(param, "grad")


__all__ = ["zero_to_fp32", "safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_optimizer_state",
           "safe_set_full_optimizer_state", "safe_get_full_grad"]

"""DeepSpeed's activation checkpointing API (``deepspeed.checkpointing``)
for scripts that call it (Megatron- and GPT-NeoX-style models):
``checkpoint(function, *args)`` keeps a block's inputs instead of its
activations and runs the block again in backward, with the random state
(torch's, the accelerator's and the tracker's) of the first run, so dropout
masks are the same; ``configure`` reads the "activation_checkpointing"
block of a DeepSpeed config or its arguments.

What the settings do here:
- ``cpu_checkpointing`` / ``checkpoint_in_cpu``: the kept inputs of a block
  on the GPU wait in host memory until backward (no effect on CPU tensors).
- ``synchronize_checkpoint_boundary``: the accelerator is synchronised at
  the start and end of each checkpointed forward and backward.
- ``profile``: each checkpointed forward and backward is timed and logged
  on rank 0 (``zinf.utils.log_dist``).
- ``partition_activations`` and ``contiguous_memory_optimization`` split
  the kept inputs over model-parallel ranks in DeepSpeed; zinf has no model
  parallelism, so with no mpu (or a model-parallel world of one) there is
  nothing to split, as in DeepSpeed, and a larger model-parallel world is
  refused naming the setting.
"""
import contextlib
import copy
import json
import time

import torch

from .accelerator import get_accelerator

_MODEL_PARALLEL_RNG = "model-parallel-rng"
_DEFAULTS = dict(partition_activations=False, contiguous_checkpointing=False, num_checkpoints=None,
                 checkpoint_in_cpu=False, synchronize=False, profile=False)
# The config block's keys and the settings they give (DeepSpeed's names).
_CONFIG_KEYS = {"partition_activations": "partition_activations",
                "contiguous_memory_optimization": "contiguous_checkpointing",
                "number_checkpoints": "num_checkpoints", "cpu_checkpointing": "checkpoint_in_cpu",
                "synchronize_checkpoint_boundary": "synchronize", "profile": "profile"}

_settings = dict(_DEFAULTS)
_configured = False
mpu = None


class CudaRNGStatesTracker:
    """Named random states of the accelerator's generator (Megatron's
    tracker, DeepSpeed's class): add(name, seed) makes one, fork(name) runs
    a block on it and keeps where it got to."""

    def __init__(self):
        self.states_ = {}
        self.seeds_ = set()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return copy.copy(self.states_)

    def set_states(self, states):
        self.states_ = states

    def add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        accelerator = get_accelerator()
        original = accelerator.get_rng_state()
        accelerator.manual_seed(seed)
        self.states_[name] = accelerator.get_rng_state()
        accelerator.set_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name=_MODEL_PARALLEL_RNG):
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        accelerator = get_accelerator()
        original = accelerator.get_rng_state()
        accelerator.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = accelerator.get_rng_state()
            accelerator.set_rng_state(original)


_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker():
    return _TRACKER


def _model_parallel_rank():
    if mpu is None:
        return 0
    getter = getattr(mpu, "get_tensor_model_parallel_rank", None) or getattr(mpu, "get_model_parallel_rank")
    return getter()


def _model_parallel_world():
    if mpu is None:
        return 1
    getter = getattr(mpu, "get_tensor_model_parallel_world_size", None) or \
        getattr(mpu, "get_model_parallel_world_size")
    return getter()


def model_parallel_cuda_manual_seed(seed):
    """Seeds the default generator with `seed` (the same on every
    model-parallel rank) and the tracker's "model-parallel-rng" state with
    seed + 2718 + the model-parallel rank, as DeepSpeed's does."""
    _TRACKER.reset()
    get_accelerator().manual_seed(seed)
    _TRACKER.add(_MODEL_PARALLEL_RNG, seed + 2718 + _model_parallel_rank())


def model_parallel_reconfigure_tp_seed(seed):
    with _TRACKER.fork():
        get_accelerator().manual_seed(seed + 2718 + _model_parallel_rank())


def _read_config(deepspeed_config):
    if isinstance(deepspeed_config, dict):
        config = deepspeed_config
    else:
        with open(deepspeed_config) as file:
            config = json.load(file)
    block = config.get("activation_checkpointing", {})
    if not isinstance(block, dict):
        raise ValueError(f"activation_checkpointing: must be an object, not {type(block).__name__}")
    unknown = sorted(set(block) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"activation_checkpointing.{unknown[0]}: not a key DeepSpeed knows (it knows "
                         f"{', '.join(sorted(_CONFIG_KEYS))})")
    return {_CONFIG_KEYS[key]: value for key, value in block.items()}


def configure(mpu_, deepspeed_config=None, partition_activations=None, contiguous_checkpointing=None,
              num_checkpoints=None, checkpoint_in_cpu=None, synchronize=None, profile=None):
    """DeepSpeed's: the config file's (or dict's) "activation_checkpointing"
    block, then the arguments given, over the defaults."""
    global mpu, _configured
    settings = dict(_DEFAULTS)
    if mpu_ is not None:
        mpu = mpu_
    if deepspeed_config is not None:
        settings.update(_read_config(deepspeed_config))
    given = dict(partition_activations=partition_activations, contiguous_checkpointing=contiguous_checkpointing,
                 num_checkpoints=num_checkpoints, checkpoint_in_cpu=checkpoint_in_cpu, synchronize=synchronize,
                 profile=profile)
    settings.update({key: value for key, value in given.items() if value is not None})
    if settings["contiguous_checkpointing"] and not settings["partition_activations"]:
        raise ValueError("activation_checkpointing.contiguous_memory_optimization needs partition_activations "
                         "(DeepSpeed's rule)")
    if settings["contiguous_checkpointing"] and settings["num_checkpoints"] is None:
        raise ValueError("activation_checkpointing.contiguous_memory_optimization needs number_checkpoints")
    if settings["partition_activations"] and _model_parallel_world() > 1:
        raise ValueError(f"activation_checkpointing.partition_activations: the model-parallel world is "
                         f"{_model_parallel_world()}, and zinf has no model parallelism to split activations over "
                         "(with one model-parallel rank there is nothing to split: that works)")
    _settings.update(settings)
    _configured = True


def is_configured():
    return _configured


def reset():
    """DeepSpeed's reset() frees its contiguous checkpoint buffers between
    iterations (eval loops call it); zinf keeps none, so nothing changes:
    the configuration stays."""


def _forget_configuration():
    """Back to the defaults, unconfigured (for tests)."""
    global _configured
    _settings.clear()
    _settings.update(_DEFAULTS)
    _configured = False


def partition_activations_in_checkpoint(partition_activation):
    if partition_activation and _model_parallel_world() > 1:
        raise ValueError("partition_activations: zinf has no model parallelism to split activations over")
    _settings["partition_activations"] = partition_activation


def set_num_layers(nlayers):
    _settings["num_checkpoints"] = nlayers


def _random_states():
    accelerator = get_accelerator()
    states = {"cpu": torch.get_rng_state(), "tracker": _TRACKER.get_states()}
    if accelerator._name != "cpu":
        states["device"] = accelerator.get_rng_state()
    return states


def _restore_random_states(states):
    torch.set_rng_state(states["cpu"])
    if "device" in states:
        get_accelerator().set_rng_state(states["device"])
    _TRACKER.set_states(states["tracker"])


class _Profile:
    def __init__(self, what):
        self.what = what

    def __enter__(self):
        if _settings["synchronize"] or _settings["profile"]:
            get_accelerator().synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if _settings["synchronize"] or _settings["profile"]:
            get_accelerator().synchronize()
        if _settings["profile"]:
            from .utils import log_dist
            log_dist(f"checkpointed {self.what}: {(time.perf_counter() - self.start) * 1e3:.2f} ms", ranks=[0])


class CheckpointFunction(torch.autograd.Function):
    """Runs `run_function` without keeping its activations; backward runs
    it again on the kept inputs with the first run's random states."""

    @staticmethod
    def forward(ctx, run_function, always_differentiable, *args):
        ctx.run_function = run_function
        ctx.random_states = _random_states()
        with _Profile("forward"), torch.no_grad():
            outputs = run_function(*args)
        ctx.kept = []
        for arg in args:
            if torch.is_tensor(arg):
                kept = arg.detach()
                if _settings["checkpoint_in_cpu"] and kept.device.type != "cpu":
                    kept = kept.to("cpu", non_blocking=False)
                ctx.kept.append((kept, arg.device, arg.requires_grad))
            else:
                ctx.kept.append((arg, None, False))
        single = torch.is_tensor(outputs)
        ctx.single = single
        outputs = (outputs,) if single else tuple(outputs)
        ctx.mark_non_differentiable(*[o for o in outputs if torch.is_tensor(o) and not o.is_floating_point()])
        return outputs[0] if single else outputs

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError("checkpointing is not compatible with .grad(); use .backward()")
        inputs = []
        for kept, device, requires_grad in ctx.kept:
            if device is None:
                inputs.append(kept)
                continue
            value = kept.to(device) if kept.device != device else kept
            inputs.append(value.detach().requires_grad_(requires_grad))
        now = _random_states()
        _restore_random_states(ctx.random_states)
        try:
            with _Profile("backward"), torch.enable_grad():
                outputs = ctx.run_function(*inputs)
        finally:
            _restore_random_states(now)
        outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(i.grad if torch.is_tensor(i) and i.requires_grad else None for i in inputs)


def checkpoint(function, *args):
    """function(*args), its activations recomputed in backward (DeepSpeed's
    reentrant checkpoint): returns what function returns. Unlike
    DeepSpeed's and torch's reentrant checkpoints, a block whose inputs do
    not require grad (the first block, fed the embeddings of a frozen
    table or the batch itself) still gives its params their gradients: an
    empty tensor that requires grad rides along, so the outputs are part of
    the graph."""
    return CheckpointFunction.apply(function, _ALWAYS_DIFFERENTIABLE, *args)


# The rider checkpoint() passes: requires grad, holds nothing.
_ALWAYS_DIFFERENTIABLE = torch.empty(0, requires_grad=True)


def non_reentrant_checkpoint(function, *args):
    """The same through torch's non-reentrant checkpoint (inputs that do
    not require grad still give gradients to the block's params; the kept
    inputs stay where they are). torch restores its own and the device's
    random states for the recomputation; the tracker's are restored here."""
    import torch.utils.checkpoint
    forward_states = _TRACKER.get_states()
    runs = []

    def run(*inputs):
        runs.append(True)
        if len(runs) == 1:
            return function(*inputs)
        now = _TRACKER.get_states()
        _TRACKER.set_states(copy.copy(forward_states))  # fork() replaces entries: the saved ones stay
        try:
            return function(*inputs)
        finally:
            _TRACKER.set_states(now)
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


__all__ = ["CheckpointFunction", "CudaRNGStatesTracker", "checkpoint", "configure", "get_cuda_rng_tracker",
           "is_configured", "model_parallel_cuda_manual_seed", "model_parallel_reconfigure_tp_seed",
           "non_reentrant_checkpoint", "partition_activations_in_checkpoint", "reset", "set_num_layers"]

"""zinf.initialize: DeepSpeed's engine API over zinf's C++ ZeRO engine.

    engine, optimizer, _, scheduler = zinf.initialize(model=model, config="ds_config.json")
    for batch in loader:
        loss = engine(batch).loss
        engine.backward(loss)
        engine.step()

A training script written for DeepSpeed runs by changing its import
(`import zinf as deepspeed`). Under torchrun the ranks meet through
torch.distributed (Gloo for CPU training, initialised from RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT when the script did not), and the
engine's collectives go through that process group.

What runs where: the C++ engine (zero3/engine.hpp) owns every parameter as
fp32 master shards (host memory, or NVMe with offload_optimizer nvme) and
steps them with zinf's CPU optimizer; the model computes with whole
parameters in the working precision (fp32, or bf16/fp16 when enabled).
ZeRO stage 3 gathers a unit's parameters (a layer of a transformer, the
embeddings, the head: as zinf.torch.offload chooses them) before its forward
and again before its backward, and drops them after; stages 0-2 keep every
parameter whole (views of the engine's buffers) and partition the optimizer
states and gradients. Gradients leave param.grad for the engine as soon as
autograd has accumulated them; engine.step() at each accumulation boundary
reduces, clips, steps and writes the parameters back.

Parameters shared between units (tied embeddings) belong to the first unit
that holds them: another unit using one gathers that unit too, and its
gradient is taken once, after every use. A parameter used outside any
module that holds it is gathered on demand by the first op it reaches
(logged once), or with the module registered for it
(zinf.zero.register_external_parameter).

Where the model computes: on the device its parameters are on (the CPU, or
a GPU: model.cuda() before initialize; engine.device says which). The
engine's state stays in host memory and on NVMe either way, as in
ZeRO-Offload: gathered parameters are copied to the device before a unit's
forward and backward, and gradients copied back as autograd makes them.
zinf's collectives run on host memory over Gloo (a Gloo group of its own
beside an NCCL default group the script made), except for a model on GPUs
under an NCCL default group with a GPU per rank: there they are staged
through each rank's GPU and NCCL moves them (zinf.distributed.
engine_collectives; "zinf": {"collectives": "host"} keeps Gloo). The C++
engine's device-memory path (CUDA copier, NCCL communicator) is not used
from Python.
"""
import collections
import contextlib
import copy
import functools
import json
import logging
import operator
import os
import re
import sys
import time
import weakref

import torch
import torch.distributed as dist

from . import _zinf
from . import lr_schedules
from . import zero as _zero
from .errors import DeepSpeedConfigError
from .distributed import engine_collectives, from_mpi_launcher, host_group, init_from_environment, settle_at_exit
from .utils.timer import ThroughputTimer, throughput_config
from .torch import _OnBackward, _OnDemandFetch, _before_backward_of, _load_config, _stream, _units

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_log = logging.getLogger("zinf")
_OPTIMIZERS = {"adam", "adamw", "adagrad", "lion"}
# data_types.grad_accum_dtype's spellings, DeepSpeed's DtypeEnum's.
_DTYPE_NAMES = {"fp32": ("fp32", "float32", "float", "torch.float32"),
                "fp16": ("fp16", "float16", "half", "torch.float16"),
                "bf16": ("bf16", "bfloat16", "bfloat", "torch.bfloat16")}


_ZERO_TO_FP32_SCRIPT = """#!/usr/bin/env python3
# Left by zinf's save_checkpoint, as DeepSpeed leaves its own: the fp32
# weights of the checkpoints in this directory as one state dict file.
#   python zero_to_fp32.py . pytorch_model.bin [--tag global_step<N>]
from zinf.utils.zero_to_fp32 import main

if __name__ == "__main__":
    main()
"""


class UsageError(RuntimeError, AssertionError):
    """An engine call DeepSpeed refuses with an assertion (step() inside
    no_sync(), no_sync() at stage 2 or 3): catchable as either."""


class ZinfOptimizer(torch.optim.Optimizer):
    """What initialize() returns as the optimizer: the model's parameters in
    param_groups (so torch and DeepSpeed schedulers can set "lr"), stepped by
    the engine. step() belongs to the engine (engine.step()): here it only
    runs the closure. zero_grad() is engine.zero_grad(), as DeepSpeed's ZeRO
    optimizer's drops what its stage keeps in param.grad. `overflow` says
    whether the last optimizer step was skipped for non-finite gradients
    (Accelerate's and the HF Trainer's step_was_skipped read it)."""

    def __init__(self, params, settings):
        super().__init__(params, dict(settings))
        self._engine = None
        self._basic = None

    @property
    def optimizer(self):
        """DeepSpeed's ZeRO optimizer wraps a "basic" optimizer, and code
        (DeepSpeed's own tests among it) checks which one the config chose:
        the optimizer passed to initialize, or the class DeepSpeed would
        build (FusedAdam, DeepSpeedCPUAdam with offload_optimizer, torch's
        with torch_adam, ...) with DeepSpeed's adam_w_mode. It shares these
        param groups; zinf's engine does the stepping, never this object."""
        if self._basic is None and self._engine is not None:
            self._basic = self._engine._basic_optimizer()
            self._basic.param_groups = self.param_groups
        return self._basic

    @property
    def parameter_offload(self):
        """Stage 3's parameter coordinator, as DeepSpeed's ZeRO-3 optimizer
        has it (absent below stage 3, as there)."""
        if self._engine is None or self._engine.stage < 3:
            raise AttributeError("parameter_offload: only a ZeRO stage-3 optimizer has one")
        return _ParameterOffload(self._engine)

    def step(self, closure=None):
        return None if closure is None else closure()

    def zero_grad(self, set_to_none=True):
        if self._engine is not None:
            self._engine.zero_grad()

    @property
    def overflow(self):
        return self._engine is not None and self._engine._overflow

    @property
    def loss_scale(self):
        return self._engine._engine.loss_scale if self._engine is not None else 1.0

    cur_scale = loss_scale  # DeepSpeed's fp16 optimizers' name (Megatron reads it)

    @property
    def dynamic_loss_scale(self):
        """Whether fp16's loss scale is dynamic (DeepSpeed's fp16 and ZeRO
        optimizers have the flag)."""
        return self._engine is not None and self._engine.dynamic_loss_scale()

    @property
    def loss_scaler(self):
        """DeepSpeed's optimizers' scaler object, as read: ``loss_scale`` /
        ``cur_scale`` (now), ``dynamic``, and the fp16 block's settings."""
        return _LossScaler(self._engine)


class _LossScaler:
    """A read-only view of the engine's loss scale in the shape of
    DeepSpeed's LossScaler / DynamicLossScaler (the engine owns the scale)."""

    def __init__(self, engine):
        self._engine = engine
        fp16 = engine._settings.get("fp16", {}) if engine is not None else {}
        self.dynamic = engine is not None and engine.dynamic_loss_scale()
        self.scale_factor = 2.0
        self.scale_window = int(fp16.get("loss_scale_window", 1000))
        self.min_scale = float(fp16.get("min_loss_scale", 1))
        self.delayed_shift = int(fp16.get("hysteresis", 2))
        self.consecutive_hysteresis = bool(fp16.get("consecutive_hysteresis", False))

    @property
    def loss_scale(self):
        return self._engine._engine.loss_scale if self._engine is not None else 1.0

    cur_scale = loss_scale


class _ParameterOffload:
    """What trainers reach for in DeepSpeed's stage-3 parameter coordinator:
    TRL generates inside GatheredParameters(model.parameters()) with the
    gather/release hooks removed (``forward_hooks``, ``backward_hooks``), and
    adds them back with ``_register_deepspeed_module(module)`` (before
    DeepSpeed 0.16.4, ``_register_hooks_recursively``)."""

    def __init__(self, engine):
        self._engine = engine
        self.module = engine.module

    @property
    def forward_hooks(self):
        return list(self._engine._unit_hooks)

    @forward_hooks.setter
    def forward_hooks(self, handles):
        self._engine._unit_hooks = list(handles)

    @property
    def backward_hooks(self):
        return []  # zinf's backward gathers come from the forward hooks' autograd nodes

    @backward_hooks.setter
    def backward_hooks(self, handles):
        pass

    def _register_deepspeed_module(self, module):
        if module is not self._engine.module:
            raise ValueError("_register_deepspeed_module: zinf's engine hooks the module it was built with")
        self._engine._install_unit_hooks()

    _register_hooks_recursively = _register_deepspeed_module


def _external_parameters(module):
    """DeepSpeed's module.ds_external_parameters(): (name, param) of what
    register_external_parameter gave `module`."""
    return [(str(k), p) for k, p in enumerate(module.__dict__.get("_zinf_external_params", ()))]


def _check_precision_settings(settings, precision, stage):
    """What DeepSpeed refuses of "amp" and data_types.grad_accum_dtype,
    refused alike, so a config fails here as it does there.

    zinf accumulates gradients in fp32 at every stage, whatever
    grad_accum_dtype names: more exact than the 16-bit accumulation it
    may ask for at stages 1-3, which DeepSpeed accepts. Without ZeRO,
    DeepSpeed accumulates in the model's dtype, or in fp32 for a bf16
    model, and raises NotImplementedError for any other choice: so does
    zinf, rather than train with a type the config did not ask for."""
    amp = settings.get("amp", {})
    if isinstance(amp, dict) and amp.get("enabled") is True:
        raise _AmpRefused("amp.enabled: NVIDIA Apex amp is not part of zinf (and DeepSpeed refuses it with ZeRO); "
                          "use \"bf16\": {\"enabled\": true} or \"fp16\" for mixed precision")
    data_types = settings.get("data_types")
    wanted = data_types.get("grad_accum_dtype") if isinstance(data_types, dict) else None
    if wanted is None:
        return
    accumulate = next((name for name, spellings in _DTYPE_NAMES.items() if wanted in spellings), None)
    if accumulate is None:
        raise DeepSpeedConfigError(f"data_types.grad_accum_dtype: {wanted!r} is not one of \"fp32\", \"fp16\", "
                                   "\"bf16\"")
    if stage == 0 and (precision, accumulate) not in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "fp32")):
        raise NotImplementedError(f"data_types.grad_accum_dtype: {wanted!r} with a {precision} model is not "
                                  "supported without ZeRO (DeepSpeed refuses it too); use stage 1-3, or leave the "
                                  "key out")


class UnsupportedOptimizerError(ValueError, AssertionError):
    """An optimizer passed to initialize that zinf's CPU kernels cannot
    stand in for: a ValueError, and the AssertionError DeepSpeed raises for
    an "untested ZeRO optimizer" unless zero_allow_untested_optimizer is
    true (zinf cannot step it even then)."""


class _AmpRefused(DeepSpeedConfigError, AssertionError):
    """amp.enabled: a config error, and the AssertionError DeepSpeed's
    engine raises for amp with ZeRO."""


def _batch_sizes(settings, world):
    """DeepSpeed's rule: train_batch_size = micro x accumulation x world,
    any two given (or one, the others defaulting) decide the third."""
    def read(key):
        value = settings.get(key)
        if value == "auto" or value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key}: {value!r} is not a positive integer")
        return value
    batch, micro, accumulation = (read("train_batch_size"), read("train_micro_batch_size_per_gpu"),
                                  read("gradient_accumulation_steps"))
    if batch is not None and micro is not None and accumulation is not None:
        if batch != micro * accumulation * world:
            raise ValueError(f"train_batch_size {batch} != train_micro_batch_size_per_gpu {micro} x "
                             f"gradient_accumulation_steps {accumulation} x world size {world}")
    elif batch is not None and micro is not None:
        accumulation, rest = divmod(batch, micro * world)
        if rest or accumulation < 1:
            raise ValueError(f"train_batch_size {batch} is not a multiple of train_micro_batch_size_per_gpu "
                             f"{micro} x world size {world}")
    elif batch is not None and accumulation is not None:
        micro, rest = divmod(batch, accumulation * world)
        if rest or micro < 1:
            raise ValueError(f"train_batch_size {batch} is not a multiple of gradient_accumulation_steps "
                             f"{accumulation} x world size {world}")
    elif batch is not None:
        accumulation = 1
        micro, rest = divmod(batch, world)
        if rest or micro < 1:
            raise ValueError(f"train_batch_size {batch} is not a multiple of the world size {world}")
    elif micro is not None:
        accumulation = accumulation or 1
        batch = micro * accumulation * world
    else:
        raise ValueError("train_batch_size or train_micro_batch_size_per_gpu is required (DeepSpeed's rule)")
    return micro * accumulation * world, micro, accumulation


def _optimizer_kind(optimizer):
    """(DeepSpeed type name, adam_w_mode or None) for the optimizers zinf's
    CPU kernels can stand in for: torch's Adam, AdamW and Adagrad, and
    DeepSpeed's DeepSpeedCPUAdam, FusedAdam, DeepSpeedCPUAdagrad,
    DeepSpeedCPULion and FusedLion (zinf's, under zinf.ops)."""
    from .ops.adam import FusedAdam
    from .ops.lion import FusedLion
    from .optim import CPUAdagrad, CPUAdam, CPULion
    kinds = {torch.optim.Adam: ("Adam", False), torch.optim.AdamW: ("AdamW", True),
             torch.optim.Adagrad: ("Adagrad", None), CPUAdagrad: ("Adagrad", None), CPULion: ("Lion", None),
             FusedLion: ("Lion", None)}
    if type(optimizer) in kinds:
        return kinds[type(optimizer)]
    if isinstance(optimizer, (CPUAdam, FusedAdam)):
        # DeepSpeed's Adam classes: decoupled decay unless adam_w_mode is off.
        return ("AdamW", True) if optimizer.adam_w_mode else ("Adam", False)
    return None, None


def _optimizer_block(optimizer):
    """The DeepSpeed "optimizer" block for an optimizer passed in: its
    type, and its first group's hyperparameters (each group keeps its own:
    see _param_groups). Settings zinf's CPU optimizer has no kernel for are
    refused by name."""
    kind, adam_w_mode = _optimizer_kind(optimizer)
    if kind is None:
        raise UnsupportedOptimizerError(
            f"optimizer: a {type(optimizer).__name__} cannot be stepped by zinf's CPU optimizer; pass "
            "torch.optim.Adam, AdamW or Adagrad, DeepSpeedCPUAdam, FusedAdam, DeepSpeedCPUAdagrad, DeepSpeedCPULion "
            "or FusedLion (zinf.ops), or name the optimizer in the config (optimizer.type: Adam, AdamW, Adagrad or "
            "Lion). (DeepSpeed refuses an untested ZeRO optimizer too unless zero_allow_untested_optimizer is true; "
            "zinf's engine steps only its own kernels, so it cannot run one even then.)")
    unsupported = {"Adagrad": {"lr_decay": 0, "initial_accumulator_value": 0, "maximize": False},
                   "Lion": {"maximize": False}}.get(kind, {"amsgrad": False, "maximize": False})
    for index, group in enumerate(optimizer.param_groups):
        for key, plain in unsupported.items():
            if group.get(key, plain) != plain:
                raise ValueError(f"optimizer: param group {index} has {key}={group[key]!r}; zinf's CPU {kind} "
                                 f"steps with {key}={plain!r} only")
    first = optimizer.param_groups[0]
    params = {key: (list(first[key]) if key == "betas" else first[key]) for key in _GROUP_KEYS[kind.lower()]}
    if adam_w_mode is not None:
        params["adam_w_mode"] = adam_w_mode
        if first.get("bias_correction") is False:
            params["bias_correction"] = False
    return {"type": kind, "params": params}


# Hyperparameters a param group may set for itself, per optimizer type
# (DeepSpeed's names).
_GROUP_KEYS = {"adam": ("lr", "betas", "eps", "weight_decay"), "adamw": ("lr", "betas", "eps", "weight_decay"),
               "adagrad": ("lr", "eps", "weight_decay"), "lion": ("lr", "betas", "weight_decay")}

# What a group holds where neither it nor the config sets a key: the
# defaults of the optimizer DeepSpeed builds from the block (FusedAdam /
# DeepSpeedCPUAdam, torch's Adagrad / DeepSpeedCPUAdagrad, FusedLion /
# DeepSpeedCPULion), as core/config.cpp has them. Every group holds every
# key, as a torch optimizer's do: schedulers read and write them (OneCycle
# cycles "betas").
_ADAM_DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
_GROUP_DEFAULTS = {"adam": _ADAM_DEFAULTS, "adamw": _ADAM_DEFAULTS,
                   "adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0},
                   "lion": {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0}}


def _optimizer_defaults(block):
    """The config's optimizer hyperparameters over its type's defaults:
    what a group that sets none has (torch's optimizer.defaults)."""
    kind = str(block.get("type", "")).lower()
    base = dict(_GROUP_DEFAULTS[kind])
    base.update({key: value for key, value in block.get("params", {}).items()
                 if key in _GROUP_KEYS[kind] and value != "auto"})
    if "betas" in base:
        base["betas"] = tuple(base["betas"])  # a JSON list; torch's groups hold a tuple
    return base


def _param_groups(groups, block, named):
    """The optimizer's param groups: the caller's (model_parameters or a
    torch optimizer's), each param once, or one group of every param. A
    group's hyperparameters (lr, betas, eps, weight_decay, as the optimizer
    has them) are its own where it set them, else the config's, else the
    optimizer's defaults (_GROUP_DEFAULTS). The groups given are the ones
    returned, filled in place: a torch optimizer passed to initialize shares
    them, as DeepSpeed's ZeRO optimizer shares its client's, so a scheduler
    built on it (or a script setting its "lr") steers the engine."""
    base = _optimizer_defaults(block)
    if not groups:
        trainable = [p for _, p in named if p.requires_grad]
        groups = [{"params": trainable or [p for _, p in named]}]
    out, seen = [], set()
    for group in groups:
        members = [p for p in group["params"] if id(p) not in seen]
        seen.update(id(p) for p in members)
        if members:
            for key, value in base.items():
                group.setdefault(key, value)
            if len(members) != len(group["params"]):
                group["params"] = members
            out.append(group)
    return out


def _group_settings(group, kind):
    """A param group's hyperparameters as the engine takes them (those it
    does not have are the config's)."""
    return {key: (tuple(float(b) for b in group[key]) if key == "betas" else float(group[key]))
            for key in _GROUP_KEYS[kind] if key in group}


class _Unit:
    def __init__(self, module, name):
        self.module = module
        self.name = name
        self.index = None       # the C++ module
        self.params = []        # (engine index, param) owned by this unit
        self.borrowed = set()   # other units whose params this unit's forward uses
        self.loose = None       # the root unit's own params (those no other unit holds)
        self.user_only = False  # a module using other units' params only (external parameters)
        self.gathered = False   # stage 3: .data holds the gathered values
        self.forward_open = False
        self.held_by = set()    # ids of the units whose forward is using this one's params now
        self.backward_open = False
        self.arrived = 0
        self.wanted = 0


def _host_copy(value):
    """A tensor copied to the CPU (detached), anything else (a module's
    extra state) deep-copied."""
    return value.detach().to("cpu", copy=True) if torch.is_tensor(value) else copy.deepcopy(value)


# What torch says when a forward meets a param whose .data is empty.
_SHAPE_ERROR = re.compile(r"size|shape|dimension|\d-D")


class ZinfEngine(torch.nn.Module):
    """DeepSpeed's DeepSpeedEngine surface over zinf's C++ engine. As
    DeepSpeed's, an attribute the engine has not is the module's:
    engine.generate(...), engine.gradient_checkpointing_enable() and a
    model's own methods work on the engine."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)  # nn.Module's: params, buffers, submodules
        except AttributeError:
            module = self.__dict__.get("_modules", {}).get("module")
            if module is None or name.startswith("__"):
                raise
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}' (nor has its module, "
                                 f"a {type(module).__name__})") from None

    def __init__(self, model, settings, optimizer=None, lr_scheduler=None, training_data=None, collate_fn=None,
                 units=None, param_groups=None):
        super().__init__()
        self.module = model
        self._settings = settings
        # The model computes where its parameters are (the CPU, or a GPU);
        # the engine's state lives in host memory and on NVMe either way.
        devices = {p.device for p in model.parameters()}
        if len(devices) > 1:
            raise ValueError("zinf.initialize: the model's parameters are on several devices "
                             f"({sorted(map(str, devices))}); move the model to one (model.to(device)) first")
        self._device = devices.pop() if devices else torch.device("cpu")
        self._on_host = self._device.type == "cpu"
        rank, world = init_from_environment(settings.get("zinf", {}).get("timeout_s"))
        self.global_rank, self.world_size = rank, world
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank))
        batch, micro, accumulation = _batch_sizes(settings, world)
        self._train_batch_size, self._micro_batch, self._accumulation = batch, micro, accumulation
        tput_config = throughput_config(settings)  # a bad "timers" block fails before the model is built
        settings["gradient_accumulation_steps"] = accumulation
        settings.pop("train_batch_size", None)
        settings.pop("train_micro_batch_size_per_gpu", None)

        if lr_scheduler is not None and hasattr(lr_scheduler, "step") and \
                not callable(getattr(optimizer, "step", None)):
            # As DeepSpeed asserts: a scheduler object is built on an
            # optimizer object, which must be the one given here, else
            # its rates steer an optimizer that never steps.
            raise UsageError(f"lr_scheduler: a scheduler object ({type(lr_scheduler).__name__}) is given but the "
                             f"optimizer is {'not given' if optimizer is None else 'a callable'}; pass the "
                             "optimizer the scheduler was built on, or a callable building the scheduler")
        if optimizer is not None and not callable(getattr(optimizer, "step", None)):
            # A callable building one, from model_parameters as DeepSpeed
            # calls it (the script's param groups), else the model's params.
            optimizer = optimizer(param_groups if param_groups is not None else list(model.parameters()))
        if optimizer is not None and "optimizer" in settings:
            raise ValueError("optimizer: given both in the config and as an argument (DeepSpeed refuses this too)")
        self._client_optimizer_name = type(optimizer).__name__ if optimizer is not None else None
        self._client_optimizer = optimizer
        if optimizer is not None:
            settings["optimizer"] = _optimizer_block(optimizer)
            param_groups = optimizer.param_groups
        block = settings.setdefault("optimizer", {"type": "AdamW", "params": {}})
        kind = str(block.get("type", "")).lower()
        if kind not in _OPTIMIZERS:
            raise DeepSpeedConfigError(f"optimizer.type: \"{block.get('type')}\" is not stepped by zinf (Adam, "
                                       "AdamW, Adagrad, Lion)")
        zero = settings.setdefault("zero_optimization", {})
        self.stage = int(zero.get("stage", 0))
        precision = "bf16" if settings.get("bf16", {}).get("enabled") is True else \
            "fp16" if settings.get("fp16", {}).get("enabled") is True else "fp32"
        self._dtype = _DTYPES[precision]
        _check_precision_settings(settings, precision, self.stage)

        # checkpoint.tag_validation (DeepSpeed's default "Warn"): whether
        # save_checkpoint's tags must agree over the ranks.
        mode = settings.get("checkpoint", {}).get("tag_validation", "Warn")
        if not isinstance(mode, str) or mode.lower() not in ("ignore", "warn", "fail"):
            raise DeepSpeedConfigError(f"checkpoint.tag_validation: {mode!r} is not one of \"Ignore\", \"Warn\", "
                                       "\"Fail\"")
        self._tag_validation = mode.lower()
        problems = _zinf.check_config(json.dumps(settings))
        if problems:
            raise DeepSpeedConfigError("; ".join(problems))
        self._host_group = host_group() if world > 1 else None
        if world > 1:
            settle_at_exit()
        own = settings.get("zinf", {})
        collectives = engine_collectives(self._device, self._host_group, own.get("collectives", "auto"),
                                         own.get("timeout_s")) if world > 1 else None
        backend = collectives.backend if collectives else "local"
        self.collectives_backend = backend  # what the engine's collectives go over: local, gloo or nccl
        threads = int(own.get("optimizer_threads", 0))
        # backward() divides the loss by gradient_accumulation_steps, as
        # DeepSpeed's does: the engine then does not divide again.
        self._engine = _zinf.Engine(json.dumps(settings), collectives, rank, world, backend, threads,
                                    loss_divided_by_accumulation=True)

        self._on_demand = []
        self._logged_on_demand = set()
        self._register(model, units)
        # Param group k is the engine's group k (group 0 the optimizer's own),
        # so a scheduler's lr per group reaches its params (_push_groups).
        self._kind = kind
        groups = _param_groups(param_groups, block, self._named_unique)
        for k, group in enumerate(groups):
            hyper = _group_settings(group, kind)
            if k == 0:
                self._engine.set_param_group_settings(0, **hyper)
            else:
                self._engine.add_param_group(**hyper)
            for p in group["params"]:
                self._engine.set_param_group(self._index[id(p)], k)
        # Frozen params (requires_grad=False, as fine-tuning leaves a base
        # model) keep their working copy only: no master, no optimizer
        # state, no gradient, as DeepSpeed keeps them.
        for _, p in self._named_unique:
            if not p.requires_grad:
                self._engine.set_trainable(self._index[id(p)], False)
        self._engine.finalize()
        self._after_finalize(model)
        # defaults as a torch optimizer's hold every key (torch's OneCycleLR
        # looks for "betas" there before it cycles momentum).
        self.optimizer = ZinfOptimizer(groups, _optimizer_defaults(self._settings["optimizer"]))
        self.optimizer._engine = self
        self._pushed = [_group_settings(g, kind) for g in groups]
        self._scheduler = self._make_scheduler(lr_scheduler)
        self.training_dataloader = self._make_dataloader(training_data, collate_fn)
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self._step_applied = False
        self._overflow = False  # the last boundary's step was skipped (fp16 overflow)
        self._backward_pending = False
        # set_gradient_accumulation_boundary's override (None: count
        # micro-steps); backward's scale_wrt_gas for every call when set.
        self._is_gradient_accumulation_boundary = None
        self.scale_wrt_gas = None
        self.inside_no_sync_ctxt = False
        self._has_gradients = False  # any backward since the last step (or zero_grad at stages 0-1)
        # zero_optimization.ignore_unused_parameters false (DeepSpeed's
        # default is true): at stages 1-2 a trainable param with no gradient
        # in a window is an error. The ids of those that got one.
        self._unused_is_error = self.stage in (1, 2) and \
            settings["zero_optimization"].get("ignore_unused_parameters", True) is False
        self._got_gradient = set()
        # Params GatheredParameters holds whole (id -> contexts open): a unit's
        # forward inside the context uses them as they are and leaves them.
        self._held_by_context = collections.Counter()
        self._timings = {"forward_s": 0.0, "backward_s": 0.0, "step_s": 0.0}
        # DeepSpeed's engine.tput_timer: samples/s from the third global
        # step on, in the step line (its own line is not printed: one line
        # a print).
        self.tput_timer = ThroughputTimer(tput_config, batch_size=self._train_batch_size,
                                          steps_per_output=self.steps_per_print(), monitor_memory=False)
        # The step line's NVMe bytes count from here (finalize's own writes left out).
        built = self._engine.stats()
        self._written_at_print, self._read_at_print = built["nvme_written_bytes"], built["nvme_read_bytes"]
        self._steps_at_print = 0
        self._timings_at_print, self._timing_steps_at_print = {}, 0
        self._last_print = time.perf_counter()

    # -- registration -----------------------------------------------------------------
    def _register(self, model, chosen=None):
        model.to(self._dtype)
        names = {}
        for name, p in model.named_parameters():
            names.setdefault(id(p), name)
        self._named_unique = [(names[id(p)], p) for p in {id(p): p for p in model.parameters()}.values()]
        units = [_Unit(m, n) for m, n in _named_units(model, chosen)]
        covered = {id(p) for u in units for p in u.module.parameters()}
        loose = [p for _, p in self._named_unique if id(p) not in covered]
        if loose or not units:
            root = _Unit(model, "(root)")
            root.loose = loose if units else [p for _, p in self._named_unique]
            units.append(root)
        self._units = units
        if self.stage >= 3:
            for unit in units:  # zinf.utils.z3_leaf_parameter reads this
                if unit.loose is None and getattr(unit.module, "_z3_leaf", False):
                    for p in unit.module.parameters():
                        p.ds_z3_leaf_module = unit.module
        self._owner = {}  # param id -> unit
        self._index = {}  # param id -> engine param index
        # The real shapes (.data is emptied at stage 3, and is empty already
        # for params built under zinf.zero.Init).
        self._shapes = {id(p): (_zero.staged(p).shape if _zero.staged(p) is not None else p.shape)
                        for _, p in self._named_unique}
        for unit in units:
            unit.index = self._engine.add_module(unit.name)
            for p in (unit.loose if unit.loose is not None else unit.module.parameters()):
                if id(p) in self._owner:
                    if self._owner[id(p)] is not unit:
                        unit.borrowed.add(self._owner[id(p)])
                    continue
                self._owner[id(p)] = unit
                shape = list(self._shapes[id(p)])
                if _zero.staged(p) is not None:
                    # Built under zinf.zero.Init: this rank's shard is staged.
                    index = self._engine.add_param_from(unit.index, names[id(p)], shape,
                                                        _fill_from_stage(_zero.staged(p)))
                else:
                    values = p.detach().to("cpu", torch.float32).contiguous()
                    if self.world_size > 1:
                        # Every rank starts from rank 0's values, as DeepSpeed does.
                        dist.broadcast(values, src=0, group=self._host_group)
                    index = self._engine.add_param(unit.index, names[id(p)], shape, values.data_ptr(),
                                                   values.numel())
                self._index[id(p)] = index
                unit.params.append((index, p))
        self._names = names

    def _after_finalize(self, model):
        names = self._names
        units = self._units
        stores = set()
        for _, p in self._named_unique:
            if _zero.staged(p) is not None:
                stores.add(_zero.staged(p).store)
                del p._zinf_staged
            p._zinf_engine = weakref.ref(self)
        for store in stores:
            if store in _zero.Init._stores:
                _zero.Init._stores.remove(store)
            store.close()
        self._add_external_users(model, names)
        for unit in units:
            unit.wanted = sum(1 for _, p in unit.params if p.requires_grad)
        self._persistent = {id(p) for _, p in self._named_unique
                            if self._engine.describe(self._index[id(p)])["persistent"]}
        # Each param's AccumulateGrad node, made while the param has its
        # real shape (autograd checks gradients against the shape it saw).
        self._accumulators = []
        for _, p in self._named_unique:
            if not p.requires_grad:
                continue  # frozen: no gradient to hand over
            shape = self._shapes[id(p)]
            if p.shape != shape:
                p.data = torch.zeros((), dtype=self._dtype, device=self._device).expand(shape)  # the shape, no memory
            with torch.enable_grad():
                node = p.expand_as(p).grad_fn.next_functions[0][0]
            node.register_hook(self._make_grad_hook(p))
            self._accumulators.append(node)
        for _, p in self._named_unique:
            p.data = self._persistent_values(p) if id(p) in self._persistent else self._empty()
            if self.stage >= 3:
                # DeepSpeed's names for a partitioned param's real size
                # (its .shape is empty between uses), its id and whether
                # its values are whole now: scripts test hasattr(p, "ds_id")
                # to know they must gather (GatheredParameters) before
                # reading a param, and would read an empty tensor else.
                p.ds_shape = self._shapes[id(p)]
                p.ds_numel = self._shapes[id(p)].numel()
                p.ds_id = self._index[id(p)]
                p.ds_persist = id(p) in self._persistent
                self._mark(p)
            else:
                for name in ("ds_id", "ds_persist", "ds_status"):  # Init's; whole params below stage 3
                    if hasattr(p, name):
                        delattr(p, name)
        if self.stage >= 3:
            _stream(p for _, p in self._named_unique if id(p) not in self._persistent)
            for _, p in self._named_unique:
                p.ds_active_sub_modules = set()  # DeepSpeed's; TRL clears it (zinf counts in its units)
            for module in model.modules():
                module.ds_external_parameters = functools.partial(_external_parameters, module)
            for unit in units:
                # DeepSpeed's count of the backward passes still to reach the
                # module's outputs (its tests read it): one per forward whose
                # outputs carry a gradient, 0 again once backward is done.
                unit.module.ds_grads_remaining = 0
            self._unit_hooks = []
            self._install_unit_hooks()

    def _install_unit_hooks(self):
        """The forward hooks that gather and release each unit, in
        self._unit_hooks (what parameter_offload.forward_hooks lists: a
        trainer generating inside GatheredParameters removes them, as TRL
        does, and puts them back with _register_deepspeed_module)."""
        for handle in self._unit_hooks:
            handle.remove()
        self._unit_hooks = []
        for unit in self._units:
            self._unit_hooks.append(unit.module.register_forward_pre_hook(self._make_pre_hook(unit)))
            self._unit_hooks.append(unit.module.register_forward_hook(self._make_post_hook(unit)))

    def _add_external_users(self, model, names):
        """Modules that use other modules' params (register_external_parameter)
        gather those params' units around their own forward and backward."""
        by_module = {id(u.module): u for u in self._units}
        for name, module in model.named_modules():
            external = module.__dict__.get("_zinf_external_params")
            if not external:
                continue
            unit = by_module.get(id(module))
            if unit is None:
                unit = _Unit(module, name)  # gathers nothing of its own
                self._units.append(unit)
                by_module[id(module)] = unit
                unit.user_only = True
            for p in external:
                owner = self._owner.get(id(p))
                if owner is None:
                    raise ValueError(f"register_external_parameter({name}): the parameter is not the model's")
                if owner is not unit:
                    unit.borrowed.add(owner)

    def _mark(self, p):
        """p.ds_status (stage 3) after p.data changed: AVAILABLE when whole."""
        if self.stage >= 3:
            whole = tuple(p.data.shape) == tuple(p.ds_shape)
            p.ds_status = _zero.ZeroParamStatus.AVAILABLE if whole else _zero.ZeroParamStatus.NOT_AVAILABLE

    def _gather_whole(self, p):
        """GatheredParameters: the whole value from the masters (once: a
        context inside another sees the outer one's tensor)."""
        self._held_by_context[id(p)] += 1
        if self._held_by_context[id(p)] > 1:
            return
        whole = torch.empty(self._shapes[id(p)], dtype=torch.float32)
        self._engine.gather(self._index[id(p)], "param", whole.data_ptr(), whole.numel())
        p.data = whole.to(self._device, self._dtype)
        self._mark(p)

    def _release_whole(self, p, write_back, source_rank):
        if write_back:
            values = p.detach().to("cpu", torch.float32).contiguous()
            if self.world_size > 1:
                dist.broadcast(values, src=source_rank, group=self._host_group)
            self._engine.set_values(self._index[id(p)], "param", values.data_ptr(), values.numel())
        self._held_by_context[id(p)] -= 1
        if self._held_by_context[id(p)] > 0:
            return  # an outer context still holds it whole
        del self._held_by_context[id(p)]
        # Without a write-back a gathered unit's tensor keeps the values
        # _gather_whole gave it: the masters in the working precision.
        self._refresh_param(p, values if write_back else None)

    def _view(self, p):
        """The engine's whole param, as a tensor over its (host) memory."""
        shape = self._shapes[id(p)]
        if shape.numel() == 0:
            return torch.empty(shape, dtype=self._dtype)
        return torch.frombuffer(self._engine.param(self._index[id(p)]), dtype=self._dtype).view(shape)

    def _copy_out(self, p):
        """The gathered param as a tensor torch owns, on the model's device:
        a view autograd saved must not see the engine reuse this memory for
        another layer."""
        return self._view(p).to(self._device, copy=True)

    def _persistent_values(self, p):
        """A persistent param's tensor: on the CPU the engine's memory itself
        (a step updates it in place), on a GPU a copy that _refresh_persistent
        renews after each step."""
        return self._view(p) if self._on_host else self._view(p).to(self._device)

    def _refresh_persistent(self):
        if not self._on_host:
            for _, p in self._named_unique:
                if id(p) in self._persistent:
                    p.data.copy_(self._view(p))

    def _empty(self):
        return torch.empty(0, dtype=self._dtype, device=self._device)

    # -- stage 3: gather and release around each unit ------------------------------------
    def _owners(self, unit):
        """The units whose params `unit`'s forward needs: its own, and those
        it borrows (tied params, external parameters)."""
        return ([] if unit.user_only else [unit]) + sorted(unit.borrowed, key=lambda u: u.index)

    def _gather(self, unit, backward):
        for owner in self._owners(unit):
            if not backward:
                owner.held_by.add(id(unit))
            if backward:
                if not owner.backward_open:
                    self._engine.pre_backward(owner.index)
                    owner.backward_open = True
                    self._queue_end_of_backward()
            elif not owner.gathered:
                self._engine.pre_forward(owner.index)
            if not owner.gathered:
                for _, p in owner.params:
                    if id(p) not in self._persistent and not self._held_by_context[id(p)]:
                        p.data = self._copy_out(p)
                        self._mark(p)
                owner.gathered = True
                if not backward:
                    owner.forward_open = True

    def _release(self, unit):
        if unit.gathered:
            for _, p in unit.params:
                if id(p) not in self._persistent and not self._held_by_context[id(p)]:
                    p.data = self._empty()
                    self._mark(p)
            unit.gathered = False

    def _make_pre_hook(self, unit):
        def pre_hook(module, inputs):
            self._gather(unit, backward=False)
            if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs):
                # Released once backward has passed the unit's inputs; a unit
                # whose inputs carry no gradient (the embeddings), when
                # backward ends.
                wrapped = _OnBackward.apply(lambda: self._backward_done(unit), *inputs)
                return wrapped if isinstance(wrapped, tuple) else (wrapped,)
            return None
        return pre_hook

    def _make_post_hook(self, unit):
        def post_hook(module, inputs, outputs):
            for owner in self._owners(unit):
                owner.held_by.discard(id(unit))
                if owner.held_by:
                    continue  # a module around this one (its user) still needs it
                if owner.forward_open:
                    self._engine.post_forward(owner.index)
                    owner.forward_open = False
                self._release(owner)
            if not torch.is_grad_enabled():
                return None
            wrapped = _before_backward_of(outputs, lambda: self._outputs_reached(unit))
            if wrapped is not None:
                module.ds_grads_remaining += 1
            return wrapped
        return post_hook

    def _outputs_reached(self, unit):
        """Backward reached the outputs of one of the unit's forwards: its
        params are gathered for the backward through it."""
        # Not below 0: a second backward through a retained graph reaches
        # outputs again after the first one's end reset the count.
        unit.module.ds_grads_remaining = max(0, unit.module.ds_grads_remaining - 1)
        self._gather(unit, backward=True)

    # -- gradients -------------------------------------------------------------------------
    def _make_grad_hook(self, p):
        def grad_hook(grad_inputs, grad_outputs):
            unit = self._owner[id(p)]
            if p.grad is None:
                return
            if not unit.backward_open:
                self._engine.pre_backward(unit.index)
                unit.backward_open = True
                self._queue_end_of_backward()
            target = torch.frombuffer(self._engine.grad(self._index[id(p)]), dtype=torch.float32)
            target.view(self._shapes[id(p)]).add_(p.grad.detach().to("cpu"))
            p.grad = None
            if self._unused_is_error:
                self._got_gradient.add(id(p))
            unit.arrived += 1
            if unit.arrived == unit.wanted:
                self._close_backward(unit)
        return grad_hook

    def _close_backward(self, unit):
        # Every gradient of the unit has arrived: the engine reduces them.
        # Its values stay until the unit's backward has passed its inputs
        # (_backward_done): a frozen weight (LoRA's base) is still read after
        # the trainable ones' gradients are in.
        self._engine.post_backward(unit.index)
        unit.backward_open = False
        unit.arrived = 0

    def _backward_done(self, unit):
        """The unit's backward reached its inputs: nothing of it reads its
        params any more this pass."""
        if self.stage >= 3 and not unit.user_only:
            self._release(unit)

    def _queue_end_of_backward(self):
        if not self._backward_pending:
            self._backward_pending = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self):
        # Units whose params did not all get a gradient (unused this pass)
        # are reduced with zeros for the rest; whatever backward gathered goes.
        self._backward_pending = False
        for unit in self._units:
            unit.held_by.clear()
            if unit.backward_open:
                self._close_backward(unit)
            if self.stage >= 3:
                unit.module.ds_grads_remaining = 0  # outputs that did not reach the loss count no more
                self._release(unit)

    # -- DeepSpeed's engine API -------------------------------------------------------------
    def _fetch_on_demand(self, p):
        unit = self._owner.get(id(p))
        if unit is None or unit.gathered or self._shapes[id(p)].numel() == 0:
            return
        if id(p) not in self._logged_on_demand:
            self._logged_on_demand.add(id(p))
            name = self._name_of(p)
            _log.warning("zinf: parameter %s is used outside its module's forward: its unit is gathered on demand "
                         "and kept until backward is done (zinf.zero.register_external_parameter(module, param) "
                         "gathers it with the module that uses it)", name)
        unit.held_by.add("on demand")  # its own post-hook must not drop it
        self._gather(unit, backward=False)
        self._on_demand.append(unit)

    def _end_of_forward(self):
        """Units gathered on demand: the engine's side of their forward ends
        here; the values stay for backward (or go now without autograd)."""
        for unit in self._on_demand:
            unit.held_by.discard("on demand")
            if unit.forward_open:
                self._engine.post_forward(unit.index)
                unit.forward_open = False
            if not torch.is_grad_enabled():
                self._release(unit)
        self._on_demand = []

    def forward(self, *args, **kwargs):
        start = time.perf_counter()
        self.tput_timer.start()  # as DeepSpeed's: each micro-step timed from its (last) forward to step()
        if self.fp16_enabled() and self._settings.get("fp16", {}).get("auto_cast") is True:
            # fp16.auto_cast, as DeepSpeed's: floating positional inputs
            # (in lists, tuples and dicts too) reach the fp16 model as
            # fp16; keyword arguments (labels=...) pass as given.
            args = _half_inputs(args)
        try:
            if self.stage >= 3:
                with _OnDemandFetch(self):  # calls self._fetch_on_demand
                    out = self.module(*args, **kwargs)
                self._end_of_forward()
            else:
                out = self.module(*args, **kwargs)
        except RuntimeError as error:
            # Only a shape error can be a released param's (its .data is
            # empty); others (a dtype the CPU has no kernel for, out of
            # memory, subclasses callers catch) pass unchanged.
            if self.stage < 3 or type(error) is not RuntimeError or not _SHAPE_ERROR.search(str(error)):
                raise
            raise RuntimeError(f"{error}\n(zinf, ZeRO stage 3: a unit's parameters are whole only during its own "
                               "forward and backward; a module that uses another module's parameter directly "
                               "needs zinf.zero.register_external_parameter(module, param), or train at stage "
                               "2)") from error
        self._timings["forward_s"] += time.perf_counter() - start
        return out

    def backward(self, loss, release_loss=False, retain_graph=False, scale_wrt_gas=True):
        """loss.backward(), with fp16's loss scale applied (the engine takes it
        out again). As DeepSpeed's, the gradients are those of
        loss / gradient_accumulation_steps (averaged over ranks), unless
        scale_wrt_gas is False (or engine.scale_wrt_gas is) or inside
        no_sync(): then of the loss as given. Returns the loss so scaled."""
        start = time.perf_counter()
        if self.scale_wrt_gas is not None:
            scale_wrt_gas = self.scale_wrt_gas
        # As DeepSpeed: the loss divided by gradient_accumulation_steps, then
        # times fp16's loss scale, before backward (the model's fp16
        # gradients have DeepSpeed's magnitude); the engine divides by the
        # world size and the loss scale only.
        # The division is in fp32 (a bf16 or fp16 loss is widened first), as
        # DeepSpeed's, which returns that fp32 loss.
        if scale_wrt_gas and not self.inside_no_sync_ctxt:
            loss = loss.float() / self._accumulation
        scale = self._engine.loss_scale
        (loss * scale if scale != 1.0 else loss).backward(retain_graph=retain_graph)
        self._has_gradients = True
        self._timings["backward_s"] += time.perf_counter() - start
        return loss

    @contextlib.contextmanager
    def no_sync(self):
        """DeepSpeed's: backward inside it neither divides the loss by
        gradient_accumulation_steps nor may be followed by step() there. At
        stages 0 and 1 zinf still reduces each gradient as it comes (the sum
        DeepSpeed would reduce when the context ends: the same values); at
        stages 2 and 3, which partition gradients, it is refused as DeepSpeed
        refuses it."""
        if self.stage >= 2:
            raise UsageError(f"no_sync context manager is incompatible with gradient partitioning logic of ZeRO "
                             f"stage {self.stage}")
        if self.inside_no_sync_ctxt:
            raise UsageError("no_sync context manager reentry is unsupported")
        self.inside_no_sync_ctxt = True
        try:
            yield
        finally:
            self.inside_no_sync_ctxt = False

    def _refuse_unused_parameters(self):
        """ignore_unused_parameters false: DeepSpeed's assertion when a
        trainable param took no part in the window's loss. Every rank raises
        if any does, so none is left waiting in a collective."""
        unused = [name for name, p in self._named_unique
                  if p.requires_grad and id(p) not in self._got_gradient]
        self._got_gradient.clear()
        count = torch.tensor([len(unused)], dtype=torch.int64)
        if self.world_size > 1:
            dist.all_reduce(count, group=self._host_group)
        if count.item():
            where = f"this rank's: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}" if unused else \
                "on another rank"
            raise UsageError(f"{count.item()} trainable parameter(s) got no gradient since the last step ({where}): "
                             "they were not used in producing the loss. With zero_optimization."
                             "ignore_unused_parameters false this is an error, as in DeepSpeed; set it true (the "
                             "default) to train on, or make every trainable parameter and forward output take part "
                             "in the loss")

    def step(self, lr_kwargs=None):
        """After every micro-step's backward; the optimizer runs at each
        gradient_accumulation_steps-th (is_gradient_accumulation_boundary),
        or where set_gradient_accumulation_boundary(True) says."""
        if self.inside_no_sync_ctxt:
            raise UsageError("It is illegal to call Engine.step() inside no_sync context manager")
        start = time.perf_counter()
        boundary = self.is_gradient_accumulation_boundary()
        if boundary and self._unused_is_error:
            self._refuse_unused_parameters()
        if boundary:
            self._push_groups()
            self._has_gradients = False
        stepped = self._engine.step(boundary=boundary)
        if stepped:
            self._refresh_persistent()
        self.micro_steps += 1
        self.global_samples += self._micro_batch * self.world_size
        self._step_applied = stepped
        if boundary:
            self._overflow = not stepped
            self.global_steps += 1
            if stepped:
                # The client's optimizer and the one initialize returned
                # stepped, through the engine: torch's schedulers built on
                # either (the HF Trainer builds its own on the returned one)
                # check that it did (1.x counts _step_count, 2.x reads
                # _opt_called) before their first step.
                for optimizer in (self._client_optimizer, self.optimizer):
                    if optimizer is not None:
                        optimizer._step_count = getattr(optimizer, "_step_count", 0) + 1
                        optimizer._opt_called = True
            if self._scheduler is not None and stepped:
                self._scheduler.step(**(lr_kwargs or {}))
        self._timings["step_s"] += time.perf_counter() - start
        self.tput_timer.stop(global_step=boundary, report_speed=False)
        if boundary:
            self._maybe_print()

    def _basic_optimizer(self):
        """ZinfOptimizer.optimizer: the client's optimizer, or the one
        DeepSpeed's engine would build for the config (never stepped)."""
        if self._client_optimizer is not None:
            return self._client_optimizer
        from .ops.adam import FusedAdam
        from .ops.lion import FusedLion
        from .optim import DeepSpeedCPUAdagrad, DeepSpeedCPUAdam, DeepSpeedCPULion
        params = self._settings["optimizer"].get("params", {})
        zero = self._settings.get("zero_optimization", {})
        on_cpu = self._offload_device("offload_optimizer") in ("cpu", "nvme") or zero.get("cpu_offload") is True
        groups = self.optimizer.param_groups
        if self._kind in ("adam", "adamw"):
            # A type of "Adam" decouples the decay too unless adam_w_mode is false, as in DeepSpeed.
            adam_w_mode = self._kind == "adamw" or params.get("adam_w_mode", True) is not False
            if params.get("torch_adam", False) is True:
                return (torch.optim.AdamW if adam_w_mode else torch.optim.Adam)(groups)
            if on_cpu:
                return DeepSpeedCPUAdam(groups, adamw_mode=adam_w_mode)
            return FusedAdam(groups, adam_w_mode=adam_w_mode)
        if self._kind == "adagrad":
            return DeepSpeedCPUAdagrad(groups) if on_cpu else torch.optim.Adagrad(groups)
        return DeepSpeedCPULion(groups) if on_cpu else FusedLion(groups)

    def _push_groups(self):
        """Each param group's lr (and betas, eps, weight_decay) as the
        scheduler or the caller left it, to the engine's group."""
        for k, group in enumerate(self.optimizer.param_groups):
            settings = _group_settings(group, self._kind)
            if settings != self._pushed[k]:
                self._engine.set_param_group_settings(k, **settings)
                self._pushed[k] = settings

    def zero_grad(self, set_to_none=True):
        """As DeepSpeed's: at stages 0 and 1, where DeepSpeed accumulates in
        param.grad, the gradients accumulated since the last step are
        dropped; at stages 2 and 3 the engine's partitioned accumulation is
        kept (DeepSpeed's is too). param.grad, emptied as gradients arrive,
        is cleared of anything a caller put there by hand."""
        for _, p in self._named_unique:
            p.grad = None
        if self.stage <= 1 and self._has_gradients:
            self._engine.drop_gradients()
            self._has_gradients = False

    def is_gradient_accumulation_boundary(self):
        if self._is_gradient_accumulation_boundary is not None:
            return self._is_gradient_accumulation_boundary
        return (self.micro_steps + 1) % self._accumulation == 0

    def set_gradient_accumulation_boundary(self, is_boundary):
        """Overrides the micro-step count, as DeepSpeed's does (Accelerate
        calls it before each backward): step() after a backward with it True
        runs the optimizer on what has accumulated, with it False only
        accumulates. The gradients stay divided by gradient_accumulation_steps
        either way, as DeepSpeed's are. None goes back to counting."""
        self._is_gradient_accumulation_boundary = None if is_boundary is None else bool(is_boundary)

    def gradient_accumulation_steps(self):
        return self._accumulation

    def train_batch_size(self):
        return self._train_batch_size

    def train_micro_batch_size_per_gpu(self):
        return self._micro_batch

    def set_train_batch_size(self, train_batch_size):
        """As DeepSpeed's (batch-size ramp-up): the global batch changes
        through gradient_accumulation_steps, the micro-batch stays. As in
        DeepSpeed, a boundary is every gradient_accumulation_steps-th
        micro-step counted from the first: changed where the micro-steps
        so far are not a multiple of the new value, the next window is
        shorter (its loss still divided by the new value)."""
        per_micro_step = self._micro_batch * self.world_size
        try:
            count = operator.index(train_batch_size)
        except TypeError:
            count = 0
        if count < 1 or count % per_micro_step:
            raise ValueError(f"train_batch_size {train_batch_size!r} must be a positive multiple of "
                             f"train_micro_batch_size_per_gpu {self._micro_batch} x world size {self.world_size}")
        self._accumulation = count // per_micro_step
        self._train_batch_size = count
        self.tput_timer.batch_size = count

    def set_train_micro_batch_size(self, micro_batch_size):
        """As DeepSpeed's: gradient_accumulation_steps stays, the global
        batch follows (the samples counted per micro-step change)."""
        try:
            micro_batch_size = operator.index(micro_batch_size)
        except TypeError:
            raise ValueError(f"train_micro_batch_size_per_gpu {micro_batch_size!r} must be a positive integer") from None
        if micro_batch_size < 1:
            raise ValueError(f"train_micro_batch_size_per_gpu {micro_batch_size!r} must be a positive integer")
        self._micro_batch = micro_batch_size
        self._train_batch_size = micro_batch_size * self._accumulation * self.world_size
        self.tput_timer.batch_size = self._train_batch_size

    @property
    def config(self):
        """The DeepSpeed config the engine runs: a dict, its three batch
        sizes resolved (a copy: the engine does not read it back)."""
        return dict(copy.deepcopy(self._settings), train_batch_size=self._train_batch_size,
                    train_micro_batch_size_per_gpu=self._micro_batch,
                    gradient_accumulation_steps=self._accumulation)

    # What DeepSpeed scripts ask of the config through the engine.
    def zero_optimization(self):
        return self.stage > 0

    def zero_optimization_stage(self):
        return self.stage

    def fp16_enabled(self):
        return self._dtype == torch.float16

    def bfloat16_enabled(self):
        return self._dtype == torch.bfloat16

    def gradient_clipping(self):
        return float(self._settings.get("gradient_clipping", 0.0))

    def steps_per_print(self):
        return int(self._settings.get("steps_per_print", 10) or 0)

    def _offload_device(self, block):
        """zero_optimization.<block>.device ("offload_optimizer" or
        "offload_param"); "none" where the block is absent or null."""
        return (self._settings["zero_optimization"].get(block) or {}).get("device", "none")

    def zero_offload_optimizer(self):
        return self._offload_device("offload_optimizer") != "none"

    def zero_offload_param(self):
        # Below stage 3 the block is ignored (with a warning), as DeepSpeed ignores it.
        return self.stage >= 3 and self._offload_device("offload_param") != "none"

    def zero_cpu_offload(self):
        return self._offload_device("offload_optimizer") == "cpu"

    def zero_optimization_partition_gradients(self):
        return self.stage >= 2

    def zero_optimization_partition_weights(self):
        return self.stage >= 3

    # DeepSpeed's getters of the zero_optimization block, with its defaults
    # where the config says nothing (or "auto"): scripts and trainers read
    # them to size their own buffers or to log the setup. zinf's engine
    # reads the same keys (docs/configuration.md says which it acts on).
    def _zero_setting(self, default, *keys):
        zero = self._settings["zero_optimization"]
        for key in keys:
            value = zero.get(key)
            if value is not None and value != "auto":
                return type(default)(value) if isinstance(default, (bool, int, float)) else value
        return default

    def zero_allgather_partitions(self):
        return self._zero_setting(True, "allgather_partitions")

    def zero_allgather_bucket_size(self):
        return self._zero_setting(500_000_000, "allgather_bucket_size")

    def zero_reduce_scatter(self):
        return self._zero_setting(True, "reduce_scatter")

    def zero_reduce_bucket_size(self):
        return self._zero_setting(500_000_000, "reduce_bucket_size")

    def zero_overlap_comm(self):
        return self._zero_setting(self.stage >= 3, "overlap_comm")  # DeepSpeed: on by default at stage 3 only

    def zero_contiguous_gradients(self):
        return self._zero_setting(True, "contiguous_gradients")

    def zero_sub_group_size(self):
        return self._zero_setting(1_000_000_000, "sub_group_size")

    def zero_max_live_parameters(self):
        return self._zero_setting(1_000_000_000, "stage3_max_live_parameters", "max_live_parameters")

    def zero_max_reuse_distance(self):
        return self._zero_setting(1_000_000_000, "stage3_max_reuse_distance", "max_reuse_distance")

    def zero_prefetch_bucket_size(self):
        return self._zero_setting(50_000_000, "stage3_prefetch_bucket_size", "prefetch_bucket_size")

    def zero_param_persistence_threshold(self):
        return self._zero_setting(100_000, "stage3_param_persistence_threshold", "param_persistence_threshold")

    def zero_model_persistence_threshold(self):
        return self._zero_setting(sys.maxsize, "stage3_model_persistence_threshold", "model_persistence_threshold")

    def zero_elastic_checkpoint(self):
        return self._zero_setting(False, "elastic_checkpoint")

    def zero_load_from_fp32_weights(self):
        return self._zero_setting(True, "load_from_fp32_weights")

    def zero_ignore_unused_parameters(self):
        return self._zero_setting(True, "ignore_unused_parameters")

    def zero_round_robin_gradients(self):
        return self._zero_setting(False, "round_robin_gradients")

    def zero_use_cpu_optimizer(self):
        """True: zinf steps on the CPU whatever offload_optimizer says (so
        DeepSpeed's "offload_optimizer is cpu or nvme" reads differently
        for "none")."""
        return True

    def zero_nvme_offload_optimizer(self):
        return self._offload_device("offload_optimizer") == "nvme"

    def zero_allow_untested_optimizer(self):
        return bool(self._settings.get("zero_allow_untested_optimizer", False))

    def dataloader_drop_last(self):
        return bool(self._settings.get("dataloader_drop_last", False))

    def aio_config(self):
        """The aio block with DeepSpeed's defaults filled in."""
        aio = {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
               "overlap_events": True, "use_gds": False}
        aio.update({k: v for k, v in self._settings.get("aio", {}).items() if v != "auto"})
        if "thread_count" in aio and "intra_op_parallelism" not in self._settings.get("aio", {}):
            aio["intra_op_parallelism"] = aio["thread_count"]  # DeepSpeed's older name
        return aio

    def zero_gather_16bit_weights_on_model_save(self):
        """The config's stage3_gather_16bit_weights_on_model_save (zinf's
        save_16bit_model gathers whatever it says)."""
        zero = self._settings["zero_optimization"]
        return bool(zero.get("stage3_gather_16bit_weights_on_model_save",
                             zero.get("stage3_gather_fp16_weights_on_model_save", False)))

    def get_batch_info(self):
        """(train_batch_size, train_micro_batch_size_per_gpu,
        gradient_accumulation_steps), as DeepSpeed's."""
        return self._train_batch_size, self._micro_batch, self._accumulation

    def optimizer_name(self):
        """The optimizer passed in's class name, else the config's type (DeepSpeed's answer)."""
        return self._client_optimizer_name or self._settings.get("optimizer", {}).get("type")

    def optimizer_params(self):
        return self._settings.get("optimizer", {}).get("params")

    def scheduler_name(self):
        return (self._settings.get("scheduler") or {}).get("type")

    def scheduler_params(self):
        return (self._settings.get("scheduler") or {}).get("params")

    def wall_clock_breakdown(self):
        return bool(self._settings.get("wall_clock_breakdown", False))

    def dynamic_loss_scale(self):
        """fp16 with loss_scale 0 (DeepSpeed's "dynamic")."""
        return self.fp16_enabled() and float(self._settings.get("fp16", {}).get("loss_scale", 0)) == 0

    def initial_dynamic_scale(self):
        return 2.0 ** int(self._settings.get("fp16", {}).get("initial_scale_power", 16))

    @property
    def dp_world_size(self):
        return self.world_size

    @property
    def mp_world_size(self):
        return 1  # no model parallelism in zinf

    def get_global_grad_norm(self):
        return self._engine.stats()["last_grad_norm"]

    def was_step_applied(self):
        return self._step_applied

    def get_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_mom(self):
        """Each param group's betas (Adam, AdamW, Lion; None for Adagrad)."""
        return [group.get("betas") for group in self.optimizer.param_groups]

    @property
    def lr_scheduler(self):
        return self._scheduler

    @property
    def loss_scale(self):
        return self._engine.loss_scale

    @property
    def device(self):
        """Where the model computes (its parameters' device); inputs go there."""
        return self._device

    def timings(self):
        """Seconds spent per phase since the start, and the engine's own
        (parameter fetch wait and work, reductions, the last optimizer step)."""
        stats = self._engine.stats()
        out = dict(self._timings)
        out.update({"fetch_wait_s": stats["fetch_wait_s"], "fetch_busy_s": stats["fetch_busy_s"],
                    "reduce_busy_s": stats["reduce_busy_s"], "optimizer_step_s": stats["step_s"],
                    "gathers": stats["gathers"], "skipped_steps": stats["skipped_steps"],
                    "nvme_written_bytes": stats["nvme_written_bytes"], "nvme_read_bytes": stats["nvme_read_bytes"]})
        return out

    def _maybe_print(self):
        every = self.steps_per_print()
        if not every or self.global_steps % every or self.global_rank != 0:
            return
        message = f"zinf: step {self.global_steps}, lr {self.get_lr()[0]:.3g}, grad norm " \
                  f"{self.get_global_grad_norm():.4g}"
        samples_per_s = self.tput_timer.avg_samples_per_sec()
        if samples_per_s > 0:
            message += f", {samples_per_s:.4g} samples/s"
        if self._settings.get("wall_clock_breakdown"):
            # Per step, over the steps since the last line (timings() keeps
            # the totals); the optimizer's is the last step's.
            t = self.timings()
            before = self._timings_at_print
            steps = max(1, self.global_steps - self._timing_steps_at_print)
            per = {k: (t[k] - before.get(k, 0.0)) / steps
                   for k in ("forward_s", "backward_s", "step_s", "fetch_wait_s", "reduce_busy_s")}
            message += " | per step: forward %.3fs backward %.3fs step %.3fs (fetch wait %.3fs, reduce %.3fs; " \
                       "last optimizer step %.3fs)" % (per["forward_s"], per["backward_s"], per["step_s"],
                                                        per["fetch_wait_s"], per["reduce_busy_s"],
                                                        t["optimizer_step_s"])
            self._timings_at_print, self._timing_steps_at_print = t, self.global_steps
        stats = self._engine.stats()
        written, read = stats["nvme_written_bytes"], stats["nvme_read_bytes"]
        now = time.perf_counter()
        if written or read:
            # Per step over the interval, and as rates over its wall time
            # (what the drives sustained while training, every phase in).
            steps = max(1, self.global_steps - self._steps_at_print)
            seconds = max(now - self._last_print, 1e-9)
            read_step = (read - self._read_at_print) / steps
            written_step = (written - self._written_at_print) / steps
            message += " | NVMe read %s/step (%s/s), written %s/step (%s/s) (this rank)" % (
                _decimal_bytes(read_step), _decimal_bytes(read_step * steps / seconds),
                _decimal_bytes(written_step), _decimal_bytes(written_step * steps / seconds))
            tbw = self._settings.get("zinf", {}).get("tbw")
            if tbw and written_step > 0:
                message += ", a %g TBW drive lasts %.3g steps" % (tbw, tbw * 1e12 / written_step)
            self._written_at_print, self._read_at_print, self._steps_at_print = written, read, self.global_steps
        self._last_print = now
        print(message, flush=True)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True,
                        exclude_frozen_parameters=False):
        """Every rank's shards and optimizer states under save_dir/tag (tag
        defaults to global_step<N>), the engine's counters and client_state
        with them, and save_dir/latest naming the tag. Collective.
        exclude_frozen_parameters is taken and the frozen params are saved
        all the same (their shards are part of zinf's checkpoint: a resume
        needs nothing from elsewhere); it costs their disk space only."""
        tag = str(tag) if tag is not None else f"global_step{self.global_steps}"
        if self.world_size > 1:
            tag = self._agreed_tag(tag)
        path = os.path.join(save_dir, tag)
        self._engine.save_checkpoint(path)
        # Built on every rank, so an error here is every rank's (rank 0
        # failing alone would leave the others at the barrier).
        entries = self._module_entries()
        buffers = collections.OrderedDict((key, _host_copy(value)) for key, value in self._non_params(entries))
        aliases = self._tied_aliases(entries)
        if self.global_rank == 0:
            state = {"global_steps": self.global_steps, "global_samples": self.global_samples,
                     "micro_steps": self.micro_steps, "client_state": client_state or {},
                     "lr_scheduler": self._scheduler.state_dict() if self._scheduler is not None else None,
                     "param_groups": [_group_settings(g, self._kind) for g in self.optimizer.param_groups],
                     # What the engine's shards do not hold: the persistent
                     # buffers (rank 0's, as DeepSpeed saves them) and the
                     # names tied weights also go by (for zero_to_fp32).
                     "buffers": buffers, "aliases": aliases}
            torch.save(state, os.path.join(path, "zinf_engine_state.pt"))
            if save_latest:
                with open(os.path.join(save_dir, "latest"), "w") as file:
                    file.write(tag)
            # As DeepSpeed leaves its zero_to_fp32.py next to its checkpoints.
            with open(os.path.join(save_dir, "zero_to_fp32.py"), "w") as file:
                file.write(_ZERO_TO_FP32_SCRIPT)
        if self.world_size > 1:
            dist.barrier(group=self._host_group)
        return True

    def _agreed_tag(self, tag):
        """The tag every rank saves under: rank 0's. Each rank's shards go in
        one directory, so tags that differ (a per-rank tag) cannot each get
        their own as in DeepSpeed; checkpoint.tag_validation "Fail" makes
        that an AssertionError on every rank, "Warn" (the default) says so."""
        tags = [tag if self.global_rank == 0 else None]
        dist.broadcast_object_list(tags, src=0, group=self._host_group)
        differs = torch.tensor([int(tag != tags[0])], dtype=torch.int64)
        dist.all_reduce(differs, group=self._host_group)
        if differs.item():
            message = (f"save_checkpoint: the tag differs over the ranks ({differs.item()} of {self.world_size} "
                       f"differ from rank 0's {tags[0]!r}; this rank's is {tag!r})")
            if self._tag_validation == "fail":
                raise UsageError(message + ": checkpoint.tag_validation is \"Fail\"")
            if self._tag_validation == "warn":
                _log.warning("%s: every rank saves under rank 0's tag (zinf's ranks share one checkpoint "
                             "directory)", message)
        return tags[0]

    def _non_params(self, entries):
        """The (key, value) entries that are not the engine's params: the
        persistent buffers and modules' extra state, which load_state_dict
        restores beyond the parameters."""
        return [(key, value) for key, value in entries if not torch.is_tensor(value) or id(value) not in self._index]

    def _tied_aliases(self, entries):
        """{state-dict key: the name the engine holds the param under} for
        the keys of tied weights beyond their first."""
        registered = {id(p): name for name, p in self._named_unique}
        return {key: registered[id(value)] for key, value in entries
                if torch.is_tensor(value) and id(value) in registered and key != registered[id(value)]}

    def _check_buffers(self, saved, strict):
        """Before anything is loaded: the checkpoint's buffers against the
        model's (names when strict, shapes always)."""
        buffers = dict(self._non_params(self._module_entries()))
        if strict:
            missing, unexpected = sorted(set(buffers) - set(saved)), sorted(set(saved) - set(buffers))
            if missing or unexpected:
                raise ValueError(f"load_checkpoint: the checkpoint's buffers differ from the model's (missing "
                                 f"{missing}, unexpected {unexpected}); load_module_strict=False loads those "
                                 "both have")
        for key, value in buffers.items():
            if torch.is_tensor(value) and torch.is_tensor(saved.get(key)) and saved[key].shape != value.shape:
                raise ValueError(f"load_checkpoint: buffer {key} is {tuple(saved[key].shape)} in the checkpoint, "
                                 f"{tuple(value.shape)} in the model")

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """Restores what save_checkpoint wrote (tag from load_dir/latest when
        None); returns (path, client_state), or (None, None) with no tag.
        As DeepSpeed: load_optimizer_states=False takes the weights, the
        counters and (with load_lr_scheduler_states) the scheduler, with a
        fresh optimizer (zero moments, its step count from 0);
        load_module_only=True takes the weights alone (fine-tuning from a
        checkpoint). The params must be those saved; the persistent
        buffers are restored too, and load_module_strict=False lets the
        model's and the checkpoint's buffers differ (those both have are
        loaded). custom_load_fn (DeepSpeed's hook for loading the module
        state dict its own way) is refused: zinf restores the params from
        its shards, not from a module state dict."""
        if custom_load_fn is not None:
            raise ValueError("load_checkpoint(custom_load_fn=...): zinf restores the params from its own shards; "
                             "load the weights with GatheredParameters(modifier_rank=0) after load_checkpoint "
                             "instead")
        if tag is None:
            latest = os.path.join(load_dir, "latest")
            if not os.path.exists(latest):
                return None, None
            with open(latest) as file:
                tag = file.read().strip()
        path = os.path.join(load_dir, str(tag))
        # client_state may hold any picklable object (DeepSpeed's contract):
        # this file is the trainer's own, not weights from elsewhere.
        state = torch.load(os.path.join(path, "zinf_engine_state.pt"), weights_only=False)
        buffers = state.get("buffers")  # checkpoints from before buffers were saved have none
        if buffers is not None:
            self._check_buffers(buffers, load_module_strict)
        self._engine.load_checkpoint(path, optimizer_states=load_optimizer_states and not load_module_only)
        for _, p in self._named_unique:
            if id(p) in self._persistent:
                p.data = self._persistent_values(p)
        if buffers:
            # The module's own loading: buffers copied in place, extra state
            # through set_extra_state; the params (absent here) are left.
            self.module.load_state_dict(buffers, strict=False)
        if load_module_only:
            self.micro_steps = 0  # the engine's accumulation starts over with its fresh optimizer
            return path, state["client_state"]
        self.global_steps = state["global_steps"]
        self.global_samples = state["global_samples"]
        self.micro_steps = state["micro_steps"]
        if load_optimizer_states:
            saved = state.get("param_groups") or [{"lr": lr} for lr in state["param_groups_lr"]]
            for group, settings in zip(self.optimizer.param_groups, saved):
                group.update(settings)
        if load_lr_scheduler_states and self._scheduler is not None and state["lr_scheduler"] is not None:
            self._scheduler.load_state_dict(state["lr_scheduler"])
        return path, state["client_state"]

    def consolidated_state_dict(self, dtype=None):
        """{name: the whole parameter} from the fp32 masters, in `dtype`
        (default: the training precision). Collective; every rank gets it."""
        out = {}
        for name, p in self._named_unique:
            values = torch.empty(self._shapes[id(p)], dtype=torch.float32)
            self._engine.gather(self._index[id(p)], "param", values.data_ptr(), values.numel())
            out[name] = values.to(dtype or self._dtype)
        return out

    def _module_entries(self):
        """(state-dict key, value) of the module in load_state_dict's order:
        every name a parameter goes by (a tied weight under each of its
        names), the persistent buffers and any module's extra state."""
        return list(self.module.state_dict(keep_vars=True).items())

    def module_state_16bit(self, exclude_frozen_parameters=False, tied_once=False):
        """The module's state dict, whole: params in the working precision (a
        tied alias is the same tensor, or left out with tied_once),
        persistent buffers and extra state as this rank holds them, on the
        CPU. Loads into the model with load_state_dict(strict=True).
        Collective at stage 3 (params not whole on every rank are gathered
        from the masters); at stages 0-2 every rank's own copy, no
        collective."""
        out, whole = collections.OrderedDict(), {}
        for key, value in self._module_entries():
            if not torch.is_tensor(value) or id(value) not in self._index:
                out[key] = _host_copy(value)  # a buffer, or a module's get_extra_state()
                continue
            if exclude_frozen_parameters and not value.requires_grad:
                continue
            if id(value) in whole:
                if not tied_once:
                    out[key] = whole[id(value)]
                continue
            if id(value) in self._persistent:  # whole here already (every param below stage 3)
                out[key] = whole[id(value)] = _host_copy(value)
                continue
            values = torch.empty(self._shapes[id(value)], dtype=torch.float32)
            self._engine.gather(self._index[id(value)], "param", values.data_ptr(), values.numel())
            out[key] = whole[id(value)] = values.to(self._dtype)
        return out

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters=False):
        """DeepSpeed's name for module_state_16bit (at every stage here)."""
        return self.module_state_16bit(exclude_frozen_parameters)

    def module_state_dict(self, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
        """DeepSpeed's: the module's state dict, here with every parameter
        whole in the working precision. At stages 0-2 local, as DeepSpeed's
        (rank 0 alone may call it); at stage 3 collective (DeepSpeed's holds
        empty partitions there)."""
        state = self.module_state_16bit(exclude_frozen_parameters)
        out = destination if destination is not None else collections.OrderedDict()
        for key, value in state.items():
            out[prefix + key] = value
        return out

    def save_fp16_model(self, save_dir, save_filename="pytorch_model.bin"):
        """DeepSpeed's older name of save_16bit_model (still in its engine,
        and in scripts written for it)."""
        return self.save_16bit_model(save_dir, save_filename)

    def save_16bit_model(self, save_dir, save_filename="pytorch_model.bin", exclude_frozen_parameters=False):
        """The whole model in the working precision (16-bit with fp16/bf16)
        on rank 0: torch.save of the state dict under DeepSpeed's default
        name, or safetensors for a .safetensors name (a Hugging Face model
        loads either with from_pretrained(save_dir) next to its config).
        exclude_frozen_parameters leaves out those with requires_grad=False
        (an adapter's export). The persistent buffers (a norm's running
        statistics) are saved with the weights, and a tied weight under each
        of its names (safetensors: under the first only, as Hugging Face's
        save_pretrained does, since it refuses shared tensors; and without
        modules' extra state, which is not a tensor). Collective."""
        weights = self.module_state_16bit(exclude_frozen_parameters, tied_once=save_filename.endswith(".safetensors"))
        if self.global_rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            target = os.path.join(save_dir, save_filename)
            if save_filename.endswith(".safetensors"):
                from safetensors.torch import save_file
                # Tensors only: a module's extra state has no safetensors form.
                save_file({k: v.contiguous() for k, v in weights.items() if torch.is_tensor(v)}, target,
                          metadata={"format": "pt"})
            else:
                torch.save(weights, target)
        if self.world_size > 1:
            dist.barrier(group=self._host_group)
        return True

    save_fp16_model = save_16bit_model  # DeepSpeed's earlier name

    # -- construction helpers ----------------------------------------------------------------
    def _make_scheduler(self, lr_scheduler):
        """The scheduler passed to initialize (or built by the callable
        passed), else the config's "scheduler" block: DeepSpeed's order, in
        which the script's own wins over the config's."""
        block = self._settings.get("scheduler")
        if lr_scheduler is None:
            return lr_schedules.from_config(block, self.optimizer) if block is not None else None
        if block is not None and self.global_rank == 0:
            _log.info("zinf.initialize: the lr_scheduler passed is used; the config's \"scheduler\" (%s) is not",
                      block.get("type"))
        if not hasattr(lr_scheduler, "step"):
            return lr_scheduler(self.optimizer)  # a callable building one
        if self._client_optimizer is not None and getattr(lr_scheduler, "optimizer", None) is not \
                self._client_optimizer and self.global_rank == 0:
            _log.warning("zinf.initialize: the lr_scheduler passed was built on another optimizer than the one "
                         "passed; its rates reach no param zinf trains")
        return lr_scheduler

    def _make_dataloader(self, training_data, collate_fn):
        self._collate_fn = collate_fn  # deepspeed_io's default, as DeepSpeed keeps it
        if training_data is None:
            return None
        return self.deepspeed_io(training_data, collate_fn=collate_fn)

    def deepspeed_io(self, dataset, batch_size=None, route="train", pin_memory=True, data_sampler=None,
                     collate_fn=None, num_local_io_workers=None):
        """DeepSpeed's: a DataLoader over `dataset` giving this rank its
        micro-batches (train_micro_batch_size_per_gpu unless batch_size),
        collated by `collate_fn` or initialize's. The samplers are
        DeepSpeed's unless data_sampler is given: route "train" shuffles (a
        DistributedSampler over the ranks, a RandomSampler for one);
        "eval" and "predict" keep the order (DistributedSampler without
        shuffling). dataloader_drop_last from the config; pinned batches
        when the model is on a GPU."""
        if not isinstance(dataset, torch.utils.data.Dataset):
            raise ValueError(f"deepspeed_io: the data must be a torch.utils.data.Dataset, not {type(dataset).__name__}")
        if data_sampler is None and not isinstance(dataset, torch.utils.data.IterableDataset):
            if route in ("eval", "predict"):
                data_sampler = torch.utils.data.distributed.DistributedSampler(
                    dataset, num_replicas=self.world_size, rank=self.global_rank, shuffle=False)
            elif self.world_size > 1:
                data_sampler = torch.utils.data.distributed.DistributedSampler(
                    dataset, num_replicas=self.world_size, rank=self.global_rank)
            else:
                data_sampler = torch.utils.data.RandomSampler(dataset)
        if collate_fn is None:
            collate_fn = self._collate_fn
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size or self._micro_batch, sampler=data_sampler,
                                           collate_fn=collate_fn, num_workers=num_local_io_workers or 0,
                                           pin_memory=bool(pin_memory) and self._device.type == "cuda",
                                           drop_last=bool(self._settings.get("dataloader_drop_last", False)))

    def close(self):
        """Stops the engine's worker and frees its memory (also at exit)."""
        self._engine.close()

    destroy = close  # DeepSpeed's name

    def empty_partition_cache(self):
        """Frees what stage 3 keeps gathered between uses (params fetched
        ahead, idle device buffers), as DeepSpeed's does before a phase that
        needs the memory (generation, evaluation). Outside forward and
        backward."""
        for unit in self._units:
            if self.stage >= 3 and not (unit.forward_open or unit.backward_open or unit.held_by):
                self._release(unit)
        self._engine.empty_partition_cache()

    # -- full values of one param (zinf.utils.safe_get_full_*) ---------------------------------
    def _full_values(self, p, what):
        """The whole fp32 master ("param"), gradient ("grad") or optimizer
        state of `p`, shaped as the param, on the model's device. Collective."""
        index = self._trained_index(p)
        values = torch.empty(self._shapes[id(p)], dtype=torch.float32)
        self._engine.gather(index, what, values.data_ptr(), values.numel())
        return values.to(self._device)

    def _set_full_values(self, p, what, value):
        """Each rank keeps its shard of `value` (every rank passes the same
        whole value, as DeepSpeed's setters ask)."""
        index = self._trained_index(p)
        shape = self._shapes[id(p)]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self._name_of(p)}: a value of shape {tuple(value.shape)} for a parameter of shape "
                             f"{tuple(shape)}")
        values = value.detach().to("cpu", torch.float32).contiguous()
        self._engine.set_values(index, what, values.data_ptr(), values.numel())
        if what == "param":
            self._refresh_param(p, values)

    def _local_values(self, p, what):
        """This rank's shard of `p`'s master, gradient or optimizer state:
        1-D, as DeepSpeed's ds_tensor (zeros past the param's end)."""
        index = self._local_index(p)
        values = torch.empty(self._engine.describe(index)["shard_elements"], dtype=torch.float32)
        self._engine.local(index, what, values.data_ptr(), values.numel())
        return values.to(self._device)

    def _local_working(self, p):
        """param.ds_tensor (zinf.zero._ds_tensor): this rank's shard of the
        working copy, 1-D, in the training dtype, on the CPU with
        offload_param cpu or nvme, else on the model's device."""
        index = self._index.get(id(p))
        if index is None or self._engine.closed:
            raise AttributeError("ds_tensor: the parameter is not one this engine partitions (or the engine was "
                                 "closed)")
        shard = self._engine.describe(index)["shard_elements"]
        values = torch.empty(shard, dtype=torch.float32)
        self._engine.local(index, "working", values.data_ptr(), values.numel())
        out = values.to(device="cpu" if self.zero_offload_param() else self._device, dtype=self._dtype)
        out.ds_numel = shard
        return out

    def _set_local_values(self, p, what, value):
        index = self._local_index(p)
        shard = self._engine.describe(index)["shard_elements"]
        values = value.detach().to("cpu", torch.float32).contiguous().view(-1)
        if values.numel() != shard:
            raise ValueError(f"{self._name_of(p)}: {values.numel()} values for this rank's shard of {shard}")
        self._engine.set_local(index, what, values.data_ptr(), values.numel())
        if what == "param":
            gathered = self._owner[id(p)].gathered and id(p) not in self._persistent
            self._refresh_param(p, self._full_values(p, "param").cpu() if gathered else None)

    def _local_index(self, p):
        if self.stage < 3:
            raise UsageError("This API is only defined for ZeRO-3 partitioned parameters")
        return self._trained_index(p)

    def _trained_index(self, p):
        index = self._index.get(id(p))
        if index is None:
            raise ValueError("the parameter is not one this engine trains")
        return index

    def _refresh_param(self, p, whole):
        """p's tensor after its master changed to `whole` (fp32): a persistent
        param's (every param's below stage 3) is the engine's new working copy;
        a gathered one's the new values in the working precision (the
        engine's gathered buffer may be gone already: a unit gathered on
        demand stays gathered here until backward); else empty."""
        if id(p) in self._persistent:
            p.data = self._persistent_values(p)
        elif self._owner[id(p)].gathered and whole is not None:
            p.data = whole.view(self._shapes[id(p)]).to(self._device, self._dtype)
        elif not self._owner[id(p)].gathered:
            p.data = self._empty()
        self._mark(p)

    def _name_of(self, p):
        return next((n for n, q in self._named_unique if q is p), "a parameter")


def _half_inputs(value):
    if isinstance(value, torch.Tensor):
        return value.half() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_half_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: _half_inputs(v) for k, v in value.items()}
    return value


def _decimal_bytes(count):
    """'1.25 GB', '310 MB', '24.6 kB': three significant digits, as drives count."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return "%.3g %s" % (count / size, unit)
    return "%d B" % count


def _fill_from_stage(stage):
    """finalize()'s initializer for a param staged by zinf.zero.Init: the
    engine asks for pieces of this rank's shard, by flattened offset."""
    def fill(offset, view):
        out = torch.frombuffer(view, dtype=torch.float32)
        local = offset - stage.start
        if local < 0 or local + out.numel() > stage.count:
            raise ValueError(f"zinf.zero.Init: elements [{offset}, {offset + out.numel()}) asked of a shard "
                             f"holding [{stage.start}, {stage.start + stage.count}): the world size changed "
                             "between Init and initialize")
        out.copy_(stage.values()[local:local + out.numel()])
    return fill


def _named_units(model, chosen=None):
    """zinf.torch.offload's units (or the caller's), each module once (T5's
    encoder and decoder hold the very embedding module `shared` is)."""
    names = {id(m): n for n, m in model.named_modules()}
    units = list(chosen) if chosen is not None else _units(model)
    for unit in units:
        if id(unit) not in names:
            raise ValueError(f"units: a {type(unit).__name__} that is not a submodule of the model")
    return [(unit, names[id(unit)]) for unit in {id(u): u for u in units}.values()]


def init_distributed(dist_backend=None, auto_mpi_discovery=True, distributed_port=29500, verbose=True,
                     timeout=None, init_method=None, dist_init_required=None, config=None, rank=-1, world_size=-1,
                     **unused):
    """DeepSpeed's init_distributed: the default process group from
    torchrun's variables (or, with auto_mpi_discovery, an MPI launcher's,
    MASTER_ADDR set by the user), or from an explicit init_method / rank /
    world_size; nothing for a single process. The backend is the script's
    (None: Gloo); zinf's engine runs its own collectives over NCCL when the
    default group is NCCL and the model is on GPUs (one per rank), else over
    Gloo on host memory (a Gloo group beside an NCCL default). Returns
    (rank, world size)."""
    if dist_backend not in (None, "gloo", "nccl"):
        raise ValueError(f"init_distributed: backend {dist_backend!r}: gloo or nccl")
    if auto_mpi_discovery and init_method is None and rank < 0:
        from_mpi_launcher(distributed_port)
    seconds = timeout.total_seconds() if timeout is not None else None
    return init_from_environment(seconds, backend=dist_backend or "gloo", init_method=init_method, rank=rank,
                                 world_size=world_size)


def add_config_arguments(parser):
    """DeepSpeed's --deepspeed and --deepspeed_config arguments."""
    group = parser.add_argument_group("DeepSpeed (zinf)")
    group.add_argument("--deepspeed", action="store_true", help="train with zinf (DeepSpeed's flag)")
    group.add_argument("--deepspeed_config", default=None, type=str, help="DeepSpeed JSON config")
    return parser


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
               lr_scheduler=None, mpu=None, dist_init_required=None, collate_fn=None, config=None,
               config_params=None, units=None, **unused):
    """DeepSpeed's initialize: returns (engine, optimizer, training_dataloader,
    lr_scheduler). `config` (or config_params, or args.deepspeed_config) is a
    DeepSpeed JSON path or dict. `optimizer` may be a torch Adam/AdamW/Adagrad
    (its settings are taken) or a callable building one; `model_parameters`
    must be the model's own parameters when given (zinf trains them all).
    `units` (zinf's own): the modules stage 3 gathers as one, instead of the
    ones zinf.torch.offload would choose (layers, embeddings, head); each
    must be a module whose forward runs, and params in none of them are
    gathered with the whole model's forward."""
    if model is None:
        raise ValueError("initialize: model is required")
    if mpu is not None:
        raise ValueError("initialize: mpu (model parallelism) is not supported by zinf")
    config = config if config is not None else config_params
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    if config is None:
        raise ValueError("initialize: config is required (a DeepSpeed JSON path or dict)")
    settings = _load_config(config)
    groups = None
    if model_parameters is not None:
        # Params, or param groups (dicts with "params" and their own
        # "weight_decay", as Hugging Face scripts give biases and norms
        # none): zinf trains the whole model, so they must be all of it.
        groups = []
        given = set()
        items = [model_parameters] if isinstance(model_parameters, torch.Tensor) else list(model_parameters)
        loose = [item for item in items if not isinstance(item, dict)]
        if loose:
            groups.append({"params": loose})
        groups.extend(dict(item, params=list(item["params"])) for item in items if isinstance(item, dict))
        for group in groups:
            for p in group["params"]:
                given.add(id(p))
        own = {id(p) for p in model.parameters()}
        if not given <= own:
            raise ValueError("model_parameters: holds tensors that are not the model's parameters; zinf trains "
                             "the model's own (pass model.parameters(), a subset, or param groups of them)")
        # Params that require a gradient but were left out: DeepSpeed's
        # optimizer never steps them, so they keep their values. zinf
        # freezes them (no gradient is computed for them at all).
        left_out = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in given]
        if left_out:
            _log.warning("zinf.initialize: %d parameter(s) that require a gradient are not in model_parameters "
                         "(%s%s): they are not trained, as DeepSpeed's optimizer leaves them; zinf sets their "
                         "requires_grad to False", len(left_out), ", ".join(left_out[:3]),
                         ", ..." if len(left_out) > 3 else "")
            for p in model.parameters():
                if id(p) not in given:
                    p.requires_grad_(False)
    engine = ZinfEngine(model, settings, optimizer=optimizer, lr_scheduler=lr_scheduler,
                        training_data=training_data, collate_fn=collate_fn, units=units, param_groups=groups)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler

"""zinf.torch.offload: keep a module's parameters on NVMe (or in pinned host
memory) and stream them in, unit by unit, around forward and backward.

    handle = zinf.torch.offload(model, config)   # DeepSpeed JSON (dict or path)
    loss = model(x).sum(); loss.backward()        # params fetched as needed
    with handle.materialized():                   # every param present ...
        optimizer.step(); optimizer.zero_grad()   # ... and written back after

A unit is a child module of the model holding parameters; containers
(nn.Sequential, nn.ModuleList, nn.ModuleDict) and modules that hold a stack
of layers (a Hugging Face model's decoder) are looked into, so each layer is
a unit. Parameters registered directly on a module that is looked into stay
in memory. Before a unit's forward
its parameters are read in (the next unit's read is already under way:
prefetch by the order recorded in the first forward); after it they are
dropped. Backward reads them again through an autograd hook on the unit's
outputs, and drops them once the gradient has flowed through the unit's
inputs. Gradients (param.grad) stay in memory, whole, as in plain PyTorch.
Outputs and gradients are those of the plain module: the values round-trip
exactly.

Training a model larger than memory: pass `optimizer=` a function that
builds an optimizer for a list of parameters (zinf.CPUAdam, say). Each unit
then gets its own optimizer, and during backward, as soon as every gradient
of a unit has arrived, the unit is stepped, its new values are stored and
its gradients dropped (and with "nvme" the unit's optimizer states go to
NVMe between its steps): memory holds a few units, their gradients and
their states, never the whole model. Call handle.step_done() (or let the next forward do it)
after backward; with this mode there is no optimizer.step() in the loop.

state_dict() and load_state_dict() work at any time: outside materialized()
the stored values are read on demand (state_dict returns CPU copies), so a
checkpoint saved by a trainer (Hugging Face's Trainer, torch.save) holds the
model. The handle's directory inside nvme_path goes when the handle is
closed (or used as a context manager), garbage-collected, or at exit.

Config keys: zero_optimization.offload_param.device ("nvme" or "cpu") and
nvme_path, and the "aio" block.
"""
import contextlib
import json
import logging
import os
import shutil
import tempfile
import weakref

import torch as _torch

from . import _zinf
from .errors import DeepSpeedConfigError
from .swap import TensorSwapper

_CONTAINERS = (_torch.nn.Sequential, _torch.nn.ModuleList, _torch.nn.ModuleDict)
_log = logging.getLogger("zinf")


def _load_config(config):
    if isinstance(config, (str, os.PathLike)):
        with open(config) as file:
            config = file.read()
    text = config if isinstance(config, str) else json.dumps(config)
    problems = _zinf.check_config(text)
    if problems:
        raise DeepSpeedConfigError("; ".join(problems))
    return json.loads(text)


def _has_params(module):
    return any(True for _ in module.parameters())


def _has_layer_stack(module):
    """True when `module` holds (at any depth) a ModuleList or Sequential of
    two or more modules with parameters: a stack of layers, as a Hugging
    Face model's decoder has, whose layers should be units of their own."""
    for inner in module.modules():
        if inner is not module and isinstance(inner, _CONTAINERS):
            if sum(1 for c in inner.children() if _has_params(c)) >= 2:
                return True
    return False


def _units(module):
    units = []
    for child in module.children():
        if getattr(child, "_z3_leaf", False):  # zinf.utils.set_z3_leaf_modules: gathered whole
            if _has_params(child):
                units.append(child)
        elif isinstance(child, _CONTAINERS) or _has_layer_stack(child):
            units.extend(_units(child))
        elif _has_params(child):
            units.append(child)
    return units


class _LinearSavingParams(_torch.autograd.Function):
    """F.linear whose backward keeps the parameter, not a view of its data.
    torch's linear saves weight.t(), a view that holds the gathered values
    alive until backward: every layer's weights would stay in memory through
    the whole forward. Saved as the parameter itself, the memory goes when
    the unit is released and backward sees the values gathered again for
    it (DeepSpeed's stage 3 wraps linear for the same reason)."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input, weight, bias)
        return _original_linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        input, weight, bias = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = grad.matmul(weight)
        if ctx.needs_input_grad[1]:
            grad_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(input.reshape(-1, input.shape[-1]))
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_input, grad_weight, grad_bias


_original_linear = _torch.nn.functional.linear


def _linear(input, weight, bias=None):
    """torch.nn.functional.linear once zinf streams parameters: a weight zinf
    gathers and drops (marked _zinf_streamed) is saved for backward as
    itself (_LinearSavingParams); anything else goes to torch's linear. A
    replacement of the function, not a torch function mode, so a layer
    recomputed in backward by activation checkpointing (Hugging Face's
    checkpoints forward, outside the module hooks) saves the very tensors
    its forward saved, which torch's non-reentrant checkpoint checks."""
    if getattr(weight, "_zinf_streamed", False) and _torch.is_grad_enabled():
        return _LinearSavingParams.apply(input, weight, bias)
    return _original_linear(input, weight, bias)


def _stream(params):
    """Marks params zinf gathers and drops, and puts _linear in place of
    torch.nn.functional.linear (once per process; other weights take
    torch's own path through it, as DeepSpeed's stage 3 does)."""
    _torch.nn.functional.linear = _linear
    for p in params:
        p._zinf_streamed = True


class _OnDemandFetch(_torch.overrides.TorchFunctionMode):
    """Sees each op's arguments during a forward: an empty (offloaded)
    parameter reaching one is fetched first (OffloadHandle._fetch_on_demand;
    zinf.engine has the same for zinf.initialize)."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") not in ("__get__", "__set__"):  # not zinf's own `param.data = ...`
            for value in list(args) + list(kwargs.values()):
                for t in (value if isinstance(value, (list, tuple)) else (value,)):
                    if isinstance(t, _torch.nn.Parameter) and t.numel() == 0:
                        self.handle._fetch_on_demand(t)
        return func(*args, **kwargs)


class _OnBackward(_torch.autograd.Function):
    """Passes tensors through; its backward calls `action` first. On a
    unit's outputs it runs before the unit's backward (to fetch the
    parameters), on its inputs after it (to drop them)."""

    @staticmethod
    def forward(ctx, action, *tensors):
        ctx.action = action
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    def backward(ctx, *grads):
        ctx.action()
        return (None,) + grads


class OffloadHandle:
    def __init__(self, module, config, device=None, units=None, optimizer=None):
        settings = _load_config(config)
        zero = settings.get("zero_optimization", {})
        block = zero.get("offload_param", {})
        kind = block.get("device", "none")
        if kind not in ("nvme", "cpu"):
            raise ValueError(f'zero_optimization.offload_param.device is "{kind}": offload needs "nvme" or "cpu"')
        aio = settings.get("aio", {})
        # offload_param.pin_memory (DeepSpeed's default true): page-locked
        # host copies for "cpu"; false keeps them in ordinary memory.
        self._pin = bool(block.get("pin_memory", True))
        self.module = module
        # Each module once: T5's encoder and decoder hold the very embedding
        # module `shared` is, and two units over one module would step its
        # params twice.
        self.units = list({id(u): u for u in (units if units is not None else _units(module))}.values())
        if not self.units:
            raise ValueError("offload: the module has no child modules with parameters")
        self.device = _torch.device(device) if device is not None else next(module.parameters()).device
        self._tmp = None
        if kind == "nvme":
            paths = block.get("nvme_path")
            if not paths:
                raise ValueError("zero_optimization.offload_param.nvme_path is required when device is \"nvme\"")
            paths = paths if isinstance(paths, list) else [paths]
            # A fresh directory per handle inside each nvme_path (created if
            # missing, as DeepSpeed does). It goes when the handle is closed,
            # collected, or the interpreter exits, and if this constructor
            # fails: a forgotten handle must not leave GiBs on the disk.
            self._tmp = []
            self._cleanup = weakref.finalize(self, _remove_directories, self._tmp)
            try:
                for path in paths:
                    _make_nvme_path(path)
                    self._tmp.append(tempfile.mkdtemp(prefix="zinf-offload.", dir=path))
                self._swapper = TensorSwapper(self._tmp, block_size=aio.get("block_size", 1 << 20),
                                              queue_depth=aio.get("queue_depth", 32),
                                              intra_op_parallelism=aio.get("intra_op_parallelism", 2), sync=False)
            except BaseException:
                self._cleanup()
                raise
        else:
            self._swapper = None
            self._host = {}
            self._cleanup = None
        try:
            self._setup(module, optimizer)
        except BaseException:
            self.close()
            raise

    def _setup(self, module, optimizer):
        self._params = []  # per unit: [(key, param)]
        self._present = [False] * len(self.units)
        self._order = []    # unit indices in the first forward's order
        self._recording = True
        self.stats = {"fetches": 0, "prefetches": 0, "unit_steps": 0}
        names = {id(p): n for n, p in module.named_parameters()}
        self._optimizers = []      # per unit, in step-in-backward mode
        # With params on a GPU the optimizer steps host copies (ZeRO-Offload's
        # way): per unit, one CPU Parameter per param, filled only while the
        # unit is stepped (CPU optimizers step CPU tensors).
        self._host_params = []
        # Host tensors that non_blocking copies to the device still read,
        # with the event that marks the copies done: they must not be freed
        # (or overwritten) before that.
        self._copies_in_flight = []
        self._accumulators = []    # keeps each param's AccumulateGrad node (and its hook) alive
        self._arrived = [set() for _ in self.units]
        self._stepped = [False] * len(self.units)
        for index, unit in enumerate(self.units):
            params = [(names.get(id(p), f"unit{index}.{n}"), p) for n, p in unit.named_parameters()]
            self._params.append(params)
            if optimizer is not None:
                if self.device.type == "cpu":
                    self._optimizers.append(optimizer([p for _, p in params]))
                else:
                    hosts = [_torch.nn.Parameter(_torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad)
                             for _, p in params]
                    self._host_params.append(hosts)
                    self._optimizers.append(optimizer(hosts))
                for position, (_, p) in enumerate(params):
                    if p.requires_grad:
                        with _torch.enable_grad():
                            node = p.expand_as(p).grad_fn.next_functions[0][0]
                        node.register_hook(self._make_grad_hook(index, position))
                        self._accumulators.append(node)
        # Everything is stored before any param is emptied, so a failure
        # (a full disk, say) leaves the module as it was.
        for params in self._params:
            for key, p in params:
                self._store(key, p.detach())
        if self._swapper is not None:
            self._swapper.commit()
        _stream(p for params in self._params for _, p in params)
        for index, unit in enumerate(self.units):
            for key, p in self._params[index]:
                p.data = _torch.empty(0, dtype=p.dtype, device=self.device)
            unit.register_forward_pre_hook(self._make_pre_hook(index))
            unit.register_forward_hook(self._make_post_hook(index))
            # state_dict() and load_state_dict() see the real values (read
            # on demand), never the empty placeholders: a checkpoint saved
            # outside materialized() must hold the model.
            unit._register_state_dict_hook(self._make_state_dict_hook(index))
            unit._register_load_state_dict_pre_hook(self._make_load_pre_hook(index), with_module=True)
            unit.register_load_state_dict_post_hook(self._make_load_post_hook(index))
        self._loading = set()
        self._release_after_backward = False
        self._materializing = 0
        # A param used outside its units' forward (a parent reading
        # self.child.weight) is fetched by the first op it reaches: a torch
        # function mode is active from the module's forward pre-hook to its
        # post-hook.
        self._unit_of = {}
        self._sharers = {}  # param id -> every unit holding it
        for index, params in enumerate(self._params):
            for _, p in params:
                self._unit_of.setdefault(id(p), index)
                self._sharers.setdefault(id(p), []).append(index)
        self._names = {id(p): key for params in self._params for key, p in params}
        self._on_demand = set()
        self._logged_on_demand = set()
        self._mode = None
        module.register_forward_pre_hook(self._enter_forward)
        module.register_forward_hook(self._leave_forward)

    # -- storage ---------------------------------------------------------------
    def _store(self, key, value):
        value = value.to("cpu").contiguous()
        if self._swapper is None and key in self._host:
            self._finish_copies(wait=True)  # an in-flight copy may still read the pinned copy
        if self._swapper is not None:
            self._swapper.swap_out(key, value)
        elif key in self._host:
            self._host[key].copy_(value)  # shapes never change: reuse the pinned copy
        elif not self._pin or value.numel() == 0:
            self._host[key] = value.clone()
        else:
            pinned = _zinf.PinnedMemory(value.numel() * value.element_size())
            host = _torch.frombuffer(pinned, dtype=value.dtype, count=value.numel()).view(value.shape)
            host.copy_(value)
            self._host[key] = host

    def _prefetch(self, index):
        if self._swapper is not None and 0 <= index < len(self.units) and not self._present[index]:
            self._swapper.prefetch([key for key, _ in self._params[index]])
            self.stats["prefetches"] += 1

    def _next_in_order(self, index, backward):
        if self._recording or index not in self._order:
            return None
        at = self._order.index(index)
        at += -1 if backward else 1
        return self._order[at] if 0 <= at < len(self._order) else None

    def _finish_copies(self, wait=False):
        """Drops the host tensors of device copies that are done (all of
        them, waiting, with wait=True)."""
        still = []
        for event, tensors in self._copies_in_flight:
            if wait:
                event.synchronize()
            elif not event.query():
                still.append((event, tensors))
        self._copies_in_flight = still

    def _fetch(self, index, backward=False):
        if not self._present[index]:
            on_device = self.device.type != "cpu"
            if on_device:
                self._finish_copies()
            sources = []
            for key, p in self._params[index]:
                if self._swapper is not None:
                    value = self._swapper.swap_in(key)
                else:
                    value = self._host[key]
                if on_device:
                    # Asynchronous from page-locked memory: `value` is kept
                    # (below) until the copy is done, as releasing it could
                    # free its pages mid-copy.
                    p.data = value.to(self.device, non_blocking=True)
                    sources.append(value)
                else:
                    p.data = value if self._swapper is not None else value.clone()
                if self._swapper is not None:
                    self._swapper.release(key)
            if on_device and self.device.type == "cuda" and sources:
                event = _torch.cuda.Event()
                event.record(_torch.cuda.current_stream(self.device))
                self._copies_in_flight.append((event, sources))
            elif on_device:
                _device_synchronize(self.device)  # another device kind: no events to hold them by
            self._present[index] = True
            self.stats["fetches"] += 1
        following = self._next_in_order(index, backward)
        if following is not None:
            self._prefetch(following)

    def _release(self, index):
        if self._present[index]:
            self._present[index] = False
            for _, p in self._params[index]:
                # A param shared with a unit still present (a tied head and
                # embedding) stays until the last of them goes.
                if not any(self._present[j] for j in self._sharers.get(id(p), ())):
                    p.data = _torch.empty(0, dtype=p.dtype, device=self.device)

    # -- step in backward ---------------------------------------------------------
    def _make_grad_hook(self, index, position):
        def grad_hook(grad_inputs, grad_outputs):
            arrived = self._arrived[index]
            if not arrived:
                # Units whose params did not all get gradients this pass are
                # stepped when backward ends.
                _torch.autograd.Variable._execution_engine.queue_callback(self.step_done)
            arrived.add(position)
            wanted = sum(1 for _, p in self._params[index] if p.requires_grad)
            if len(arrived) == wanted:
                self._step_unit(index)
        return grad_hook

    def _step_unit(self, index):
        if self._stepped[index]:
            return
        self._stepped[index] = True
        self._fetch(index)
        optimizer = self._optimizers[index]
        self._restore_states(index, optimizer)
        if self.device.type == "cpu":
            optimizer.step()
            stepped = [p for _, p in self._params[index]]
        else:
            # GPU params: the CPU optimizer steps host copies of the values
            # and gradients; the results are stored from the host.
            stepped = self._host_params[index]
            for (_, p), host in zip(self._params[index], stepped):
                host.data = p.detach().to("cpu", copy=True)
                host.grad = p.grad.detach().to("cpu") if p.grad is not None else None
            optimizer.step()
        self.stats["unit_steps"] += 1
        for (key, p), value in zip(self._params[index], stepped):
            self._store(key, value.detach())
            p.grad = None
            if value is not p:
                value.grad = None
                value.data = _torch.empty(0, dtype=value.dtype)
        self._offload_states(index, optimizer)
        if self._swapper is not None:
            self._swapper.commit()
        # Every op that used the unit's params has run its backward (their
        # gradients all arrived), so the values can go.
        self._release(index)
        self._arrived[index] = set()

    # With NVMe offload the unit's optimizer states (Adam's moments...) go
    # to NVMe between its steps too, under "<param>.<state>" keys.
    def _optimized(self, index):
        """(key, the tensor the unit's optimizer steps): the param itself,
        or its host copy when params are on a GPU."""
        if self.device.type == "cpu":
            return self._params[index]
        return [(key, host) for (key, _), host in zip(self._params[index], self._host_params[index])]

    def _offload_states(self, index, optimizer):
        if self._swapper is None:
            return
        for key, p in self._optimized(index):
            state = optimizer.state.get(p)
            if not state:
                continue
            names = [name for name, value in state.items()
                     if isinstance(value, _torch.Tensor) and value.numel() > 1]
            for name in names:
                self._swapper.swap_out(f"{key}.{name}", state[name])
                state[name] = None
            state["_zinf_offloaded"] = names

    def _restore_states(self, index, optimizer):
        if self._swapper is None:
            return
        for key, p in self._optimized(index):
            state = optimizer.state.get(p)
            if not state or "_zinf_offloaded" not in state:
                continue
            names = state.pop("_zinf_offloaded")
            self._swapper.prefetch([f"{key}.{name}" for name in names])
            for name in names:
                state[name] = self._swapper.swap_in(f"{key}.{name}")
                self._swapper.release(f"{key}.{name}")

    def step_done(self):
        """Steps the units whose gradients only partly arrived (params unused
        in this pass) and readies the next pass; called at the end of
        backward, and safe to call again."""
        for index, arrived in enumerate(self._arrived):
            if arrived and not self._stepped[index]:
                self._step_unit(index)
        self._arrived = [set() for _ in self.units]
        self._stepped = [False] * len(self.units)

    # -- hooks -------------------------------------------------------------------
    def _make_pre_hook(self, index):
        def pre_hook(unit, inputs):
            if self._recording:
                self._order.append(index)
            self._fetch(index)
            if _torch.is_grad_enabled():
                tensors = [x for x in inputs if isinstance(x, _torch.Tensor)]
                if any(t.requires_grad for t in tensors):
                    wrapped = _OnBackward.apply(lambda: self._release(index), *inputs)
                    return wrapped if isinstance(wrapped, tuple) else (wrapped,)
            return None
        return pre_hook

    def _make_post_hook(self, index):
        def post_hook(unit, inputs, outputs):
            if index == self._order[-1] and self._recording and len(self._order) == len(self.units):
                self._recording = False
            self._release(index)
            if not _torch.is_grad_enabled():
                return None
            # The unit is fetched again before its own backward runs.
            return _before_backward_of(outputs, lambda: self._backward_fetch(index))
        return post_hook

    def _backward_fetch(self, index):
        # A unit whose inputs carry no gradient (the embeddings) is never
        # released by its inputs' hook: whatever backward fetched goes when
        # backward ends.
        if not self._release_after_backward:
            self._release_after_backward = True
            _torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        self._fetch(index, backward=True)

    def _enter_forward(self, module, inputs):
        if self._mode is None:
            self._mode = _OnDemandFetch(self)
            self._mode.__enter__()

    def _leave_forward(self, module, inputs, outputs):
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        if not self._on_demand:
            return None
        if not _torch.is_grad_enabled():
            for index in self._on_demand:
                self._release(index)
            self._on_demand.clear()
            return None
        # Kept for backward, dropped when it ends.
        return _before_backward_of(outputs, self._arm_end_of_backward)

    def _arm_end_of_backward(self):
        self._on_demand.clear()
        if not self._release_after_backward:
            self._release_after_backward = True
            _torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _fetch_on_demand(self, p):
        index = self._unit_of.get(id(p))
        if index is None or self._present[index]:
            return
        if id(p) not in self._logged_on_demand:
            self._logged_on_demand.add(id(p))
            _log.warning("zinf: parameter %s is used outside its unit's forward: its unit is fetched on demand "
                         "and kept until backward is done", self._names.get(id(p), "?"))
        self._fetch(index)
        self._on_demand.add(index)

    def _end_of_backward(self):
        self._release_after_backward = False
        if self._materializing == 0:
            self.release_all()

    # -- state_dict / load_state_dict ----------------------------------------------
    def _stored_values(self, index):
        """{key: a CPU copy of the stored value} for unit `index`."""
        if self._swapper is not None:
            self._swapper.prefetch([key for key, _ in self._params[index]])
        values = {}
        for key, _ in self._params[index]:
            if key in values:
                continue
            if self._swapper is not None:
                values[key] = self._swapper.swap_in(key).clone()
                self._swapper.release(key)
            else:
                values[key] = self._host[key].clone()
        return values

    def _make_state_dict_hook(self, index):
        local = {}  # param id -> its names inside the unit (tied params have several)
        for name, p in _all_named_parameters(self.units[index]):
            local.setdefault(id(p), []).append(name)

        def state_dict_hook(unit, state_dict, prefix, local_metadata):
            if self._present[index]:
                return None  # the params hold their values
            values = None
            for key, p in self._params[index]:
                for name in local.get(id(p), ()):
                    if prefix + name not in state_dict:
                        continue
                    if values is None:
                        values = self._stored_values(index)
                    state_dict[prefix + name] = values[key]
            return None
        return state_dict_hook

    def _make_load_pre_hook(self, index):
        def load_pre_hook(unit, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                          error_msgs):
            if not self._present[index]:
                self._fetch(index)
                self._loading.add(index)  # stored and dropped again after the load
        return load_pre_hook

    def _make_load_post_hook(self, index):
        def load_post_hook(unit, incompatible_keys):
            was_fetched_for_load = index in self._loading
            self._loading.discard(index)
            for key, p in self._params[index]:
                self._store(key, p.detach())
            if self._swapper is not None:
                self._swapper.commit()
            if was_fetched_for_load:
                self._release(index)
        return load_post_hook

    # -- whole-model access ---------------------------------------------------------
    def release_all(self):
        for index in range(len(self.units)):
            self._release(index)

    @contextlib.contextmanager
    def materialized(self, write_back=True):
        """Every parameter present (for an optimizer step, a state_dict);
        on exit the values are stored again (write_back) and dropped."""
        self._materializing += 1
        try:
            for index in range(len(self.units)):
                self._fetch(index)
            yield self.module
        finally:
            self._materializing -= 1
            if write_back:
                for params in self._params:
                    for key, p in params:
                        self._store(key, p.detach())
                if self._swapper is not None:
                    self._swapper.commit()
            self.release_all()

    def wrap_optimizer(self, optimizer):
        """`optimizer` (over the module's parameters, e.g. zinf.CPUAdam) as
        one whose step() runs inside materialized(): for trainers that call
        optimizer.step() themselves (Hugging Face's Trainer). The whole
        model is in memory during the step only."""
        return MaterializedOptimizer(self, optimizer)

    def close(self):
        """Removes the offload directories (also done when the handle is
        garbage-collected or the interpreter exits)."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class MaterializedOptimizer(_torch.optim.Optimizer):
    """An optimizer stepping inside an OffloadHandle's materialized(): the
    wrapped optimizer's param_groups and state are this one's, so LR
    schedulers and checkpoints see them; see OffloadHandle.wrap_optimizer."""

    def __init__(self, handle, optimizer):
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self._handle = handle
        self._inner = optimizer

    def step(self, closure=None):
        with self._handle.materialized():
            return self._inner.step(closure)

    def zero_grad(self, set_to_none=True):
        self._inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self._inner.state_dict()

    def load_state_dict(self, state_dict):
        self._inner.load_state_dict(state_dict)
        self.param_groups = self._inner.param_groups
        self.state = self._inner.state


def _before_backward_of(outputs, action):
    """`outputs` with every tensor that carries a gradient passed through
    one function whose backward calls `action` first (outputs of any shape:
    a tensor, tuples with None, a dict, a Hugging Face ModelOutput); None
    when no tensor carries one (a forward hook's "leave them as they are")."""
    found = [t for t in _tensors_in(outputs) if t.requires_grad]
    if not found:
        return None
    wrapped = _OnBackward.apply(action, *found)
    wrapped = list(wrapped) if isinstance(wrapped, tuple) else [wrapped]
    replacements = {id(t): w for t, w in zip(found, wrapped)}
    return _map_tensors(outputs, lambda t: replacements.get(id(t), t))


def _tensors_in(value):
    """Every tensor in `value`, in the order _map_tensors visits them."""
    found = []
    _map_tensors(value, lambda t: found.append(t) or t)
    return found


def _map_tensors(value, fn):
    """`value` with every tensor in it replaced by fn(tensor), through
    tuples (named ones too), lists, dicts and dataclass-like outputs."""
    if isinstance(value, _torch.Tensor):
        return fn(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(_map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        mapped = {k: _map_tensors(v, fn) for k, v in value.items()}
        if type(value) is dict:
            return mapped
        try:
            # An OrderedDict subclass such as transformers' ModelOutput: same
            # type, same keys, the new tensors.
            return type(value)(**mapped)
        except TypeError:
            result = type(value)()
            result.update(mapped)
            return result
    return value


def _device_synchronize(device):
    module = getattr(_torch, device.type, None)
    if module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def _all_named_parameters(module, prefix=""):
    """(name, param) for every state_dict entry of a param, duplicates
    (tied weights) included."""
    for name, p in module._parameters.items():
        if p is not None:
            yield prefix + name, p
    for name, child in module._modules.items():
        if child is not None:
            yield from _all_named_parameters(child, prefix + name + ".")


def _remove_directories(paths):
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
    paths.clear()


def _make_nvme_path(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"zero_optimization.offload_param.nvme_path: cannot create {path}: "
                      f"{error.strerror}", path) from None


def offload(module, config, device=None, units=None, optimizer=None):
    """Offloads `module`'s parameters as `config` says; returns the handle.
    `optimizer(params) -> torch.optim.Optimizer` turns on stepping in
    backward, unit by unit."""
    return OffloadHandle(module, config, device=device, units=units, optimizer=optimizer)

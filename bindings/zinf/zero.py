"""DeepSpeed's zero namespace: Init, GatheredParameters,
register_external_parameter.

    with zinf.zero.Init(config_dict_or_path=ds_config):
        model = MyModel()          # each param goes to its shard as its module is built
    engine, *_ = zinf.initialize(model=model, config=ds_config)

Under Init, as soon as a module's __init__ returns, each of its parameters
keeps only this rank's shard of its values (every rank starts from rank 0's
values, as DeepSpeed does): on NVMe with offload_param nvme (under
nvme_path), else in host memory; the parameter itself is left empty, with
its shape in `param.ds_shape`. zinf.initialize then builds the engine from
those shards, one sub-group at a time, so a model larger than host memory
can be built. Initialisation that a parent module applies after its
children exist (Hugging Face's init_weights) sees the empty parameters and
does nothing: the values are each module's own reset_parameters().
"""
import enum
import functools
import logging
import os
import shutil
import tempfile
import weakref

import torch
import torch.distributed as dist

from .distributed import host_group, settle_at_exit
from .swap import TensorSwapper
from .torch import _load_config

# What Init and the engine attach to a parameter (attributes: a tensor's
# == is element-wise, so tensors make poor dictionary keys): `_zinf_staged`,
# a _Staged for one built under Init and not yet in an engine, and
# `_zinf_engine`, a weak reference to the ZinfEngine holding it.


class ZeroParamStatus(enum.Enum):
    """DeepSpeed's: a stage-3 param's `ds_status`. AVAILABLE while its
    values are whole in `.data` (its unit's forward or backward, inside
    GatheredParameters, or always for a persistent param); NOT_AVAILABLE
    when `.data` is empty. zinf gathers synchronously: never INFLIGHT."""
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


class ZeroParamType(enum.Enum):
    """DeepSpeed's param kinds; a zinf stage-3 param is PARTITIONED."""
    NORMAL = 1
    PARTITIONED = 2
    REMOTE = 3


def staged(p):
    return getattr(p, "_zinf_staged", None)


def engine_of(p):
    ref = getattr(p, "_zinf_engine", None)
    return ref() if ref is not None else None


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Staged:
    """This rank's shard of one parameter: elements [start, start + count)
    of its flattened fp32 values, in `store` under `key`."""

    def __init__(self, store, key, shape, start, count):
        self.store, self.key, self.shape, self.start, self.count = store, key, torch.Size(shape), start, count

    def values(self):
        return self.store.load(self.key)


class _Store:
    """Where Init keeps the shards: a TensorSwapper on NVMe, or host memory."""

    def __init__(self, nvme_paths):
        self._host = {}
        self._directories = []
        self._swapper = None
        self._last = (None, None)
        if nvme_paths:
            for path in nvme_paths:
                os.makedirs(path, exist_ok=True)
                self._directories.append(tempfile.mkdtemp(prefix="zinf-init.", dir=path))
            self._swapper = TensorSwapper(self._directories, sync=False)
        self._finalizer = weakref.finalize(self, _remove, self._directories)

    def save(self, key, values):
        if self._last[0] == key:
            self._last = (None, None)
        if self._swapper is None:
            self._host[key] = values.clone()
        else:
            self._swapper.swap_out(key, values)

    def commit(self):
        if self._swapper is not None:
            self._swapper.commit()

    def load(self, key):
        if self._last[0] == key:
            return self._last[1]  # finalize() asks for a param piece by piece
        if self._swapper is None:
            values = self._host[key]
        else:
            values = self._swapper.swap_in(key).clone()
            self._swapper.release(key)
        self._last = (key, values)
        return values

    def close(self):
        self._last = (None, None)
        self._host.clear()
        self._swapper = None
        self._finalizer()


def _remove(directories):
    for path in directories:
        shutil.rmtree(path, ignore_errors=True)
    directories.clear()


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


class Init:
    """Builds modules straight into zinf's shards (see the module docstring).
    `remote_device` ("nvme", "cpu", "none") overrides offload_param.device;
    enabled=False builds the model as usual. `module=` converts a model
    already built, as DeepSpeed's does: its params go to their shards (rank
    0's values) at once, no context needed."""

    _stores = []  # kept alive until the engines that read them are built
    _next_id = 0

    def __init__(self, module=None, data_parallel_group=None, mem_efficient_linear=True, remote_device=None,
                 pin_memory=False, config_dict_or_path=None, config=None, enabled=True, dtype=None, mpu=None,
                 **unused):
        self.enabled = enabled
        if enabled and dist.is_available() and not dist.is_initialized():
            # Each rank stages its own shard, so the ranks must be known now:
            # as DeepSpeed's Init does, join the process group torchrun's
            # variables describe (nothing to join for a single process).
            from .engine import init_distributed
            init_distributed()
        settings = _load_config(config_dict_or_path if config_dict_or_path is not None else config) \
            if (config_dict_or_path is not None or config is not None) else {}
        block = settings.get("zero_optimization", {}).get("offload_param", {})
        device = remote_device or block.get("device", "none")
        paths = block.get("nvme_path") if device == "nvme" else None
        if device == "nvme" and not paths:
            raise ValueError("zero_optimization.offload_param.nvme_path is required for zinf.zero.Init with nvme")
        self._paths = ([paths] if isinstance(paths, str) else list(paths)) if paths else None
        self._dtype = dtype
        self._patched = []
        self._store = None
        self._count = 0
        if module is not None and enabled:
            self._open_store()
            for child in module.modules():
                self._stage(child)
            self._store.commit()

    def _open_store(self):
        if self._store is None:
            self._store = _Store(self._paths)
            Init._stores.append(self._store)

    # -- the patch over every module class's __init__ ---------------------------------
    def __enter__(self):
        if not self.enabled:
            return self
        self._open_store()
        for cls in [torch.nn.Module] + list(_subclasses(torch.nn.Module)):
            self._wrap(cls)
        self._original_init_subclass = torch.nn.Module.__dict__.get("__init_subclass__")
        init = self

        def init_subclass(cls, **kwargs):
            super(torch.nn.Module, cls).__init_subclass__(**kwargs)
            init._wrap(cls)  # classes defined inside the context too
        torch.nn.Module.__init_subclass__ = classmethod(init_subclass)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        for cls, original in reversed(self._patched):
            cls.__init__ = original
        self._patched.clear()
        if self._original_init_subclass is None:
            del torch.nn.Module.__init_subclass__
        else:
            torch.nn.Module.__init_subclass__ = self._original_init_subclass
        self._store.commit()
        return False

    def _wrap(self, cls):
        original = cls.__dict__.get("__init__")
        if original is None or getattr(original, "_zinf_wrapped", False):
            return
        init = self

        @functools.wraps(original)
        def wrapper(module, *args, **kwargs):
            depth = module.__dict__.get("_zinf_init_depth", 0)
            module.__dict__["_zinf_init_depth"] = depth + 1
            try:
                original(module, *args, **kwargs)
            finally:
                module.__dict__["_zinf_init_depth"] = depth
            if depth == 0:  # the most derived __init__ returned: the module is built
                module.__dict__.pop("_zinf_init_depth", None)
                init._stage(module)
        wrapper._zinf_wrapped = True
        cls.__init__ = wrapper
        self._patched.append((cls, original))

    def _stage(self, module):
        rank, world = _world()
        for name, p in list(module._parameters.items()):
            if p is None or staged(p) is not None or p.numel() == 0:
                continue
            values = p.detach().to("cpu", torch.float32).reshape(-1).contiguous()
            if world > 1:
                settle_at_exit()
                dist.broadcast(values, src=0, group=host_group())
            shard = (values.numel() + world - 1) // world  # the engine's cut: ceil(n / world)
            start = min(rank * shard, values.numel())
            count = min(shard, values.numel() - start)
            key = f"p{self._count}"
            self._count += 1
            self._store.save(key, values[start:start + count].clone())
            shape = p.shape
            if self._dtype is not None:
                p.data = p.data.to(self._dtype)
            p.data = torch.empty(0, dtype=p.dtype)
            p.ds_shape = shape
            p.ds_numel = shape.numel()
            p.ds_id = Init._next_id  # unique across Init contexts (the engine renumbers them)
            Init._next_id += 1
            p.ds_persist = False
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE
            p._zinf_staged = _Staged(self._store, key, shape, start, count)


class MiCS_Init(Init):  # noqa: N801 (DeepSpeed's name)
    """DeepSpeed's MiCS_Init, accepted so scripts written for it run: zinf
    builds the model as Init does, each parameter sharded over every rank.
    MiCS's groups (zero_optimization.mics_shard_size: a whole replica per
    group of that many ranks, to keep gathers inside a node) are not made;
    the values trained are the same, each rank holds less and gathers over
    more ranks. Said once in the log."""

    _said = False

    def __init__(self, module=None, data_parallel_group=None, sequence_data_parallel_group=None,
                 mem_efficient_linear=True, remote_device=None, pin_memory=False, config_dict_or_path=None,
                 config=None, enabled=True, dtype=None, mpu=None):
        if enabled and not MiCS_Init._said:
            MiCS_Init._said = True
            logging.getLogger("zinf").info(
                "zinf: MiCS_Init builds the model as zero.Init does: every parameter is sharded over all ranks "
                "(mics_shard_size's groups are not made; the same values are trained)")
        super().__init__(module=module, data_parallel_group=data_parallel_group,
                         mem_efficient_linear=mem_efficient_linear, remote_device=remote_device,
                         pin_memory=pin_memory, config_dict_or_path=config_dict_or_path, config=config,
                         enabled=enabled, dtype=dtype, mpu=mpu)


def _ds_tensor(p):
    """DeepSpeed's ``param.ds_tensor``: this rank's shard of a ZeRO-3
    param, 1-D, ceil(numel / world) elements (zeros past the param's end),
    in the param's training dtype, on the CPU when offload_param is cpu or
    nvme (else on the model's device). Scripts read its shape, numel and
    dtype (and ``ds_numel``, the shard's length) to size per-rank values.

    A copy, read when asked for (from NVMe with offload_param nvme): writing
    into it does not reach the engine; zinf.utils.safe_set_local_fp32_param
    does. A value a script assigns (``p.ds_tensor = t``) is kept and given
    back. Params that are not partitioned by zinf (below stage 3, or not
    zinf's) have none, so ``hasattr(p, "ds_tensor")`` tells a ZeRO-3 param
    as in DeepSpeed."""
    if "_zinf_ds_tensor" in p.__dict__:  # a script's own value (None too)
        return p.__dict__["_zinf_ds_tensor"]
    engine = engine_of(p)
    if engine is not None and engine.stage >= 3:
        return engine._local_working(p)
    stage = staged(p)
    if stage is not None:  # built under Init, no engine yet: the staged shard
        _, world = _world()
        shard = torch.zeros((stage.shape.numel() + world - 1) // world, dtype=p.dtype)
        shard[:stage.count] = stage.values()[:stage.count].to(p.dtype)
        shard.ds_numel = shard.numel()
        return shard
    raise AttributeError(f"'{type(p).__name__}' object has no attribute 'ds_tensor' (only a ZeRO-3 parameter of "
                         "zinf's has one)")


def _assign_ds_tensor(p, value):
    p.__dict__["_zinf_ds_tensor"] = value


def _delete_ds_tensor(p):
    p.__dict__.pop("_zinf_ds_tensor", None)


# On the class, as a property: the shard is read when asked for, so it is
# never stale, and params that are not zinf's raise AttributeError as
# before (nothing else about torch.nn.Parameter changes).
if not hasattr(torch.nn.Parameter, "ds_tensor"):
    torch.nn.Parameter.ds_tensor = property(_ds_tensor, _assign_ds_tensor, _delete_ds_tensor)


def _gather_staged(p):
    """A param built under Init, before any engine: its whole values from
    every rank's shard (collective), in its dtype."""
    stage = staged(p)
    rank, world = _world()
    numel = stage.shape.numel()
    shard = (numel + world - 1) // world
    local = torch.zeros(shard, dtype=torch.float32)
    local[:stage.count] = stage.values()[:stage.count]
    if world > 1:
        pieces = [torch.empty(shard, dtype=torch.float32) for _ in range(world)]
        dist.all_gather(pieces, local, group=host_group())
        local = torch.cat(pieces)
    p.data = local[:numel].view(stage.shape).to(p.dtype)
    p.ds_status = ZeroParamStatus.AVAILABLE


def _release_staged(p, write_back, source_rank):
    """Back to this rank's shard; with write_back, `source_rank`'s values
    become every rank's shard (what finalize() will build the engine from;
    the caller commits the store)."""
    stage = staged(p)
    if write_back:
        values = p.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if _world()[1] > 1:
            dist.broadcast(values, src=source_rank, group=host_group())
        stage.store.save(stage.key, values[stage.start:stage.start + stage.count].clone())
    p.data = torch.empty(0, dtype=p.dtype)
    p.ds_status = ZeroParamStatus.NOT_AVAILABLE


class GatheredParameters:
    """DeepSpeed's GatheredParameters: inside the context the parameters are
    whole (from the fp32 masters, in the training precision); with
    modifier_rank set, that rank's values when the context ends become the
    new masters on every rank (optimizer moments kept). Parameters built
    under Init and not yet in an engine are gathered from the ranks' staged
    shards, and a modifier's values become those shards (loading a
    pretrained checkpoint into a model built under Init). Collective: every
    rank enters it with the same params. Parameters that are not zinf's
    pass through untouched."""

    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        if isinstance(params, torch.Tensor):
            params = [params]
        # Once each (a tied weight may be listed under both its names).
        self.params = list({id(p): p for p in params if p is not None}.values())
        self.modifier_rank = modifier_rank
        self.enabled = enabled

    def __enter__(self):
        if not self.enabled:
            return self
        self._held = []
        for p in self.params:
            engine = engine_of(p)
            if engine is not None:
                self._held.append((engine, p))
                engine._gather_whole(p)
            elif staged(p) is not None:
                self._held.append((None, p))
                _gather_staged(p)
        return self

    def __exit__(self, *exc):
        if not self.enabled:
            return False
        write_back = self.modifier_rank is not None and exc[0] is None
        written = {}  # the Init stores rewritten: committed once each
        for engine, p in self._held:
            if engine is None:
                _release_staged(p, write_back, self.modifier_rank)
                written[id(staged(p).store)] = staged(p).store
            else:
                engine._release_whole(p, write_back=write_back, source_rank=self.modifier_rank)
        if write_back:
            for store in written.values():
                store.commit()
        return False


def register_external_parameter(module, parameter):
    """Tells stage 3 that `module`'s forward uses `parameter` although it
    is not one of its own (a parent reading `self.child.weight`): the
    parameter is gathered around `module`'s forward and backward too."""
    external = module.__dict__.setdefault("_zinf_external_params", [])
    if all(p is not parameter for p in external):
        external.append(parameter)


def unregister_external_parameter(module, parameter):
    external = module.__dict__.get("_zinf_external_params", [])
    module.__dict__["_zinf_external_params"] = [p for p in external if p is not parameter]

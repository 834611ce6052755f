"""DeepSpeed's accelerator abstraction (``deepspeed.accelerator``):
``get_accelerator()`` answers device names, counts, streams, memory and
dtypes the way DeepSpeed's CUDA and CPU accelerators do, over torch, so
scripts that write ``get_accelerator().device_name()`` or
``get_accelerator().pin_memory(t)`` run on zinf by their import.

The accelerator is CUDA when torch sees a GPU, the CPU otherwise;
DS_ACCELERATOR ("cuda" or "cpu"), or set_accelerator(), chooses it as in
DeepSpeed. zinf's own engine does not read it: it follows the model's
device."""
import contextlib
import os
import resource

import torch

from .ops import op_builder as _op_builder


class DeepSpeedAccelerator:
    """What both accelerators share: tensor types, op builders, graphs."""
    _name = None
    _communication_backend_name = None

    def __init__(self):
        self._compile_backend = "inductor"

    def is_synchronized_device(self):
        return False

    def use_host_timers(self):
        return self.is_synchronized_device()

    def resolves_data_dependency(self):
        return self.is_synchronized_device()

    def handles_memory_backpressure(self):
        return self.is_synchronized_device()

    def communication_backend_name(self):
        return self._communication_backend_name

    def is_triton_supported(self):
        return False

    def lazy_call(self, callback):
        return callback()

    # -- tensor types (DeepSpeed hands out the device's legacy constructors)
    def _tensor_type(self, name):
        return getattr(torch, name)

    @property
    def BFloat16Tensor(self):  # noqa: N802 - DeepSpeed's names
        return self._tensor_type("BFloat16Tensor")

    @property
    def ByteTensor(self):  # noqa: N802
        return self._tensor_type("ByteTensor")

    @property
    def DoubleTensor(self):  # noqa: N802
        return self._tensor_type("DoubleTensor")

    @property
    def FloatTensor(self):  # noqa: N802
        return self._tensor_type("FloatTensor")

    @property
    def HalfTensor(self):  # noqa: N802
        return self._tensor_type("HalfTensor")

    @property
    def IntTensor(self):  # noqa: N802
        return self._tensor_type("IntTensor")

    @property
    def LongTensor(self):  # noqa: N802
        return self._tensor_type("LongTensor")

    def on_accelerator(self, tensor):
        return tensor.device.type == self._name

    # -- ops: zinf's prebuilt ones, whatever the device
    def op_builder_dir(self):
        return "zinf.ops.op_builder"

    def get_op_builder(self, class_name):
        builder = getattr(_op_builder, class_name, None)
        return builder if isinstance(builder, type) and issubclass(builder, _op_builder.OpBuilder) else None

    def create_op_builder(self, class_name):
        builder = self.get_op_builder(class_name)
        return builder() if builder is not None else None

    def build_extension(self):
        from torch.utils.cpp_extension import BuildExtension
        return BuildExtension

    def export_envs(self):
        return []

    def visible_devices_envs(self):
        return ["CUDA_VISIBLE_DEVICES"]

    def set_visible_devices_envs(self, current_env, local_accelerator_ids):
        for name in self.visible_devices_envs():
            current_env[name] = ",".join(map(str, local_accelerator_ids))

    def get_compile_backend(self):
        return self._compile_backend

    def set_compile_backend(self, backend):
        backends = torch._dynamo.list_backends(exclude_tags=()) if hasattr(torch, "_dynamo") else []
        if backend not in backends:
            raise ValueError(f"{backend} not supported by {self.device_name()}. Supported Backends are {backends}")
        self._compile_backend = backend


class CUDA_Accelerator(DeepSpeedAccelerator):  # noqa: N801 - DeepSpeed's name
    """torch.cuda, as DeepSpeed's CUDA accelerator reports it."""
    _name = "cuda"
    _communication_backend_name = "nccl"

    def device_name(self, device_index=None):
        return "cuda" if device_index is None else f"cuda:{device_index}"

    def device(self, device_index=None):
        return torch.cuda.device(device_index)

    def set_device(self, device_index):
        torch.cuda.set_device(device_index)

    def current_device(self):
        return torch.cuda.current_device()

    def current_device_name(self):
        return f"cuda:{torch.cuda.current_device()}"

    def device_count(self):
        return torch.cuda.device_count()

    def synchronize(self, device_index=None):
        return torch.cuda.synchronize(device_index)

    def is_available(self):
        return torch.cuda.is_available()

    # -- RNG
    def random(self):
        return torch.random

    def set_rng_state(self, new_state, device_index=None):
        if device_index is None:
            return torch.cuda.set_rng_state(new_state)
        return torch.cuda.set_rng_state(new_state, device_index)

    def get_rng_state(self, device_index=None):
        return torch.cuda.get_rng_state() if device_index is None else torch.cuda.get_rng_state(device_index)

    def manual_seed(self, seed):
        return torch.cuda.manual_seed(seed)

    def manual_seed_all(self, seed):
        return torch.cuda.manual_seed_all(seed)

    def initial_seed(self):
        return torch.cuda.initial_seed()

    def default_generator(self, device_index):
        return torch.cuda.default_generators[device_index]

    # -- streams and events
    @property
    def Stream(self):  # noqa: N802
        return torch.cuda.Stream

    def stream(self, stream):
        return torch.cuda.stream(stream)

    def current_stream(self, device_index=None):
        return torch.cuda.current_stream(device_index)

    def default_stream(self, device_index=None):
        return torch.cuda.default_stream(device_index)

    @property
    def Event(self):  # noqa: N802
        return torch.cuda.Event

    # -- memory
    def empty_cache(self):
        return torch.cuda.empty_cache()

    def memory_allocated(self, device_index=None):
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index=None):
        return torch.cuda.max_memory_allocated(device_index)

    def reset_max_memory_allocated(self, device_index=None):
        return torch.cuda.reset_peak_memory_stats(device_index)

    def memory_cached(self, device_index=None):
        return torch.cuda.memory_reserved(device_index)

    def max_memory_cached(self, device_index=None):
        return torch.cuda.max_memory_reserved(device_index)

    def reset_max_memory_cached(self, device_index=None):
        return torch.cuda.reset_peak_memory_stats(device_index)

    def memory_stats(self, device_index=None):
        return torch.cuda.memory_stats(device_index)

    def reset_peak_memory_stats(self, device_index=None):
        return torch.cuda.reset_peak_memory_stats(device_index)

    def memory_reserved(self, device_index=None):
        return torch.cuda.memory_reserved(device_index)

    def max_memory_reserved(self, device_index=None):
        return torch.cuda.max_memory_reserved(device_index)

    def total_memory(self, device_index=0):
        return torch.cuda.get_device_properties(device_index).total_memory

    def available_memory(self, device_index=None):
        free, _ = torch.cuda.mem_get_info(device_index)
        return free

    # -- dtypes and the rest
    def is_bf16_supported(self):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()

    def is_fp16_supported(self):
        return torch.cuda.is_available()

    def supported_dtypes(self):
        dtypes = [torch.float, torch.half]
        if self.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return dtypes

    def amp(self):
        return torch.cuda.amp

    def range_push(self, msg):
        if hasattr(torch.cuda, "nvtx"):
            return torch.cuda.nvtx.range_push(msg)
        return None

    def range_pop(self):
        if hasattr(torch.cuda, "nvtx"):
            return torch.cuda.nvtx.range_pop()
        return None

    def lazy_call(self, callback):
        return torch.cuda._lazy_call(callback)

    def is_triton_supported(self):
        return self.is_available() and torch.cuda.get_device_capability()[0] >= 8

    def create_graph(self):
        return torch.cuda.CUDAGraph()

    def capture_to_graph(self, graph, pool=None, stream=None):
        return torch.cuda.graph(graph, pool, stream)

    def replay_graph(self, graph):
        graph.replay()

    def _tensor_type(self, name):
        return getattr(torch.cuda, name)

    def pin_memory(self, tensor, align_bytes=1):
        return tensor.pin_memory()

    def is_pinned(self, tensor):
        return tensor.is_pinned()


def _resident_bytes():
    """This process's resident set now (/proc/self/statm's second field)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class CPU_Accelerator(DeepSpeedAccelerator):  # noqa: N801 - DeepSpeed's name
    """The host as the device, as DeepSpeed's CPU accelerator: one device
    named "cpu" (counted per NUMA node, or LOCAL_SIZE), Gloo, memory
    figures from the process's resident set, no streams or events."""
    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self):
        super().__init__()
        self._peak_rss = _resident_bytes()

    def is_synchronized_device(self):
        return True

    def device_name(self, device_index=None):
        return "cpu"

    def device(self, device_index=None):
        return None

    def set_device(self, device_index):
        return None

    def current_device(self):
        return int(os.environ.get("LOCAL_RANK", 0))

    def current_device_name(self):
        return "cpu"

    def device_count(self):
        given = int(os.environ.get("LOCAL_SIZE", 0))
        if given > 0:
            return given
        nodes = 0
        try:
            for entry in os.listdir("/sys/devices/system/node"):
                if entry.startswith("node") and entry[4:].isdigit():
                    with open(f"/sys/devices/system/node/{entry}/cpulist") as cpulist:
                        nodes += bool(cpulist.read().strip())
        except OSError:
            pass
        return max(nodes, 1)

    def synchronize(self, device_index=None):
        return None

    def is_available(self):
        return True

    # -- RNG
    def random(self):
        return torch.random

    def set_rng_state(self, new_state, device_index=None):
        return torch.set_rng_state(new_state)

    def get_rng_state(self, device_index=None):
        return torch.get_rng_state()

    def manual_seed(self, seed):
        return torch.manual_seed(seed)

    def manual_seed_all(self, seed):
        return torch.manual_seed(seed)

    def initial_seed(self):
        return torch.initial_seed()

    def default_generator(self, device_index):
        return torch.default_generator

    # -- no streams or events: work on the host is done when the call returns
    @property
    def Stream(self):  # noqa: N802
        return None

    def stream(self, stream):
        return contextlib.nullcontext()

    def current_stream(self, device_index=None):
        return None

    def default_stream(self, device_index=None):
        return None

    @property
    def Event(self):  # noqa: N802
        return None

    # -- memory: the resident set stands for "allocated"
    def _rss(self):
        now = _resident_bytes()
        self._peak_rss = max(self._peak_rss, now)
        return now

    def _reset_peak(self, device_index=None):
        self._peak_rss = _resident_bytes()

    def _peak(self, device_index=None):
        self._rss()
        return self._peak_rss

    def empty_cache(self):
        return None

    def memory_allocated(self, device_index=None):
        return self._rss()

    max_memory_allocated = _peak
    reset_max_memory_allocated = _reset_peak
    reset_peak_memory_stats = _reset_peak
    reset_max_memory_cached = _reset_peak
    max_memory_cached = _peak
    max_memory_reserved = _peak

    def memory_cached(self, device_index=None):
        return self._rss()

    def memory_reserved(self, device_index=None):
        return self._rss()

    def memory_stats(self, device_index=None):
        now = self._rss()
        return {"allocated_bytes.all.current": now, "allocated_bytes.all.peak": self._peak_rss}

    def total_memory(self, device_index=None):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def available_memory(self, device_index=None):
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    # -- dtypes and the rest
    def is_bf16_supported(self):
        return True

    def is_fp16_supported(self):
        return False

    def supported_dtypes(self):
        return [torch.float, torch.bfloat16]

    def amp(self):
        return torch.cpu.amp

    def range_push(self, msg):
        return None

    def range_pop(self):
        return None

    def create_graph(self):
        return None

    def capture_to_graph(self, graph, pool=None, stream=None):
        return contextlib.nullcontext()

    def replay_graph(self, graph):
        return None

    def pin_memory(self, tensor, align_bytes=1):
        """The tensor itself: with no GPU there is no DMA to pin for (zinf's
        own I/O buffers are page-locked by aio_handle.new_cpu_locked_tensor)."""
        return tensor

    def is_pinned(self, tensor):
        return tensor.is_pinned()


_ACCELERATORS = {"cuda": CUDA_Accelerator, "cpu": CPU_Accelerator}
_current = None


def _choose():
    chosen = os.environ.get("DS_ACCELERATOR")
    if chosen:
        if chosen not in _ACCELERATORS:
            raise ValueError(f"DS_ACCELERATOR={chosen!r}: zinf's accelerators are {sorted(_ACCELERATORS)}")
        if chosen == "cuda" and not torch.cuda.is_available():
            raise ValueError("DS_ACCELERATOR='cuda' but torch sees no CUDA device (torch "
                             f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return _ACCELERATORS[chosen]()
    return CUDA_Accelerator() if torch.cuda.is_available() else CPU_Accelerator()


def get_accelerator():
    """The process's accelerator (chosen on first call)."""
    global _current
    if _current is None:
        _current = _choose()
    return _current


def set_accelerator(accelerator):
    global _current
    if not isinstance(accelerator, DeepSpeedAccelerator):
        raise TypeError(f"set_accelerator takes a DeepSpeedAccelerator, not {type(accelerator).__name__}")
    _current = accelerator


def is_current_accelerator_supported():
    return get_accelerator()._name in _ACCELERATORS


__all__ = ["DeepSpeedAccelerator", "CUDA_Accelerator", "CPU_Accelerator", "get_accelerator", "set_accelerator",
           "is_current_accelerator_supported"]

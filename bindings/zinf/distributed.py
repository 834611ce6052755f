"""The engine's collectives over a torch.distributed process group.

zinf's C++ engine calls these from its worker thread (the GIL taken for the
call) with memoryviews over its own buffers, which are host memory: Gloo
moves them as they are (TorchCollectives); for a model on GPUs under an
NCCL group, they are staged through each rank's GPU and NCCL moves them
(DeviceCollectives). All ranks issue the same calls in the same order,
which is the engine's contract. Gloo in torch 1.13 has no reduce-scatter:
it all-reduces a copy and keeps this rank's block (twice the traffic of a
ring reduce-scatter).
"""
import atexit
import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import struct
import time
import urllib.parse

import torch
import torch.distributed as dist


def _bytes(view):
    return torch.frombuffer(view, dtype=torch.uint8)


def _floats(view):
    return torch.frombuffer(view, dtype=torch.float32)


class TorchCollectives:
    """What PythonCommunicator (bindings/python_module.cpp) calls.

    The collectives run on tensors torch allocated, copied from and to the
    engine's memory: a tensor over a memoryview holds a Python reference,
    and Gloo's worker threads may drop their last reference to it late,
    while the interpreter exits, which aborts the process."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def all_gather(self, send, recv, nbytes):
        out = _bytes(recv)
        mine = _bytes(send).clone()
        gathered = torch.empty(nbytes * self.world_size, dtype=torch.uint8)
        dist.all_gather(list(gathered.split(nbytes)), mine, group=self.group)
        out.copy_(gathered)

    def reduce_scatter(self, send, recv, count):
        total = _floats(send).clone()
        dist.all_reduce(total, group=self.group)
        _floats(recv).copy_(total[self.rank * count:(self.rank + 1) * count])

    def all_reduce(self, data, count, op):
        values = _floats(data)
        total = values.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        values.copy_(total)

    def broadcast(self, data, nbytes, root):
        target = _bytes(data)
        values = target.clone()
        dist.broadcast(values, src=root, group=self.group)
        target.copy_(values)

    def barrier(self):
        dist.barrier(group=self.group)


class DeviceCollectives(TorchCollectives):
    """The engine's collectives over an NCCL group, for a model on GPUs:
    each call stages the engine's host buffer through a tensor on `device`
    (this rank's GPU), runs the collective there and copies the result
    back, as NCCL takes device memory only.

    The group is the engine's own (engine_collectives makes it): the
    engine calls from its worker thread while the script's thread may run
    collectives of its own on the default group, and two threads sharing
    one NCCL communicator could issue them in a different order on
    different ranks. Each call runs on a CUDA stream of its own: the copy
    in, the collective (NCCL's stream waits on it) and the copy out are
    ordered there, the copy out into pageable host memory returns once it
    has landed, and the trainer's kernels on their streams are neither
    waited for nor held up."""

    def __init__(self, device, group=None):
        super().__init__(group)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    @contextlib.contextmanager
    def _on_stream(self):
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def _in(self, view, dtype):
        return torch.frombuffer(view, dtype=dtype).to(self.device)

    def all_gather(self, send, recv, nbytes):
        with self._on_stream():
            mine = self._in(send, torch.uint8)
            gathered = torch.empty(nbytes * self.world_size, dtype=torch.uint8, device=self.device)
            flat = getattr(dist, "all_gather_into_tensor", None) or dist._all_gather_base
            flat(gathered, mine, group=self.group)
            _bytes(recv).copy_(gathered)

    def reduce_scatter(self, send, recv, count):
        with self._on_stream():
            total = self._in(send, torch.float32)
            mine = torch.empty(count, dtype=torch.float32, device=self.device)
            flat = getattr(dist, "reduce_scatter_tensor", None) or dist._reduce_scatter_base
            flat(mine, total, group=self.group)
            _floats(recv).copy_(mine)

    def _in_place(self, view, dtype, collective):
        """`collective` on a device copy of `view`, the result copied back."""
        with self._on_stream():
            values = self._in(view, dtype)
            collective(values)
            torch.frombuffer(view, dtype=dtype).copy_(values)

    def all_reduce(self, data, count, op):
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        self._in_place(data, torch.float32, lambda values: dist.all_reduce(values, op=reduce_op, group=self.group))

    def broadcast(self, data, nbytes, root):
        # Every rank is in the group, in rank order: its rank is the global one.
        self._in_place(data, torch.uint8, lambda values: dist.broadcast(values, src=root, group=self.group))

    def barrier(self):
        # An all-reduce only makes a stream wait; the copy of its result
        # makes the CPU wait too, so that the engine's checkpoint, which
        # fences its files with barriers, sees every rank's writes done.
        with self._on_stream():
            flag = torch.zeros(1, device=self.device)
            dist.all_reduce(flag, group=self.group)
            flag.cpu()


def _machine_id():
    """What tells machines apart: the kernel's boot id (shared by the
    containers of one machine, which share its GPUs), else the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return socket.gethostname()


def _gpu_id(device):
    """The GPU's UUID (torch >= 2.2); before that, the physical index
    CUDA_VISIBLE_DEVICES maps it to, which cannot tell apart containers that
    each see their own GPU as index 0."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        return "uuid:%s" % uuid
    visible = [entry.strip() for entry in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if entry.strip()]
    return "visible:%s" % visible[device.index] if device.index < len(visible) else "index:%d" % device.index


_device_groups = []


def engine_collectives(device, host, choice="auto", timeout_s=None):
    """The collectives zinf's engine runs over, with more than one rank:

    - under an NCCL default group (the script's init_distributed("nccl")
      or init_process_group("nccl")), with every rank's model on a GPU of
      its own: NCCL, over a group of the engine's own, staged through each
      rank's GPU (DeviceCollectives);
    - otherwise, or with zinf.collectives "host" on any rank: Gloo on host
      memory over `host` (host_group()). Ranks that share a GPU (NCCL
      refuses them) are warned about.

    A collective call under an NCCL default group: every rank makes it, and
    they agree on the choice before any rank makes a group."""
    if dist.get_backend() != "nccl":
        return TorchCollectives(host)
    wants = choice != "host" and device.type == "cuda"
    if wants:
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    mine = (wants, _machine_id(), _gpu_id(device) if wants else None)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine, group=host)
    if not all(want for want, _, _ in everyone):
        return TorchCollectives(host)
    if len({(machine, gpu) for _, machine, gpu in everyone}) < len(everyone):
        logging.getLogger("zinf").warning(
            "zinf: ranks share a GPU (NCCL needs one per rank): the engine's collectives run over Gloo on host "
            "memory; give each rank its own (torch.cuda.set_device(LOCAL_RANK) before moving the model)%s",
            "" if mine[2].startswith("uuid:") else
            " (this torch tells GPUs apart by CUDA_VISIBLE_DEVICES only: containers that each see their own GPU "
            "as device 0 look alike; \"zinf\": {\"collectives\": \"host\"} silences this)")
        return TorchCollectives(host)
    if int(torch.__version__.split(".")[0]) < 2 and not any(name in os.environ for name in (
            "NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_BLOCKING_WAIT")):
        # torch 1.13's NCCL groups wait forever for a dead peer unless told
        # otherwise; with this, its watchdog aborts the process past the
        # group's timeout (what torch 2 does by default).
        os.environ["NCCL_ASYNC_ERROR_HANDLING"] = "1"
    if not _device_groups:
        kwargs = {}
        if timeout_s is not None:
            import datetime
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
        _device_groups.append(dist.new_group(backend="nccl", **kwargs))
    return DeviceCollectives(device, _device_groups[0])


_settle_registered = []  # settle_at_exit's handler (or _destroy_own_group) is registered


def init_from_environment(timeout_s=None, backend="gloo", init_method=None, rank=-1, world_size=-1):
    """Initialises the default process group from torchrun's variables
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when they are set and it
    is not yet initialised, or from an explicit init_method / rank /
    world_size (DeepSpeed's init_distributed arguments): Gloo unless the
    script asks for NCCL (zinf's collectives then go over a Gloo group
    beside it: host_group); a world of one too when torchrun launched it
    (a bare process, without those variables, joins nothing). Returns
    (rank, world)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    import datetime
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    # "env://" is torchrun's way (DeepSpeed scripts pass it): the
    # environment's path. Another init_method, or a rank, is explicit;
    # what it leaves out (-1) comes from the environment, as torch reads it.
    explicit = init_method not in (None, "env://") or rank >= 0
    if rank < 0 and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
    if world_size < 1:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launched = all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if world_size <= 1 and not (launched or explicit):
        # A bare single process: nothing to join. (Under torchrun, even with
        # one process, the group is made, as DeepSpeed makes it: scripts
        # call torch.distributed.get_rank() or barrier() after
        # init_distributed.)
        return 0, 1
    if explicit:
        if rank < 0:
            raise ValueError(f"init_distributed: init_method {init_method!r} needs this process's rank: pass "
                             "rank= or set RANK")
        kwargs.update(init_method=init_method or "env://", rank=rank, world_size=world_size)
        address = urllib.parse.urlparse(init_method) if init_method else None
        if address is not None and address.scheme == "tcp" and address.hostname and address.port:
            _choose_gloo_interface(address.hostname, address.port)
    else:
        if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise ValueError("WORLD_SIZE is %d but RANK, MASTER_ADDR or MASTER_PORT is not set: launch with "
                             "torchrun, or call torch.distributed.init_process_group first" % world_size)
        _choose_gloo_interface(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    dist.init_process_group(backend, **kwargs)
    # DeepSpeed scripts never destroy the group they got from initialize;
    # a Gloo group left to the interpreter's teardown can abort the process
    # ("terminate called without an active exception", pytorch#190489):
    # the group zinf made, zinf takes down while the interpreter is whole.
    atexit.register(_destroy_own_group)
    _settle_registered.append(True)
    return dist.get_rank(), dist.get_world_size()


# Where MPI launchers (mpirun of Open MPI, MPICH/Intel MPI, MVAPICH2) put a
# process's rank, the world's size and its rank on the node.
_MPI_VARIABLES = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                  ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                  ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"))


def from_mpi_launcher(distributed_port):
    """torchrun's variables from an MPI launcher's, where torchrun's are
    absent (DeepSpeed's auto_mpi_discovery). Rank 0's address cannot come
    from the environment (DeepSpeed asks MPI through mpi4py): MASTER_ADDR
    must be set, as with `mpirun -x MASTER_ADDR=host0`."""
    if "RANK" in os.environ:
        return
    for rank_name, size_name, local_name in _MPI_VARIABLES:
        if rank_name in os.environ and size_name in os.environ:
            if int(os.environ[size_name]) > 1 and "MASTER_ADDR" not in os.environ:
                raise ValueError(f"init_distributed: launched by MPI ({rank_name}) without MASTER_ADDR: set it to "
                                 "rank 0's host for every rank (mpirun -x MASTER_ADDR=<host>); zinf does not ask MPI "
                                 "for it")
            os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ[rank_name], os.environ[size_name]
            if local_name in os.environ:
                os.environ.setdefault("LOCAL_RANK", os.environ[local_name])
            os.environ.setdefault("MASTER_PORT", str(distributed_port))
            return


def settle_at_exit():
    """Lets Gloo's worker threads let go of their last tensors before the
    interpreter is torn down (registered once, by whoever runs collectives
    over a Gloo group: zinf.initialize, zinf.zero.Init).

    A Gloo worker thread drops the tensors of a finished collective just
    after waking the caller. Each tensor made in Python has a PyObject, and
    torch (2.x: PyObject preservation, c10/util/intrusive_ptr.h) decrefs it
    from whichever thread drops the reference, taking the GIL to do so. A
    worker thread descheduled in that gap until the interpreter finalizes
    takes the GIL of a dying interpreter: Python ends the thread inside
    torch's noexcept code and the process aborts ("terminate called without
    an active exception", rank exit -6 after training finished; seen in CI
    on a loaded 2-core machine, on a rank whose last call was a collective),
    or, when destroy_process_group joins the threads while holding the GIL,
    hangs. Sleeping with the GIL released gives those threads the time to
    finish; nothing Gloo does can be waited for more precisely."""
    if not _settle_registered:
        _settle_registered.append(True)
        atexit.register(_settle_gloo_threads)  # the group zinf made settles in _destroy_own_group


def _settle_gloo_threads():
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.1)


_host_groups = []


def host_group():
    """The group zinf's collectives on host memory go over: a Gloo group of
    every rank of its own, never the script's default group, even a Gloo
    one. The engine reduces gradients on a thread of its own while backward
    runs; on the default group those collectives would interleave with the
    script's (a barrier, a loss all-reduce) in a different order on each
    rank, and hang or mix data. Made once per default group (a collective
    call, which every rank makes in zinf.initialize or zinf.zero.Init)."""
    default = dist.distributed_c10d._get_default_group()
    if not _host_groups or _host_groups[0][0] is not default:  # first, or after a new init_process_group
        _host_groups[:] = [(default, dist.new_group(backend="gloo"))]
    return _host_groups[0][1]


def _is_loopback(host):
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback
                   for info in socket.getaddrinfo(host, None, socket.AF_INET))
    except (OSError, ValueError):
        return True  # unresolvable: nothing better to offer


def _interface_towards(host, port):
    """The name of the interface whose IPv4 address this host reaches
    host:port from (a UDP connect picks the route and sends nothing), or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            local = probe.getsockname()[0]
            for _, name in socket.if_nameindex():
                try:
                    request = struct.pack("256s", name.encode()[:15])
                    address = socket.inet_ntoa(fcntl.ioctl(probe.fileno(), 0x8915, request)[20:24])  # SIOCGIFADDR
                except OSError:
                    continue  # no IPv4 address
                if address == local:
                    return name
    except OSError:
        return None
    return None


def _choose_gloo_interface(master_addr, master_port):
    """Gloo listens on the address this host's name resolves to. Where that
    is a loopback address (Debian's /etc/hosts maps the name to 127.0.1.1,
    containers and network namespaces to 127.0.0.1) and the master is on
    another machine, ranks elsewhere cannot connect back: the interface
    that reaches MASTER_ADDR is the one they can reach. GLOO_SOCKET_IFNAME,
    when set, is the user's choice."""
    if os.environ.get("GLOO_SOCKET_IFNAME") or _is_loopback(master_addr) or not _is_loopback(socket.gethostname()):
        return
    interface = _interface_towards(master_addr, master_port)
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
        logging.getLogger("zinf").info(
            "zinf: this host's name resolves to a loopback address; Gloo uses %s, the interface towards "
            "MASTER_ADDR %s (set GLOO_SOCKET_IFNAME to choose another)", interface, master_addr)


def _destroy_own_group():
    if dist.is_initialized():
        _settle_gloo_threads()  # before destroy joins Gloo's threads (see settle_at_exit)
        dist.destroy_process_group()

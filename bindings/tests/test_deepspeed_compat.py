"""zinf as a drop-in for DeepSpeed's ops, called the way DeepSpeed's own
tests (tests/unit/v1/nvme/test_aio.py, tests/unit/ops/{adam,adagrad,lion})
and its swappers (deepspeed/runtime/swap_tensor, deepspeed/io) call them:
positional arguments, DeepSpeed's keyword spellings, its return values."""
import filecmp
import os

import pytest
import torch

import zinf

BLOCK_SIZE, QUEUE_DEPTH, IO_PARALLEL = 1024, 2, 2   # DeepSpeed's test_aio.py constants
IO_SIZE = 4 * BLOCK_SIZE


def reference_file(directory, nbytes=IO_SIZE, name="ref.bin"):
    data = os.urandom(nbytes)
    path = os.path.join(directory, name)
    with open(path, "wb") as file:
        file.write(data)
    return path, data


# -- aio handle --------------------------------------------------------------------
@pytest.mark.parametrize("single_submit", [False, True])
@pytest.mark.parametrize("overlap_events", [False, True])
def test_one_kib_blocks_positional_constructor_and_accessors(single_submit, overlap_events):
    h = zinf.aio_handle(BLOCK_SIZE, QUEUE_DEPTH, single_submit, overlap_events, IO_PARALLEL)
    assert h.get_single_submit() == single_submit
    assert h.get_overlap_events() == overlap_events
    assert h.get_intra_op_parallelism() == IO_PARALLEL
    assert h.get_block_size() == BLOCK_SIZE
    assert h.get_queue_depth() == QUEUE_DEPTH
    alignment = h.get_alignment()
    assert alignment % (512 * IO_PARALLEL) == 0 and alignment % 4096 == 0


@pytest.mark.parametrize("locked", [False, True])
def test_reads_and_writes_return_deepspeeds_status(scratch, locked):
    h = zinf.aio_handle(BLOCK_SIZE, QUEUE_DEPTH, False, False, IO_PARALLEL)
    ref, data = reference_file(scratch)
    buffer = h.new_cpu_locked_tensor(IO_SIZE, torch.empty(0, dtype=torch.uint8)) if locked else \
        torch.empty(IO_SIZE, dtype=torch.uint8)
    assert h.sync_pread(buffer, ref, 0) == 1
    assert bytes(buffer.tolist()) == data
    buffer.zero_()
    assert h.async_pread(buffer, ref, 0) == 0
    assert h.wait() == 1
    assert bytes(buffer.tolist()) == data
    out = os.path.join(scratch, "aio.bin")
    assert h.sync_pwrite(buffer, out, 0) == 1
    assert filecmp.cmp(ref, out, shallow=False)
    os.remove(out)
    assert h.async_pwrite(buffer, out, 0) == 0
    assert h.wait() == 1
    assert filecmp.cmp(ref, out, shallow=False)
    # pread/pwrite with DeepSpeed's `async` keyword and positionally.
    assert h.pread(buffer, ref, False, **{"async": True}) == 0
    assert h.wait() == 1
    assert h.pwrite(buffer, out, True, False, 0) == 1
    assert h.pread(buffer, ref, True, False) == 1
    # read/write: synchronous, 0 on success (as DeepSpeed's return).
    assert h.read(buffer, ref, True) == 0
    assert h.write(buffer, out, False) == 0
    assert filecmp.cmp(ref, out, shallow=False)
    assert h.free_cpu_locked_tensor(buffer) is locked
    assert h.wait() == 0  # nothing queued: 0, not an abort


@pytest.mark.parametrize("queued", [2, 3])
def test_async_queue_counts_every_transfer(scratch, queued):
    h = zinf.aio_handle(BLOCK_SIZE, QUEUE_DEPTH, True, True, IO_PARALLEL)
    ref, data = reference_file(scratch)
    example = torch.ByteTensor(list(data))
    buffers = [h.new_cpu_locked_tensor(IO_SIZE, example) for _ in range(queued)]
    for b in buffers:
        assert h.async_pread(b, ref, 0) == 0
    assert h.wait() == queued
    assert all(bytes(b.tolist()) == data for b in buffers)
    for index, b in enumerate(buffers):
        assert h.async_pwrite(b, os.path.join(scratch, f"out{index}"), 0) == 0
    assert h.wait() == queued
    assert all(filecmp.cmp(ref, os.path.join(scratch, f"out{i}"), shallow=False) for i in range(queued))
    assert all(h.free_cpu_locked_tensor(b) for b in buffers)


@pytest.mark.parametrize("use_fd", [False, True])
def test_file_offsets_by_name_and_by_fd_never_truncate(scratch, use_fd):
    """test_aio.py's TestAsyncFileOffset: partitions written at their
    offsets (through an O_DIRECT fd the caller opened, or by name) leave the
    file equal to the reference prefix after each one."""
    h = zinf.aio_handle(BLOCK_SIZE, QUEUE_DEPTH, True, True, IO_PARALLEL)
    partitions = [1, 1, 2]
    size = sum(partitions) * BLOCK_SIZE
    ref, data = reference_file(scratch, size)
    source = h.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
    source.copy_(torch.ByteTensor(list(data)))
    out = os.path.join(scratch, "offsets.bin")
    offset = 0
    for blocks in partitions:
        n = blocks * BLOCK_SIZE
        piece = torch.narrow(source, 0, offset, n)
        if use_fd:
            fd = os.open(out, flags=os.O_DIRECT | os.O_CREAT | os.O_WRONLY)
            assert h.async_pwrite(buffer=piece, fd=fd, file_offset=offset) == 0
            assert h.wait() == 1
            os.close(fd)
        else:
            assert h.async_pwrite(buffer=piece, filename=out, file_offset=offset) == 0
            assert h.wait() == 1
        offset += n
        with open(out, "rb") as file:
            assert file.read() == data[:offset]
    # Reads at an offset, into a narrowed locked buffer; and through an fd.
    back = h.new_cpu_locked_tensor(size, torch.empty(0, dtype=torch.uint8))
    offset = 0
    for blocks in partitions:
        n = blocks * BLOCK_SIZE
        assert h.sync_pread(torch.narrow(back, 0, 0, n), ref, offset) == 1
        assert bytes(back[:n].tolist()) == data[offset:offset + n]
        offset += n
    fd = os.open(ref, os.O_RDONLY)
    assert h.async_pread(back, fd, 0) == 0   # deepspeed/io's positional fd form
    assert h.wait() == 1
    os.close(fd)
    assert bytes(back.tolist()) == data
    assert h.free_cpu_locked_tensor(source) and h.free_cpu_locked_tensor(back)


def test_locked_tensors_is_pinned_and_free_like_deepspeeds_manager():
    h, other = zinf.aio_handle(1024, 2, False, False, 1), zinf.aio_handle(1024, 2, False, False, 1)
    locked = h.new_cpu_locked_tensor(4096, example_tenosr=torch.empty(0))   # DeepSpeed's spelling
    assert locked.dtype == torch.float32 and locked.numel() == 4096
    assert h.is_pinned(locked)
    assert h.is_pinned(locked.narrow(0, 1024, 1024))
    assert other.is_pinned(locked)     # process-wide, as DeepSpeed's manager
    assert not h.is_pinned(torch.empty(4096))
    # free: True once; False for a view, a foreign tensor, or again.
    assert h.free_cpu_locked_tensor(locked.narrow(0, 1024, 1024)) is False
    assert other.free_cpu_locked_tensor(locked) is False
    assert h.free_cpu_locked_tensor(torch.empty(16)) is False
    assert h.free_cpu_locked_tensor(torch.empty(16, device="meta")) is False
    assert h.free_cpu_locked_tensor(locked) is True
    assert h.free_cpu_locked_tensor(locked) is False
    assert not h.is_pinned(locked)


def test_swap_buffer_manager_pattern(scratch):
    """deepspeed/runtime/swap_tensor/utils.py: locked buffers zeroed,
    narrowed per tensor, checked with is_pinned, swapped out and in with
    the count wait() returns asserted."""
    h = zinf.aio_handle(block_size=1048576, queue_depth=8, single_submit=False, overlap_events=True,
                        intra_op_parallelism=1)
    numel = 100_000
    buffers = [h.new_cpu_locked_tensor(numel, torch.zeros(1, device="cpu", dtype=torch.float16)).zero_()
               for _ in range(3)]
    views = [b.narrow(0, 0, 70_001 + i) for i, b in enumerate(buffers)]
    assert all(h.is_pinned(v) for v in views)
    values = [torch.randn(v.numel()).half() for v in views]
    paths = [os.path.join(scratch, f"tensor{i}.swp") for i in range(3)]
    for view, value, path in zip(views, values, paths):
        view.copy_(value)
        assert h.async_pwrite(view, path, 0) == 0
    assert len(views) == h.wait()
    for view in views:
        view.zero_()
    for view, path in zip(views, paths):
        assert h.async_pread(view, path, 0) == 0
    assert h.wait() == len(views)
    assert all(torch.equal(v, value) for v, value in zip(views, values))
    assert all(h.free_cpu_locked_tensor(b) for b in buffers)


def test_non_contiguous_buffers_go_through_a_copy(scratch):
    h = zinf.aio_handle(BLOCK_SIZE, QUEUE_DEPTH, False, False, IO_PARALLEL)
    matrix = torch.randn(64, 48)
    transposed = matrix.t()
    path = os.path.join(scratch, "t.bin")
    assert h.sync_pwrite(transposed, path) == 1
    back = torch.empty(64, 48).t()
    assert h.async_pread(back, path) == 0
    assert h.wait() == 1
    assert torch.equal(back, transposed)


def test_module_functions_aio_read_aio_write_deepspeed_memcpy(scratch):
    ref, data = reference_file(scratch, 3 * 4096 + 100)
    buffer = torch.empty(len(data), dtype=torch.uint8)
    assert zinf.aio_read(buffer, ref, 1024, 2, False, True, True) == 0
    assert bytes(buffer.tolist()) == data
    out = os.path.join(scratch, "w.bin")
    assert zinf.aio_write(buffer, out, 1048576, 8, True, False, False) == 0
    assert filecmp.cmp(ref, out, shallow=False)
    with pytest.raises(ValueError, match="bytes"):
        zinf.aio_read(torch.empty(10, dtype=torch.uint8), ref, 1024, 2, False, True, False)
    with pytest.raises(OSError):
        zinf.aio_read(buffer, os.path.join(scratch, "missing"), 1024, 2, False, True, False)
    dest, src = torch.zeros(1000), torch.randn(1000)
    assert zinf.deepspeed_memcpy(dest, src) == 0
    assert torch.equal(dest, src)
    with pytest.raises(ValueError, match="bytes"):
        zinf.deepspeed_memcpy(torch.zeros(3), torch.zeros(4))


# -- CPU optimizers ----------------------------------------------------------------
def test_deepspeed_names_opt_id_and_adam_w_mode():
    assert zinf.DeepSpeedCPUAdam is zinf.CPUAdam
    params = [torch.nn.Parameter(torch.randn(8))]
    first, second = zinf.DeepSpeedCPUAdam(params), zinf.DeepSpeedCPUAdam(params, adamw_mode=False)
    assert second.opt_id == first.opt_id + 1
    assert first.adam_w_mode is True and second.adam_w_mode is False
    a, b = zinf.DeepSpeedCPUAdagrad(params), zinf.DeepSpeedCPUAdagrad(params)
    assert b.opt_id == a.opt_id + 1
    assert zinf.DeepSpeedCPULion(params).opt_id >= 0
    assert first.fp32_optimizer_states is True


@pytest.mark.parametrize("cls", [zinf.CPUAdam, zinf.CPUAdagrad, zinf.CPULion])
def test_a_param_off_the_cpu_is_an_assertion_error_and_a_value_error(cls):
    p = torch.nn.Parameter(torch.ones(4, device="meta"))
    p.grad = torch.ones(4, device="meta")
    with pytest.raises(AssertionError, match="must be 'cpu'"):
        cls([p]).step()
    with pytest.raises(ValueError, match="is on meta"):
        cls([p]).step()


def check_equal(a, b, atol=1e-2):
    """DeepSpeed's op tests compare with this (norms, or elementwise)."""
    torch.testing.assert_close(a.detach().float(), b.detach().float(), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model_size", [64, 22, 1024])
def test_cpu_adam_tracks_torch_adamw_as_deepspeeds_test(dtype, model_size):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(model_size).to(dtype))
    reference = torch.nn.Parameter(param.detach().clone().float())
    ours, theirs = zinf.DeepSpeedCPUAdam([param]), torch.optim.AdamW([reference], weight_decay=0)
    for _ in range(10):
        param.grad = torch.randn(model_size).to(dtype)
        reference.grad = param.grad.detach().float()
        ours.step()
        theirs.step()
    tolerance = float(reference.detach().norm()) * 1e-2
    check_equal(param.float().norm(), reference.norm(), atol=tolerance)


def test_bf16_states_when_fp32_optimizer_states_is_false():
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    p.grad = torch.randn(64).bfloat16()
    optimizer = zinf.DeepSpeedCPUAdam([p], fp32_optimizer_states=False)
    optimizer.step()
    assert optimizer.state[p]["exp_avg"].dtype == torch.bfloat16
    assert optimizer.state[p]["exp_avg_sq"].dtype == torch.bfloat16


def test_non_contiguous_params_are_stepped_in_place():
    torch.manual_seed(1)
    base = torch.randn(24, 16)
    param = torch.nn.Parameter(base.clone().t())          # not contiguous
    reference = torch.nn.Parameter(base.clone().t().contiguous())
    ours, theirs = zinf.CPUAdam([param], lr=1e-2), torch.optim.Adam([reference], lr=1e-2)
    for _ in range(5):
        grad = torch.randn(16, 24)
        param.grad, reference.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert not param.is_contiguous()
    torch.testing.assert_close(param.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def test_lion_state_has_deepspeeds_keys():
    p = torch.nn.Parameter(torch.randn(32))
    p.grad = torch.randn(32)
    optimizer = zinf.DeepSpeedCPULion([p])
    optimizer.step()
    assert set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    assert optimizer.state[p]["exp_avg"].abs().sum() > 0


def sparse_grad(rows, vocabulary, dim, generator):
    chosen = torch.randperm(vocabulary, generator=generator)[:rows]
    index = (chosen[:, None] * dim + torch.arange(dim)).reshape(1, -1)
    values = torch.randn(index.shape[1], generator=generator)
    return torch.sparse_coo_tensor(index, values, (vocabulary * dim,)).coalesce()


def test_cpu_adagrad_with_sparse_gradients_matches_torch():
    """test_cpu_adagrad.py's sparse embedding case: a 1-D param with
    coalesced sparse gradients naming a few rows."""
    vocabulary, dim = 64, 16
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(vocabulary * dim))
    reference = torch.nn.Parameter(param.detach().clone())
    ours, theirs = zinf.DeepSpeedCPUAdagrad([param]), torch.optim.Adagrad([reference])
    generator = torch.Generator().manual_seed(2)
    untouched = None
    for _ in range(10):
        grad = sparse_grad(2, vocabulary, dim, generator)
        param.grad, reference.grad = grad.clone(), grad.clone()
        before = param.detach().clone()
        ours.step()
        theirs.step()
        untouched = torch.ones(vocabulary * dim, dtype=torch.bool)
        untouched[grad.indices()[0]] = False
        assert torch.equal(param.detach()[untouched], before[untouched])
    torch.testing.assert_close(param.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


def test_cpu_adagrad_steps_a_sparse_embedding_like_torch():
    torch.manual_seed(0)
    ours_model, theirs_model = torch.nn.Embedding(50, 8, sparse=True), torch.nn.Embedding(50, 8, sparse=True)
    theirs_model.load_state_dict(ours_model.state_dict())
    ours, theirs = zinf.CPUAdagrad(ours_model.parameters(), lr=0.1), \
        torch.optim.Adagrad(theirs_model.parameters(), lr=0.1)
    for step in range(6):
        ids = torch.tensor([[1, 4, 4, 9], [step, 7, 1, 30]])
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            model(ids).pow(2).sum().backward()
            optimizer.step()
    torch.testing.assert_close(ours_model.weight.detach(), theirs_model.weight.detach(), rtol=1e-6, atol=1e-7)


# -- CPUAdam sub-groups (DeepSpeed's SuperOffload) ------------------------------------
def subgroup_optimizer(dtype=torch.float32, n=128, seed=0):
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(n).to(dtype))
    return param, zinf.DeepSpeedCPUAdam([param], lr=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_step_subgroup_keeps_state_under_the_subgroup_id(dtype):
    param, optimizer = subgroup_optimizer(dtype)
    param.grad = torch.randn(param.shape).to(dtype)
    before = param.detach().clone()
    for expected in (1, 2, 3):
        optimizer.step_subgroup(0)
        assert 0 in optimizer.state and optimizer.state[0]["step"] == expected
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer.state[0])
    assert not torch.equal(param.detach(), before)
    for expected in (2, 1, 0):
        optimizer.rollback_subgroup(0)
        assert optimizer.state[0]["step"] == expected
    with pytest.raises(RuntimeError, match="Cannot rollback sub_group_id 0: step count is 0"):
        optimizer.rollback_subgroup(0)
    with pytest.raises(RuntimeError, match="Cannot rollback optimizer state for sub_group_id 7"):
        optimizer.rollback_subgroup(7)


@pytest.mark.parametrize("adamw_mode", [True, False])
def test_rollback_subgroup_restores_param_and_moments(adamw_mode):
    torch.manual_seed(3)
    param = torch.nn.Parameter(torch.randn(256))
    optimizer = zinf.CPUAdam([param], lr=1e-2, weight_decay=0.05, adamw_mode=adamw_mode)
    for _ in range(3):
        param.grad = torch.randn(256)
        optimizer.step_subgroup(1)
    saved = (param.detach().clone(), optimizer.state[1]["exp_avg"].clone(), optimizer.state[1]["exp_avg_sq"].clone())
    param.grad = torch.randn(256)
    optimizer.step_subgroup(1)
    optimizer.rollback_subgroup(1)
    assert optimizer.state[1]["step"] == 3
    for got, want in zip((param.detach(), optimizer.state[1]["exp_avg"], optimizer.state[1]["exp_avg_sq"]), saved):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Stepping again after the rollback gives the step it undid.
    optimizer.step_subgroup(1)
    redo = param.detach().clone()
    optimizer.rollback_subgroup(1)
    optimizer.step_subgroup(1)
    torch.testing.assert_close(param.detach(), redo, rtol=1e-5, atol=1e-6)


def test_subgroups_are_independent_and_deterministic():
    torch.manual_seed(4)
    a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))
    twin_a, twin_b = torch.nn.Parameter(a.detach().clone()), torch.nn.Parameter(b.detach().clone())
    grads = [torch.randn(64) for _ in range(3)]
    optimizer = zinf.DeepSpeedCPUAdam([a])
    for grad in grads:
        for param, subgroup in ((a, 0), (b, 1)):
            optimizer.param_groups[0]["params"] = [param]
            param.grad = grad.clone()
            optimizer.step_subgroup(subgroup)
    assert optimizer.state[0]["step"] == optimizer.state[1]["step"] == 3
    optimizer.param_groups[0]["params"] = [a]   # rollback works on the groups' param, as DeepSpeed's
    optimizer.rollback_subgroup(0)
    assert (optimizer.state[0]["step"], optimizer.state[1]["step"]) == (2, 3)
    # The same as a plain optimizer per param.
    for twin in (twin_a, twin_b):
        plain = zinf.DeepSpeedCPUAdam([twin])
        for grad in grads:
            twin.grad = grad.clone()
            plain.step()
    assert torch.equal(b.detach(), twin_b.detach())
    with pytest.raises(ValueError, match="one"):
        a.grad, b.grad = torch.randn(64), torch.randn(64)
        optimizer.param_groups[0]["params"] = [a, b]
        optimizer.step_subgroup(2)


def test_log_dist_logs_on_the_ranks_named_as_deepspeeds(caplog):
    """Without a process group every call logs (rank -1); the message
    carries the rank as DeepSpeed's does."""
    from zinf.utils import log_dist, logger
    assert logger.name == "zinf"
    with caplog.at_level("INFO", logger="zinf"):
        log_dist("hello", ranks=[0])
        log_dist("debug only", ranks=[-1], level=10)
    assert [r.getMessage() for r in caplog.records] == ["[Rank -1] hello"]


def test_log_dist_prints_where_nothing_configured_logging(scratch):
    """A script that set up no logging sees the lines (DeepSpeed's logger
    has its own handler); inside a process group, only the ranks named."""
    import subprocess
    import sys
    script = "\n".join([
        "import torch.distributed as dist",
        "from zinf.utils import log_dist",
        "log_dist('before the group', ranks=[0])",
        f"dist.init_process_group('gloo', init_method='file://{scratch}/store', rank=0, world_size=1)",
        "log_dist('rank zero named', ranks=[0])",
        "log_dist('every rank', ranks=[-1])",
        "log_dist('rank one named', ranks=[1])",
        "log_dist('no rank named')",
        "dist.destroy_process_group()"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[Rank -1] before the group", "[Rank 0] rank zero named", "[Rank 0] every rank"]

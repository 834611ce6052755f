"""zinf.aio_handle against DeepSpeed's aio_handle contract."""
import errno
import gc
import itertools
import os

import pytest
import torch

import zinf
from zinf import _zinf


def test_constructor_defaults_and_accessors_are_deepspeeds():
    h = zinf.aio_handle()
    assert (h.get_block_size(), h.get_queue_depth(), h.get_single_submit(), h.get_overlap_events(),
            h.get_intra_op_parallelism()) == (1048576, 128, False, False, 1)
    h = zinf.aio_handle(block_size=65536, queue_depth=8, single_submit=True, overlap_events=True,
                        intra_op_parallelism=2)
    assert (h.get_block_size(), h.get_queue_depth(), h.get_single_submit(), h.get_overlap_events(),
            h.get_intra_op_parallelism()) == (65536, 8, True, True, 2)


@pytest.mark.parametrize("single_submit,overlap_events,threads", list(itertools.product([False, True], [False, True], [1, 2])))
def test_round_trips_with_offsets_in_every_flag_combination(scratch, single_submit, overlap_events, threads):
    h = zinf.aio_handle(block_size=65536, queue_depth=4, single_submit=single_submit,
                        overlap_events=overlap_events, intra_op_parallelism=threads)
    path = os.path.join(scratch, "tensor.bin")
    torch.manual_seed(0)
    first = torch.randn(100_003)              # not a multiple of 4096 bytes
    second = torch.randn(4096, dtype=torch.float64).to(torch.bfloat16)
    offset = first.numel() * 4
    assert h.sync_pwrite(first, path) == 1
    assert h.async_pwrite(second, path, offset) == 0
    assert h.wait() == 1
    assert os.path.getsize(path) == offset + second.numel() * 2
    back_first, back_second = torch.empty_like(first), torch.empty_like(second)
    assert h.async_pread(back_second, path, offset) == 0
    assert h.sync_pread(back_first, path) == 1
    assert h.wait() == 1
    assert torch.equal(back_first, first) and torch.equal(back_second, second)
    # pread/pwrite with validate, both ways.
    third = torch.arange(12345, dtype=torch.int32).to(torch.float32)
    assert h.pwrite(third, path, True, False, 8192) == 1
    back = torch.empty_like(third)
    assert h.pread(back, path, True, True, 8192) == 0
    assert h.wait() == 1
    assert torch.equal(back, third)


def test_pinned_tensors_round_trip_and_leak_nothing(scratch):
    h = zinf.aio_handle()
    path = os.path.join(scratch, "pinned.bin")
    t = h.new_cpu_locked_tensor(1 << 20, torch.empty(0, dtype=torch.float16))
    assert t.dtype == torch.float16 and t.numel() == 1 << 20
    t.copy_(torch.randn(1 << 20).half())
    h.sync_pwrite(t, path)
    back = h.new_cpu_locked_tensor(1 << 20, t)
    h.sync_pread(back, path)
    assert torch.equal(back, t)
    h.free_cpu_locked_tensor(t)
    h.free_cpu_locked_tensor(back)
    del t, back
    gc.collect()
    before = _zinf.pinned_buffers_in_use()
    for i in range(1000):
        x = h.new_cpu_locked_tensor(1000 + i, torch.empty(0))
        x.fill_(1.0)
        h.free_cpu_locked_tensor(x)
        del x
    gc.collect()
    assert _zinf.pinned_buffers_in_use() == before
    assert _zinf.pinned_bytes_in_use() == 0


def test_freed_locked_memory_is_reused_not_mapped_again():
    """A freed page-locked buffer is kept for the next one of its size (a
    prefetch every step must not mmap + mlock fresh memory)."""
    h = zinf.aio_handle()
    _zinf.release_cached_pinned()
    first = h.new_cpu_locked_tensor(1 << 16, torch.empty(0))
    address = first.data_ptr()
    assert h.free_cpu_locked_tensor(first)
    del first
    gc.collect()
    assert _zinf.pinned_cached_bytes() == 4 << 16
    again = h.new_cpu_locked_tensor(1 << 16, torch.empty(0))
    assert again.data_ptr() == address
    assert _zinf.pinned_cached_bytes() == 0
    # A tensor still alive keeps its memory out of the cache.
    assert h.free_cpu_locked_tensor(again)
    other = h.new_cpu_locked_tensor(1 << 16, torch.empty(0))
    assert other.data_ptr() != again.data_ptr()
    again.fill_(3.0)
    assert torch.all(again == 3.0)
    _zinf.release_cached_pinned()
    assert _zinf.pinned_cached_bytes() == 0


def test_io_errors_are_oserror_with_errno_and_filename(scratch):
    h = zinf.aio_handle()
    missing = os.path.join(scratch, "missing.bin")
    with pytest.raises(OSError) as caught:
        h.sync_pread(torch.empty(1024), missing)
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == missing
    with pytest.raises(OSError) as caught:
        h.sync_pwrite(torch.empty(1024), os.path.join(scratch, "no-dir", "x.bin"))
    assert caught.value.errno == errno.ENOENT
    # A read past the end: the error names the file and the offset, from wait().
    short = os.path.join(scratch, "short.bin")
    h.sync_pwrite(torch.zeros(100), short)
    h.async_pread(torch.empty(10_000), short, 0)
    with pytest.raises(OSError) as caught:
        h.wait()
    assert short in str(caught.value) and "offset" in str(caught.value)


def test_bad_arguments_are_valueerror_or_typeerror(scratch):
    h = zinf.aio_handle()
    path = os.path.join(scratch, "x.bin")
    with pytest.raises(TypeError):
        h.sync_pwrite([1, 2, 3], path)
    with pytest.raises(ValueError, match="negative"):
        h.sync_pwrite(torch.zeros(8), path, -1)
    with pytest.raises(ValueError, match="block_size"):
        zinf.aio_handle(block_size=1000)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            h.sync_pwrite(torch.zeros(8, device="cuda"), path)


def test_wait_releases_the_gil(scratch):
    """Another Python thread keeps running while wait() blocks."""
    import threading
    import time
    h = zinf.aio_handle(block_size=1 << 20, queue_depth=2)
    path = os.path.join(scratch, "big.bin")
    data = torch.ones(64 << 20, dtype=torch.uint8)
    h.sync_pwrite(data, path)
    ticks = []
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            ticks.append(time.monotonic())

    backs = [torch.empty_like(data) for _ in range(4)]
    for back in backs:
        h.async_pread(back, path)
    thread = threading.Thread(target=spin)
    thread.start()
    time.sleep(0.01)
    began = time.monotonic()
    h.wait()
    ended = time.monotonic()
    stop.set()
    thread.join()
    assert all(torch.equal(back, data) for back in backs)
    during = [t for t in ticks if began < t < ended]
    assert ended - began > 0 and len(during) > 0, (ended - began, len(ticks))

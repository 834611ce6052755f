"""DeepSpeed's ``deepspeed.ops`` and ``deepspeed.accelerator`` by zinf's
paths: code written against them (DeepSpeed's op tests, training scripts
that build DeepSpeedCPUAdam or ask get_accelerator() for the device) runs
with ``deepspeed`` replaced by ``zinf``. Each op is checked against torch's
optimizer or a file written and read back."""
import os
import subprocess
import sys

import pytest
import torch

import zinf
import zinf as deepspeed
from zinf.accelerator import CPU_Accelerator, get_accelerator, set_accelerator
from zinf.ops.op_builder import (AsyncIOBuilder, CPUAdagradBuilder, CPUAdamBuilder, CPULionBuilder, FusedAdamBuilder,
                                 FusedLionBuilder, GDSBuilder)

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from initialize_model import make_model  # noqa: E402
from test_initialize import config_for, train_both  # noqa: E402


# -- op builders --------------------------------------------------------------------------------
def test_compatible_ops_say_what_loads_here():
    ops = deepspeed.ops.__compatible_ops__
    for builder in (AsyncIOBuilder, CPUAdamBuilder, CPUAdagradBuilder, CPULionBuilder, FusedAdamBuilder,
                    FusedLionBuilder):
        assert ops[builder.NAME] is True, builder.NAME
        assert builder().is_compatible() and builder().load() is builder().load()
    for builder in (GDSBuilder,):
        assert ops[builder.NAME] is False
        with pytest.raises(RuntimeError, match=builder.__name__):
            builder().load()
    assert AsyncIOBuilder.NAME == "async_io" and CPUAdamBuilder.NAME == "cpu_adam"
    assert deepspeed.ops.aio.AsyncIOBuilder is AsyncIOBuilder


def test_optimizer_classes_by_deepspeeds_module_paths():
    assert deepspeed.ops.adam.DeepSpeedCPUAdam is zinf.DeepSpeedCPUAdam
    assert deepspeed.ops.adagrad.DeepSpeedCPUAdagrad is zinf.DeepSpeedCPUAdagrad
    assert deepspeed.ops.lion.DeepSpeedCPULion is zinf.DeepSpeedCPULion
    assert deepspeed.ops.lion.FusedLion is not None and deepspeed.ops.adam.FusedAdam is not None


@pytest.mark.parametrize("size", [1 << 20, 1000 * 1000 + 3])
def test_async_io_op_writes_and_reads_back_as_deepspeeds_test(scratch, size):
    """DeepSpeed's test_aio pattern: a handle from AsyncIOBuilder().load(),
    a buffer from get_accelerator().pin_memory, a file written and read
    back byte for byte, sync and async."""
    handle = AsyncIOBuilder().load().aio_handle(1024 * 1024, 32, False, True, 2)
    written = get_accelerator().pin_memory(torch.randint(0, 255, (size,), dtype=torch.uint8))
    path = os.path.join(scratch, "aio.bin")
    assert handle.sync_pwrite(written, path) == 1
    read = get_accelerator().pin_memory(torch.zeros(size, dtype=torch.uint8))
    assert handle.async_pread(read, path) == 0
    assert handle.wait() == 1
    assert torch.equal(read, written)
    assert os.path.getsize(path) == size


def _adam_reference(param, adamw, weight_decay):
    kind = torch.optim.AdamW if adamw else torch.optim.Adam
    return kind([param], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)


@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_adam_op_steps_as_torch(adamw, dtype):
    """create_adam / adam_update / destroy_adam as DeepSpeedCPUAdam calls
    them: tensors stepped in place, AdamW or L2 decay as created."""
    op = CPUAdamBuilder().load()
    assert op.create_adam(7, 1e-2, 0.9, 0.99, 1e-8, 0.1, adamw, False) == 0
    torch.manual_seed(0)
    param = torch.randn(3000).to(dtype)
    exp_avg, exp_avg_sq = torch.zeros(3000), torch.zeros(3000)
    reference = torch.nn.Parameter(param.float().clone())  # its own memory, fp32 too
    torch_optimizer = _adam_reference(reference, adamw, 0.1)
    for step in range(1, 6):
        grad = torch.randn(3000)
        assert op.adam_update(7, step, 1e-2, 0.9, 0.99, 1e-8, 0.1, True, param, grad.to(dtype), exp_avg,
                              exp_avg_sq) == 0
        reference.grad = grad.to(dtype).float()
        torch_optimizer.step()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(param.float(), reference.detach(), atol=tolerance, rtol=tolerance)
    state = torch_optimizer.state[reference]
    if dtype == torch.float32:
        torch.testing.assert_close(exp_avg, state["exp_avg"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], atol=1e-6, rtol=1e-5)
    assert op.destroy_adam(7) == 0
    with pytest.raises(ValueError, match="no CPU adam optimizer has id 7: call create_adam"):
        op.adam_update(7, 6, 1e-2, 0.9, 0.99, 1e-8, 0.1, True, param, grad, exp_avg, exp_avg_sq)


def test_cpu_adam_op_writes_a_non_contiguous_param_back():
    op = CPUAdamBuilder().load()
    op.create_adam(8, 1e-2, 0.9, 0.999, 1e-8, 0.0, True, False)
    matrix = torch.randn(40, 30)
    column_major = matrix.t()  # not contiguous
    reference = torch.nn.Parameter(column_major.clone())
    torch_optimizer = torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.0)
    grad = torch.randn(30, 40)
    op.adam_update(8, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0, True, column_major, grad, torch.zeros(30, 40),
                   torch.zeros(30, 40))
    reference.grad = grad
    torch_optimizer.step()
    torch.testing.assert_close(matrix.t(), reference.detach(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="has shape"):
        op.adam_update(8, 2, 1e-2, 0.9, 0.999, 1e-8, 0.0, True, torch.zeros(4), torch.zeros(5), torch.zeros(4),
                       torch.zeros(4))
    op.destroy_adam(8)


def test_cpu_adagrad_op_steps_as_torch():
    op = CPUAdagradBuilder().load()
    op.create_adagrad(3, 1e-2, 1e-10, 0.01, False)
    torch.manual_seed(1)
    param, squares = torch.randn(500), torch.zeros(500)
    reference = torch.nn.Parameter(param.clone())
    torch_optimizer = torch.optim.Adagrad([reference], lr=1e-2, eps=1e-10, weight_decay=0.01)
    for step in range(1, 5):
        grad = torch.randn(500)
        op.adagrad_update(3, step, 1e-2, 1e-10, 0.01, param, grad, squares)
        reference.grad = grad
        torch_optimizer.step()
    torch.testing.assert_close(param, reference.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(squares, torch_optimizer.state[reference]["sum"], atol=1e-6, rtol=1e-5)
    op.destroy_adagrad(3)


def test_cpu_lion_op_is_the_published_update():
    op = CPULionBuilder().load()
    op.create_lion(4, 1e-3, 0.9, 0.99, 0.1, False)
    torch.manual_seed(2)
    param, momentum = torch.randn(700), torch.zeros(700)
    want_param, want_momentum = param.clone(), momentum.clone()
    for step in range(1, 4):
        grad = torch.randn(700)
        op.lion_update(4, step, 1e-3, 0.9, 0.99, 0.1, param, grad, momentum)
        update = torch.sign(0.9 * want_momentum + 0.1 * grad)
        want_param = want_param * (1 - 1e-3 * 0.1) - 1e-3 * update
        want_momentum = 0.99 * want_momentum + 0.01 * grad
    torch.testing.assert_close(param, want_param, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(momentum, want_momentum, atol=1e-6, rtol=1e-6)
    op.destroy_lion(4)


# -- FusedAdam ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,torch_kind", [(1, torch.optim.AdamW), (0, torch.optim.Adam)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_adam_op_is_torchs_adam_in_both_modes(mode, torch_kind, dtype):
    """FusedAdamBuilder().load().multi_tensor_adam as DeepSpeed's FusedAdam
    calls it: [grads, params, exp_avgs, exp_avg_sqs], mode 1 AdamW, mode 0
    L2; fp32 math written back in the tensors' dtype."""
    op = FusedAdamBuilder().load()
    torch.manual_seed(4)
    params = [torch.randn(33).to(dtype), torch.randn(5, 7).to(dtype)]
    states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    references = [torch.nn.Parameter(p.float().clone()) for p in params]
    torch_optimizer = torch_kind(references, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    no_overflow = torch.zeros(1, dtype=torch.int32)
    for step in range(1, 5):
        grads = [torch.randn(p.shape).to(dtype) for p in params]
        op.multi_tensor_adam(2048 * 32, no_overflow, [grads, params, [m for m, _ in states], [v for _, v in states]],
                             0.01, 0.9, 0.95, 1e-8, step, mode, 1, 0.05)
        for reference, grad in zip(references, grads):
            reference.grad = grad.float()
        torch_optimizer.step()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for param, reference in zip(params, references):
        torch.testing.assert_close(param.float(), reference.detach(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("adam_w_mode,torch_kind", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_fused_adam_is_torchs_adam_or_adamw_by_adam_w_mode(adam_w_mode, torch_kind):
    torch.manual_seed(3)
    ours = torch.nn.Parameter(torch.randn(64, 8))
    theirs = torch.nn.Parameter(ours.detach().clone())
    fused = deepspeed.ops.adam.FusedAdam([ours], lr=0.05, betas=(0.8, 0.9), weight_decay=0.1,
                                         adam_w_mode=adam_w_mode)
    reference = torch_kind([theirs], lr=0.05, betas=(0.8, 0.9), weight_decay=0.1)
    for _ in range(4):
        grad = torch.randn(64, 8)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-6)
    assert fused.param_groups[0]["weight_decay"] == 0.1  # put back after the decoupled decay
    fused.zero_grad()
    assert ours.grad is None  # set_grad_none, DeepSpeed's default
    restored = deepspeed.ops.adam.FusedAdam([torch.nn.Parameter(ours.detach().clone())], lr=0.05)
    restored.load_state_dict(fused.state_dict())
    assert restored.param_groups[0]["betas"] == (0.8, 0.9)
    with pytest.raises(RuntimeError, match="FusedAdam has been updated"):
        fused.step(scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lion_steps_as_zinfs_cpu_lion(dtype):
    """FusedLion (DeepSpeed's constructor and state keys, stepped by
    FusedLionBuilder's multi_tensor_lion) against zinf's CPU Lion kernel,
    itself checked against the published update in test_optim.py."""
    torch.manual_seed(6)
    ours = torch.nn.Parameter(torch.randn(300).to(dtype))
    theirs = torch.nn.Parameter(ours.detach().clone())
    fused = deepspeed.ops.lion.FusedLion([ours], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    reference = zinf.CPULion([theirs], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, fp32_optimizer_states=False)
    for _ in range(4):
        grad = torch.randn(300).to(dtype)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        fused.step()
        reference.step()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.detach().float(), theirs.detach().float(), atol=tolerance, rtol=tolerance)
    assert fused.state[ours]["step"] == 4 and fused.state[ours]["exp_avg"].dtype == dtype
    fused.zero_grad()
    assert ours.grad is None


# -- an optimizer built by the script, passed to initialize --------------------------------------
@pytest.mark.parametrize("build,build_reference", [
    (lambda ps: deepspeed.ops.adam.DeepSpeedCPUAdam(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.01),
     lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.99), weight_decay=0.01)),
    (lambda ps: deepspeed.ops.adam.DeepSpeedCPUAdam(ps, lr=0.01, weight_decay=0.01, adamw_mode=False),
     lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.01)),
    (lambda ps: deepspeed.ops.adam.FusedAdam(ps, lr=0.02, weight_decay=0.05),
     lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.05)),
    (lambda ps: deepspeed.ops.lion.DeepSpeedCPULion(ps, lr=0.003, betas=(0.9, 0.95), weight_decay=0.1),
     lambda ps: zinf.CPULion(ps, lr=0.003, betas=(0.9, 0.95), weight_decay=0.1)),
    (lambda ps: deepspeed.ops.lion.FusedLion(ps, lr=0.002, weight_decay=0.05),
     lambda ps: zinf.CPULion(ps, lr=0.002, weight_decay=0.05)),
], ids=["cpu-adamw", "cpu-adam-l2", "fused-adam", "cpu-lion", "fused-lion"])
def test_deepspeeds_optimizers_passed_in_train_as_their_settings_say(build, build_reference):
    """DeepSpeed scripts build DeepSpeedCPUAdam (or FusedAdam, Lion) and
    pass it to initialize; the engine steps what it describes."""
    model, plain = make_model(), make_model()
    config = config_for(2, "cpu", train_batch_size=4)
    del config["optimizer"]
    engine, _, _, _ = zinf.initialize(model=model, optimizer=build(model.parameters()), config=config)
    train_both(engine, plain, build_reference(list(plain.parameters())), 3)


def test_an_adam_without_bias_correction_passed_in_keeps_it():
    model = make_model()
    optimizer = deepspeed.ops.adam.DeepSpeedCPUAdam(model.parameters(), lr=0.01, bias_correction=False)
    engine, _, _, _ = zinf.initialize(model=model, optimizer=optimizer, config={"train_batch_size": 4})
    assert engine._settings["optimizer"]["params"]["bias_correction"] is False
    engine.close()


# -- get_accelerator ------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU accelerator is chosen only where torch sees no GPU")
def test_without_a_gpu_the_accelerator_is_the_cpu_as_deepspeeds():
    accelerator = get_accelerator()
    assert isinstance(accelerator, CPU_Accelerator) and accelerator._name == "cpu"
    assert accelerator.device_name() == "cpu" and accelerator.device_name(0) == "cpu"
    assert accelerator.current_device_name() == "cpu" and accelerator.is_available()
    assert accelerator.communication_backend_name() == "gloo"
    assert accelerator.supported_dtypes() == [torch.float, torch.bfloat16]
    assert accelerator.is_bf16_supported() and not accelerator.is_fp16_supported()
    assert accelerator.on_accelerator(torch.zeros(1)) and not accelerator.on_accelerator(torch.zeros(1, device="meta"))
    assert accelerator.device_count() >= 1
    assert accelerator.Stream is None and accelerator.Event is None
    with accelerator.stream(accelerator.current_stream()):
        accelerator.synchronize()
    assert accelerator.ByteTensor([1, 2]).dtype == torch.uint8
    assert isinstance(accelerator.create_op_builder("AsyncIOBuilder"), AsyncIOBuilder)
    assert accelerator.get_op_builder("NoSuchBuilder") is None
    assert get_accelerator() is accelerator


def test_the_cpu_accelerator_counts_the_resident_set():
    accelerator = CPU_Accelerator()
    accelerator.reset_peak_memory_stats()
    before = accelerator.memory_allocated()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    grown = accelerator.memory_allocated()
    assert grown - before >= 48 << 20, (before, grown)
    del block
    assert accelerator.max_memory_allocated() >= grown
    assert accelerator.memory_stats()["allocated_bytes.all.peak"] >= grown
    assert accelerator.total_memory() > accelerator.available_memory() > 0


def test_the_cpu_accelerator_seeds_torchs_generator():
    accelerator = CPU_Accelerator()
    accelerator.manual_seed(5)
    first = torch.rand(4)
    accelerator.manual_seed_all(5)
    assert torch.equal(first, torch.rand(4))
    state = accelerator.get_rng_state()
    again = torch.rand(4)
    accelerator.set_rng_state(state)
    assert torch.equal(again, torch.rand(4))


def _choose_in_a_fresh_process(value):
    env = dict(os.environ, DS_ACCELERATOR=value, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-c", "from zinf.accelerator import get_accelerator as g; "
                           "print(type(g()).__name__)"], env=env, capture_output=True, text=True, timeout=120)


def test_ds_accelerator_chooses_it_and_a_wrong_one_is_named():
    chosen = _choose_in_a_fresh_process("cpu")
    assert chosen.returncode == 0 and chosen.stdout.strip() == "CPU_Accelerator", chosen.stderr
    wrong = _choose_in_a_fresh_process("tpu")
    assert wrong.returncode != 0 and "DS_ACCELERATOR='tpu'" in wrong.stderr
    if not torch.cuda.is_available():
        cuda = _choose_in_a_fresh_process("cuda")
        assert cuda.returncode != 0 and "torch sees no CUDA device" in cuda.stderr
    with pytest.raises(TypeError, match="DeepSpeedAccelerator"):
        set_accelerator("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the CUDA accelerator needs one")
def test_with_a_gpu_the_accelerator_is_cuda():
    accelerator = get_accelerator()
    assert accelerator.device_name() == "cuda" and accelerator.device_name(0) == "cuda:0"
    assert accelerator.communication_backend_name() == "nccl"
    pinned = accelerator.pin_memory(torch.zeros(16))
    assert accelerator.is_pinned(pinned)
    tensor = torch.ones(1 << 20, device=accelerator.current_device_name())
    assert accelerator.on_accelerator(tensor) and accelerator.memory_allocated() >= 4 << 20
    stream = accelerator.Stream()
    with accelerator.stream(stream):
        tensor.mul_(2)
    event = accelerator.Event()
    event.record(stream)
    event.synchronize()
    assert float(tensor[0]) == 2.0
    assert torch.half in accelerator.supported_dtypes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: FusedAdam's fused path needs one")
@pytest.mark.parametrize("adam_w_mode,torch_kind", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_fused_adam_on_the_gpu_is_torchs(adam_w_mode, torch_kind):
    torch.manual_seed(5)
    ours = torch.nn.Parameter(torch.randn(1000, device="cuda"))
    theirs = torch.nn.Parameter(ours.detach().clone())
    fused = deepspeed.ops.adam.FusedAdam([ours], lr=0.01, weight_decay=0.1, adam_w_mode=adam_w_mode)
    reference = torch_kind([theirs], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        ours.grad = torch.randn(1000, device="cuda")
        theirs.grad = ours.grad.clone()
        fused.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-5, rtol=1e-5)

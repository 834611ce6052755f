"""zinf.checkpointing, DeepSpeed's activation checkpointing API: a
checkpointed block gives plain PyTorch's outputs and gradients (dropout
included: the recomputation draws the first run's random numbers), keeps
no activations of its own, and trains under zinf.initialize at stage 3."""
import os
import sys

import pytest
import torch

import zinf
from zinf import checkpointing

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from test_initialize import config_for  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_settings():
    checkpointing._forget_configuration()
    checkpointing.get_cuda_rng_tracker().reset()
    yield
    checkpointing._forget_configuration()


class Block(torch.nn.Module):
    def __init__(self, width, tracked=False):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.tracked = tracked
        self.runs = 0

    def forward(self, x, scale=1.0):
        self.runs += 1
        h = torch.tanh(self.linear(x)) * scale
        if self.tracked:  # Megatron's model-parallel dropout
            with checkpointing.get_cuda_rng_tracker().fork():
                return torch.nn.functional.dropout(h, 0.3, training=True)
        return torch.nn.functional.dropout(h, 0.3, training=True)


class Stack(torch.nn.Module):
    def __init__(self, checkpointed, tracked=False, width=8, depth=3):
        super().__init__()
        torch.manual_seed(11)
        self.blocks = torch.nn.ModuleList(Block(width, tracked) for _ in range(depth))
        self.head = torch.nn.Linear(width, 1)
        self.checkpoint = {False: None, True: checkpointing.checkpoint,
                           "non-reentrant": checkpointing.non_reentrant_checkpoint}[checkpointed]

    def forward(self, x):
        for block in self.blocks:
            x = self.checkpoint(block, x, 0.5) if self.checkpoint else block(x, 0.5)
        return self.head(x)


@pytest.mark.parametrize("kind", [True, "non-reentrant"])
@pytest.mark.parametrize("tracked", [False, True])
def test_a_checkpointed_stack_has_plain_outputs_and_gradients(tracked, kind):
    results = []
    for checkpointed in (False, kind):
        model = Stack(checkpointed, tracked)
        if tracked:
            checkpointing.model_parallel_cuda_manual_seed(1234)
        torch.manual_seed(5)
        x = torch.randn(6, 8, requires_grad=True)
        torch.manual_seed(6)  # the dropout masks' stream
        loss = model(x).pow(2).mean()
        loss.backward()
        results.append((loss.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        [block.runs for block in model.blocks]))
    (plain_loss, plain_x, plain_grads, plain_runs), (loss, x_grad, grads, runs) = results
    assert torch.equal(loss, plain_loss)
    assert len(grads) == len(plain_grads)
    torch.testing.assert_close(x_grad, plain_x, atol=1e-7, rtol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-7, rtol=1e-6, msg=name)
    assert plain_runs == [1, 1, 1] and runs == [2, 2, 2]  # each block ran again in backward


def test_the_random_state_after_a_checkpointed_backward_is_where_forward_left_it():
    model = Stack(True)
    torch.manual_seed(3)
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    after = torch.rand(3)
    model = Stack(False)
    torch.manual_seed(3)
    model(torch.randn(2, 8, requires_grad=True)).sum().backward()
    assert torch.equal(after, torch.rand(3))


def test_non_tensor_arguments_and_several_outputs_pass_through():
    weight = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(4, requires_grad=True)

    def block(value, label, power):
        return value * weight, (value * weight).pow(power).sum(), label

    scaled, total, label = checkpointing.checkpoint(block, x, "tag", 2)
    assert label == "tag"
    (scaled.sum() + total).backward()
    plain_x, plain_w = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ((plain_x * plain_w).sum() + (plain_x * plain_w).pow(2).sum()).backward()
    torch.testing.assert_close(x.grad, plain_x.grad)
    torch.testing.assert_close(weight.grad, plain_w.grad)


def test_profile_logs_each_checkpointed_pass(caplog):
    checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"profile": True,
                                                                                 "cpu_checkpointing": True}})
    assert checkpointing.is_configured()
    with caplog.at_level("INFO", logger="zinf"):
        Stack(True, depth=1)(torch.randn(2, 8, requires_grad=True)).sum().backward()
    messages = [r.getMessage() for r in caplog.records]
    assert any("checkpointed forward" in m for m in messages), messages
    assert any("checkpointed backward" in m for m in messages), messages


class ModelParallel:
    def __init__(self, world, rank=0):
        self.world, self.rank = world, rank

    def get_model_parallel_world_size(self):
        return self.world

    def get_model_parallel_rank(self):
        return self.rank


def test_reset_between_iterations_keeps_the_configuration():
    """DeepSpeed's eval loops call reset() (it frees its contiguous
    buffers): the settings stay."""
    checkpointing.configure(None, checkpoint_in_cpu=True, profile=True)
    checkpointing.reset()
    assert checkpointing.is_configured()
    assert checkpointing._settings["checkpoint_in_cpu"] and checkpointing._settings["profile"]


def test_configure_reads_the_block_and_names_what_it_refuses(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"activation_checkpointing": {"partition_activations": true, "number_checkpoints": 4}}')
    checkpointing.configure(ModelParallel(1), deepspeed_config=str(path), synchronize=True)
    with pytest.raises(ValueError, match="activation_checkpointing.cpu_offload: not a key"):
        checkpointing.configure(None, deepspeed_config={"activation_checkpointing": {"cpu_offload": True}})
    with pytest.raises(ValueError, match="contiguous_memory_optimization needs partition_activations"):
        checkpointing.configure(None, contiguous_checkpointing=True, num_checkpoints=2)
    with pytest.raises(ValueError, match="partition_activations: the model-parallel world is 2"):
        checkpointing.configure(ModelParallel(2), partition_activations=True)
    checkpointing.mpu = None


def test_the_tracker_keeps_named_streams_as_megatrons():
    """model_parallel_cuda_manual_seed(s): the default stream seeded with s,
    the model-parallel stream with s + 2718 (+ the model-parallel rank); a
    fork draws from its stream where the last fork left it and leaves the
    default stream untouched."""
    tracker = checkpointing.get_cuda_rng_tracker()
    checkpointing.model_parallel_cuda_manual_seed(100)
    with tracker.fork():
        first = torch.rand(4)
    with tracker.fork():
        second = torch.rand(4)
    default = torch.rand(4)
    torch.manual_seed(100 + 2718)
    assert torch.equal(torch.cat([first, second]), torch.rand(8))
    torch.manual_seed(100)
    assert torch.equal(default, torch.rand(4))
    with pytest.raises(Exception, match="seed 2818 already exists"):
        tracker.add("other", 100 + 2718)
    with pytest.raises(Exception, match="is not added"):
        with tracker.fork("missing"):
            pass


def test_checkpointed_blocks_train_under_zinf_at_stage_3():
    """The recomputation in backward runs each block's forward again, while
    stage 3 has released it: its params are gathered again. The first
    block's input (the batch) requires no grad, and its params train all
    the same (DeepSpeed's and torch's reentrant checkpoints leave them
    without gradients)."""
    model, plain = Stack(True), Stack(False)
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3))
    reference = torch.optim.AdamW(plain.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    for step in range(3):
        x, y = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)), torch.zeros(4, 1)
        torch.manual_seed(50 + step)
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        torch.manual_seed(50 + step)
        torch.nn.functional.mse_loss(plain(x), y).backward()
        reference.step()
        reference.zero_grad()
    got = engine.consolidated_state_dict()
    for name, value in plain.named_parameters():
        torch.testing.assert_close(got[name], value.detach(), atol=2e-5, rtol=1e-4, msg=name)
    engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: cpu_checkpointing moves GPU inputs")
def test_cpu_checkpointing_keeps_gpu_inputs_in_host_memory():
    checkpointing.configure(None, checkpoint_in_cpu=True)
    seen = []

    def block(x):
        seen.append(x.device.type)
        return x * 2
    x = torch.randn(8, device="cuda", requires_grad=True)
    out = checkpointing.checkpoint(block, x)
    assert out.grad_fn.kept[0][0].device.type == "cpu"
    out.sum().backward()
    assert seen == ["cuda", "cuda"] and torch.equal(x.grad, torch.full_like(x, 2.0))

"""The engine calls DeepSpeed scripts make beyond forward/backward/step, with
DeepSpeed's meaning: set_gradient_accumulation_boundary (Accelerate calls it
before every backward), backward's scale_wrt_gas, no_sync, zero_grad,
empty_partition_cache, and zinf.utils' safe_get_full_* / safe_set_full_*
(one param's whole master, optimizer state or gradient), each checked
against plain PyTorch."""
import itertools
import os
import sys

import numpy
import pytest
import torch

import zinf
from zinf import utils

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from initialize_model import ReadsItsChildsWeight, batch, make_model  # noqa: E402
from test_initialize import ADAMW, HalfParamsFloatMath, config_for, launch, train_both  # noqa: E402


def mse(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def step_both(engine, plain, reference, step):
    """One step of the engine and of `plain` with `reference` on one batch."""
    x, y = batch(step, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    engine.step()
    mse(plain, x, y).backward()
    reference.step()
    reference.zero_grad()


def plain_adamw(model):
    params = ADAMW["params"]
    return torch.optim.AdamW(model.parameters(), lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                             weight_decay=params["weight_decay"])


def assert_state_equals(engine, plain, atol=2e-5):
    got = engine.consolidated_state_dict(dtype=torch.float32)
    for name, value in plain.named_parameters():
        assert torch.allclose(got[name], value, atol=atol), \
            f"{name}: max difference {(got[name] - value).abs().max().item()}"


# -- set_gradient_accumulation_boundary ------------------------------------------------------
@pytest.mark.parametrize("stage,optimizer_device", [(1, "none"), (2, "cpu"), (3, "nvme")])
@pytest.mark.parametrize("step_every_micro_step", [True, False])
def test_the_trainer_sets_the_boundary_as_accelerate_does(scratch, stage, optimizer_device, step_every_micro_step):
    """Windows of 2, 3 and 1 micro-steps under gradient_accumulation_steps 4
    (a trainer sizing its own windows, the last one cut short by an epoch's
    end): the optimizer runs after each window's last backward, on the
    window's gradients divided by 4, as DeepSpeed's do — whether step() comes
    after every backward or, as Accelerate 1.x calls it, after the window's
    last one only."""
    accumulation, windows = 4, [2, 3, 1]
    config = config_for(stage, optimizer_device, nvme=os.path.join(scratch, "nvme"),
                        gradient_accumulation_steps=accumulation)
    config["zero_optimization"]["sub_group_size"] = 200  # several sub-groups, gradients on NVMe at stage 3
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    plain = make_model()
    reference = plain_adamw(plain)
    seen = []
    for step, size in enumerate(windows):
        for micro in range(size):
            engine.set_gradient_accumulation_boundary(micro == size - 1)
            seen.append(engine.is_gradient_accumulation_boundary())
            x, y = batch(step, micro, 0, 4)
            engine.backward(mse(engine, x, y))
            if step_every_micro_step or micro == size - 1:
                engine.step()
            (mse(plain, x, y) / accumulation).backward()
        reference.step()
        reference.zero_grad()
        assert_state_equals(engine, plain)
    assert seen == [False, True, False, False, True, True]
    # DeepSpeed counts a micro-step per step() call.
    assert engine.global_steps == 3 and engine.micro_steps == (6 if step_every_micro_step else 3)
    assert engine.was_step_applied()
    # Six micro-steps are no multiple of 4, yet no gradient is pending: a
    # checkpoint may be taken.
    engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    # None goes back to counting micro-steps.
    engine.set_gradient_accumulation_boundary(None)
    assert engine.is_gradient_accumulation_boundary() == ((engine.micro_steps + 1) % accumulation == 0)
    engine.close()


def test_a_checkpoint_inside_an_overridden_window_is_refused(scratch):
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(2, gradient_accumulation_steps=1))
    engine.set_gradient_accumulation_boundary(False)
    x, y = batch(0, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    engine.step()
    with pytest.raises(ValueError, match="inside a gradient accumulation"):
        engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    engine.close()


# -- backward(scale_wrt_gas) and no_sync -----------------------------------------------------
@pytest.mark.parametrize("stage", [0, 3])
def test_backward_without_scale_wrt_gas_takes_the_loss_as_given(stage):
    """A trainer that normalises its loss itself (over the whole window's
    tokens) passes scale_wrt_gas=False: the gradients are those of its loss,
    not divided again by gradient_accumulation_steps."""
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(stage, gradient_accumulation_steps=2))
    plain = make_model()
    reference = plain_adamw(plain)
    for step in range(2):
        for micro in range(2):
            x, y = batch(step, micro, 0, 4)
            loss = mse(engine, x, y) * (0.25 if micro == 0 else 0.75)  # the trainer's own weights
            returned = engine.backward(loss, scale_wrt_gas=False)
            assert returned is loss
            engine.step()
            (mse(plain, x, y) * (0.25 if micro == 0 else 0.75)).backward()
        reference.step()
        reference.zero_grad()
    assert_state_equals(engine, plain)
    # The default divides by gradient_accumulation_steps and says so.
    x, y = batch(9, 0, 0, 4)
    loss = mse(engine, x, y)
    assert torch.allclose(engine.backward(loss), loss / 2)
    engine.close()


def test_backward_returns_a_16_bit_loss_divided_in_fp32():
    """DeepSpeed widens the loss before dividing by gradient_accumulation_steps
    and returns that fp32 loss: a trainer logging it sees the fp32 quotient,
    not one rounded back to bf16 (DeepSpeed's multi-output model test)."""
    config = config_for(2, gradient_accumulation_steps=3, bf16={"enabled": True})
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    x, y = batch(0, 0, 0, 4)
    loss = (engine(x.bfloat16()) - y.bfloat16()).square().mean()  # torch 1.13 has no bf16 mse_loss on the CPU
    assert loss.dtype == torch.bfloat16
    returned = engine.backward(loss)
    assert returned.dtype == torch.float32 and torch.equal(returned, loss.float() / 3)
    engine.close()


@pytest.mark.parametrize("stage", [2, 3])
def test_no_sync_is_refused_where_gradients_are_partitioned(stage):
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(stage, train_batch_size=4))
    with pytest.raises(AssertionError, match=f"no_sync context manager is incompatible .* ZeRO stage {stage}"):
        with engine.no_sync():
            pass
    assert not engine.inside_no_sync_ctxt
    engine.close()


@pytest.mark.parametrize("stage", [0, 1])
@pytest.mark.parametrize("zero_grad_of", ["engine", "optimizer"])
def test_no_sync_accumulates_undivided_and_zero_grad_drops_it(stage, zero_grad_of):
    """DeepSpeed's test_no_sync_ctxt: inside no_sync the loss is not divided
    by gradient_accumulation_steps, step() is refused, a second no_sync
    inside the first is refused, and zero_grad (stages 0 and 1; the engine's
    or the optimizer initialize returned) starts the accumulation over, so
    two identical passes see identical gradients."""
    engine, optimizer, _, _ = zinf.initialize(model=make_model(),
                                              config=config_for(stage, gradient_accumulation_steps=2))
    plain = make_model()
    params = dict(engine.module.named_parameters())
    passes = []
    for _ in range(2):
        norms = []
        with engine.no_sync():
            with pytest.raises(AssertionError, match="reentry"):
                with engine.no_sync():
                    pass
            for micro in range(3):
                x, y = batch(0, micro, 0, 4)
                engine.backward(mse(engine, x, y))
                with pytest.raises(AssertionError, match="illegal to call Engine.step"):
                    engine.step()
                norms.append(sum(float(utils.safe_get_full_grad(p).norm()) for p in params.values()))
        passes.append(norms)
        (engine if zero_grad_of == "engine" else optimizer).zero_grad()
        plain.zero_grad()
    assert passes[0] == passes[1]
    for micro in range(3):
        x, y = batch(0, micro, 0, 4)
        mse(plain, x, y).backward()  # undivided
    with engine.no_sync():
        for micro in range(3):
            x, y = batch(0, micro, 0, 4)
            engine.backward(mse(engine, x, y))
    for name, p in plain.named_parameters():
        assert torch.allclose(utils.safe_get_full_grad(params[name]), p.grad, atol=1e-6), name
    engine.close()


def test_zero_grad_keeps_a_partitioned_accumulation_as_deepspeed_does():
    """At stages 2 and 3 DeepSpeed's zero_grad clears param.grad only: a
    script calling it every micro-step still steps on the whole window."""
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(2, gradient_accumulation_steps=2))
    plain = make_model()
    reference = plain_adamw(plain)
    for micro in range(2):
        engine.zero_grad()
        x, y = batch(0, micro, 0, 4)
        engine.backward(mse(engine, x, y))
        engine.step()
        (mse(plain, x, y) / 2).backward()
    reference.step()
    assert_state_equals(engine, plain)
    engine.close()


# -- safe_get_full_* / safe_set_full_* --------------------------------------------------------
@pytest.mark.parametrize("stage,optimizer_device,param_device", [
    (0, "none", "none"), (1, "cpu", "none"), (2, "cpu", "none"), (3, "cpu", "cpu"), (3, "nvme", "nvme")])
def test_full_values_of_one_param_are_plain_pytorchs(scratch, stage, optimizer_device, param_device):
    """After two steps and a third backward: each param's fp32 master, Adam
    moments and accumulated gradient read whole equal torch's; writing a
    master and a moment changes the next step as it changes torch's."""
    config = config_for(stage, optimizer_device, param_device, nvme=os.path.join(scratch, "nvme"),
                        gradient_accumulation_steps=2)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    plain = make_model()
    reference = plain_adamw(plain)
    params = dict(engine.module.named_parameters())

    def micro_step(step, micro):
        x, y = batch(step, micro, 0, 4)
        engine.backward(mse(engine, x, y))
        engine.step()
        (mse(plain, x, y) / 2).backward()

    for step in range(2):
        micro_step(step, 0)
        micro_step(step, 1)
        reference.step()
        reference.zero_grad()
    assert all(utils.safe_get_full_grad(p) is None for p in params.values())  # none since the step
    micro_step(2, 0)
    for name, p in plain.named_parameters():
        mine = params[name]
        assert torch.allclose(utils.safe_get_full_fp32_param(mine), p, atol=2e-6), name
        assert utils.safe_get_full_fp32_param(mine).shape == p.shape
        state = reference.state[p]
        assert torch.allclose(utils.safe_get_full_optimizer_state(mine, "exp_avg"), state["exp_avg"], atol=1e-6)
        assert torch.allclose(utils.safe_get_full_optimizer_state(mine, "exp_avg_sq"), state["exp_avg_sq"],
                              atol=1e-7)
        assert torch.allclose(utils.safe_get_full_grad(mine), p.grad, atol=1e-6), name
    # Surgery between micro-steps: a new master for one weight, a zeroed
    # first moment for another; the window's gradients stay.
    weight, other = plain.layers[1].weight, plain.layers[2].weight
    new_weight = torch.linspace(-0.5, 0.5, weight.numel()).view_as(weight)
    utils.safe_set_full_fp32_param(params["layers.1.weight"], new_weight)
    utils.safe_set_full_optimizer_state(params["layers.2.weight"], torch.zeros_like(other), "exp_avg")
    with torch.no_grad():
        weight.copy_(new_weight)
    reference.state[other]["exp_avg"].zero_()
    assert torch.equal(utils.safe_get_full_fp32_param(params["layers.1.weight"]), new_weight)
    assert torch.allclose(utils.safe_get_full_grad(params["layers.1.weight"]), weight.grad, atol=1e-6)
    micro_step(2, 1)  # its forward uses the new weight
    reference.step()
    assert_state_equals(engine, plain)
    engine.close()


@pytest.mark.parametrize("stage,optimizer_device", [(1, "none"), (2, "cpu"), (3, "nvme")])
def test_a_gradient_written_whole_is_what_the_step_takes(scratch, stage, optimizer_device):
    """safe_set_full_grad between backward and step (gradient surgery): the
    optimizer steps on the written values, as torch's does on a replaced
    .grad; the local forms are stage 3's alone, as DeepSpeed's."""
    config = config_for(stage, optimizer_device, nvme=os.path.join(scratch, "nvme"), train_batch_size=4)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    plain = make_model()
    reference = plain_adamw(plain)
    params = dict(engine.module.named_parameters())
    assert utils.safe_get_full_grad(params["head.bias"]) is None  # no backward yet
    x, y = batch(0, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    mse(plain, x, y).backward()
    surgery = torch.full_like(plain.layers[0].weight, 0.125)
    utils.safe_set_full_grad(params["layers.0.weight"], surgery)
    plain.layers[0].weight.grad = surgery.clone()
    assert torch.equal(utils.safe_get_full_grad(params["layers.0.weight"]), surgery)
    if stage < 3:
        with pytest.raises(AssertionError, match="only defined for ZeRO-3"):
            utils.safe_get_local_grad(params["layers.0.weight"])
    else:
        utils.safe_set_local_grad(params["layers.1.weight"], torch.zeros(24 * 24))
        plain.layers[1].weight.grad.zero_()
        assert torch.equal(utils.safe_get_local_grad(params["layers.1.weight"]), torch.zeros(24 * 24))
    engine.step()
    reference.step()
    assert_state_equals(engine, plain)
    engine.close()


def test_a_master_written_while_its_unit_is_gathered_is_the_value_it_computes_with():
    """Stage 3: a unit gathered on demand (a parent reading its child's
    weight) stays gathered until backward; a master written meanwhile is
    the tensor's value at once, though the engine's own gathered buffer is
    gone."""
    config = config_for(3, train_batch_size=2, train_micro_batch_size_per_gpu=2)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    model = ReadsItsChildsWeight()
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    loss = engine(ids).square().mean()
    assert model.embed.weight.numel() == 66  # gathered on demand, kept for backward
    new = torch.linspace(-1, 1, 66).view(11, 6)
    utils.safe_set_full_fp32_param(model.embed.weight, new)
    assert torch.equal(model.embed.weight.detach(), new)
    assert torch.equal(utils.safe_get_full_fp32_param(model.embed.weight), new)
    engine.backward(loss)
    engine.step()
    assert model.embed.weight.numel() == 0  # released after backward, as always
    engine.close()


def test_zero_grad_closes_the_window_a_checkpoint_waits_for(scratch):
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(1, gradient_accumulation_steps=4))
    x, y = batch(0, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    engine.step()
    with pytest.raises(ValueError, match="inside a gradient accumulation"):
        engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    engine.zero_grad()  # stage 1: the window's gradients are gone, and the window with them
    engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    engine.close()


def test_full_values_name_what_they_cannot_give(scratch):
    model = make_model()
    model.head.weight.requires_grad_(False)
    engine, _, _, _ = zinf.initialize(model=model, config=config_for(3, train_batch_size=4))
    outsider = torch.nn.Parameter(torch.ones(3))
    assert utils.safe_get_full_fp32_param(outsider) is None  # not zinf's: None, as DeepSpeed's
    assert utils.safe_get_full_fp32_param(model.head.weight) is None  # frozen: no master
    assert utils.safe_get_full_optimizer_state(model.head.weight, "exp_avg") is None
    with pytest.raises(ValueError, match="'layers.0.weight': no values named 'momentum_buffer' .*\"exp_avg_sq\""):
        utils.safe_get_full_optimizer_state(model.layers[0].weight, "momentum_buffer")
    with pytest.raises(ValueError, match=r"shape \(3,\) for a parameter of shape \(24, 24\)"):
        utils.safe_set_full_fp32_param(model.layers[0].weight, torch.ones(3))
    engine.close()


def test_full_values_across_ranks_with_gradients_on_nvme(scratch):
    """Two ranks, stage 3, everything on NVMe, accumulation over 2 micro-steps
    and many sub-groups: each rank reads the same whole gradient (averaged
    over both ranks' micro-batches), masters and moments, equal to plain
    training on the global batch."""
    config = config_for(3, "nvme", "nvme", nvme=os.path.join(scratch, "nvme"), gradient_accumulation_steps=2)
    config["zero_optimization"]["sub_group_size"] = 100
    codes, errors, result = launch(2, {"config": config, "steps": 2, "inspect": True}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    plain = make_model()
    reference = plain_adamw(plain)
    for step in range(3):
        for micro in range(2 if step < 2 else 1):
            for rank in range(2):
                x, y = batch(step, micro, rank, 4)
                (mse(plain, x, y) / 4).backward()
        if step < 2:
            reference.step()
            reference.zero_grad()
    inspected = result["inspected"]
    for name, p in plain.named_parameters():
        got = inspected[name]
        assert torch.allclose(got["param"], p, atol=2e-6), name
        assert torch.allclose(got["grad"], p.grad, atol=1e-6), name
        assert torch.allclose(got["exp_avg"], reference.state[p]["exp_avg"], atol=1e-6), name
        assert torch.allclose(got["exp_avg_sq"], reference.state[p]["exp_avg_sq"], atol=1e-7), name
        # Rank 0's shard: the first half (rounded up) of the flattened param.
        shard = (p.numel() + 1) // 2
        assert got["local_exp_avg"].shape == (shard,) and got["local_grad"].shape == (shard,)
        assert torch.equal(got["local_exp_avg"], got["exp_avg"].flatten()[:shard]), name
        assert torch.equal(got["local_grad"], got["grad"].flatten()[:shard]), name
        assert torch.equal(got["ds_tensor"], got["param"].flatten()[:shard]), name  # fp32 training: the master


def test_empty_partition_cache_frees_idle_buffers_and_training_goes_on():
    config = config_for(3, train_batch_size=4)
    config["zero_optimization"]["stage3_max_live_parameters"] = 10 ** 6
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    plain = make_model()
    reference = plain_adamw(plain)
    for step in range(2):
        step_both(engine, plain, reference, step)
        assert engine._engine.cached_device_bytes > 0
        engine.empty_partition_cache()
        assert engine._engine.cached_device_bytes == 0
        x, _ = batch(step, 0, 0, 4)
        with torch.no_grad():
            assert torch.allclose(engine(x), plain(x), atol=1e-5)  # an evaluation after it gathers afresh
    assert_state_equals(engine, plain)
    engine.close()


# -- fp16 ------------------------------------------------------------------------------------
def test_fp16_gradients_have_deepspeeds_magnitude_under_the_loss_scale():
    """DeepSpeed divides the loss by gradient_accumulation_steps before it
    multiplies by the loss scale, so the model's fp16 gradients are
    scale / gas times the loss's (a static scale chosen for DeepSpeed does
    not overflow here either)."""
    accumulation, scale = 4, 2.0 ** 8
    model, plain = HalfParamsFloatMath(), HalfParamsFloatMath().half()  # zinf casts its model to fp16
    config = config_for(2, gradient_accumulation_steps=accumulation,
                        fp16={"enabled": True, "initial_scale_power": 8})
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    assert engine.loss_scale == scale
    seen = []
    model.first.weight.register_hook(lambda grad: seen.append(grad.detach().clone()))
    x, y = batch(0, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    (mse(plain, x, y) * (scale / accumulation)).backward()
    assert seen and seen[0].dtype == torch.float16
    assert torch.equal(seen[0], plain.first.weight.grad)
    engine.close()


class FailsInForward(torch.nn.Module):
    def __init__(self, error):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.error = error

    def forward(self, x):
        raise self.error


def test_a_forward_error_that_is_not_a_released_params_passes_unchanged():
    """At stage 3 a shape error may come from a param used outside its
    unit, and gets zinf's hint; any other error (a dtype without a CPU
    kernel, out of memory: subclasses trainers catch) keeps its type and
    message."""
    class OutOfMemory(RuntimeError):
        pass
    for error, hinted in ((RuntimeError("size mismatch, got 2, 2x16,0"), True),
                          (RuntimeError("'addmm_impl_cpu_' not implemented for 'Half'"), False),
                          (OutOfMemory("out of memory"), False)):
        engine, _, _, _ = zinf.initialize(model=FailsInForward(error), config=config_for(3))
        with pytest.raises(RuntimeError) as raised:
            engine(torch.zeros(1, 4))
        assert type(raised.value) is (RuntimeError if hinted else type(error))
        assert ("register_external_parameter" in str(raised.value)) == hinted
        assert str(error) in str(raised.value)
        engine.close()


def test_one_cycle_from_the_config_cycles_the_engines_rate_and_beta1():
    """DeepSpeed's OneCycle moves beta1 against the rate (and sets beta2 to
    0.99): the engine steps with the betas the schedule writes, as torch's
    AdamW under the same schedule does."""
    from zinf.lr_schedules import OneCycle
    cycle = {"cycle_min_lr": 0.001, "cycle_max_lr": 0.02, "cycle_first_step_size": 2, "cycle_min_mom": 0.8,
             "cycle_max_mom": 0.95}
    config = config_for(2, "cpu", train_batch_size=4, scheduler={"type": "OneCycle", "params": cycle})
    engine, optimizer, _, scheduler = zinf.initialize(model=make_model(), config=config)
    assert isinstance(scheduler, OneCycle) and optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    plain = make_model()
    params = ADAMW["params"]
    reference = torch.optim.AdamW(plain.parameters(), lr=1.0, eps=params["eps"], weight_decay=params["weight_decay"])
    reference_schedule = OneCycle(reference, **cycle)
    betas_seen = []

    def after_step(step):
        reference_schedule.step()
        betas_seen.append(optimizer.param_groups[0]["betas"][0])
    train_both(engine, plain, reference, 5, after_step=after_step)  # then the params are plain's
    assert len(set(betas_seen)) > 2  # beta1 did move


@pytest.mark.parametrize("block, reference", [
    ({"type": "Adagrad"}, lambda params: torch.optim.Adagrad(params)),  # lr 1e-2, eps 1e-10
    ({"type": "Adam", "params": {"lr": 0.01}}, lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0)),
    ({"type": "Lion", "params": {"lr": 0.001}}, None),
], ids=["adagrad", "adam", "lion"])
def test_a_config_optimizer_without_hyperparameters_has_its_deepspeed_defaults(block, reference):
    """DeepSpeed builds torch's or its own optimizer from the block, so the
    keys a config leaves out take that optimizer's defaults (Adagrad's lr
    and eps are not Adam's), and every param group holds them, as a torch
    optimizer's do (DeepSpeed's OneCycle test reads the betas it cycles)."""
    config = config_for(2, "cpu", optimizer=block)
    engine, optimizer, _, _ = zinf.initialize(model=make_model(), config=config)
    want = {"adagrad": {"lr": 1e-2, "eps": 1e-10, "weight_decay": 0.0},
            "adam": {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
            "lion": {"lr": 0.001, "betas": (0.9, 0.999), "weight_decay": 0.0}}[block["type"].lower()]
    for group in optimizer.param_groups:
        assert {key: group[key] for key in want} == want
    if reference is None:
        engine.close()
        return
    plain = make_model()
    train_both(engine, plain, reference(plain.parameters()), 3)


class WithAnUnusedLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = torch.nn.Linear(8, 1)
        self.unused = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("stage", [1, 2])
def test_ignore_unused_parameters_false_makes_a_param_without_gradient_an_error(stage):
    """DeepSpeed's debugging switch: with it false, a trainable param that
    took no part in the loss fails the step with an AssertionError naming
    the key; by default (true) training goes on."""
    for ignore in (False, True):
        config = config_for(stage, "cpu", gradient_accumulation_steps=2)
        config["zero_optimization"]["ignore_unused_parameters"] = ignore
        engine, _, _, _ = zinf.initialize(model=WithAnUnusedLayer(), config=config)
        for micro in range(2):
            x, y = batch(micro, 0, 0, 4)
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            if ignore or micro == 0:
                engine.step()
            else:
                with pytest.raises(AssertionError, match="ignore_unused_parameters") as raised:
                    engine.step()
                assert "(this rank's: unused.weight, unused.bias)" in str(raised.value)
        engine.close()


class TopOneExperts(torch.nn.Module):
    """A mixture-of-experts block: the gate sends each row to one expert,
    so which experts run changes from batch to batch."""
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(8, 4)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(4)])

    def forward(self, x):
        weights = torch.softmax(self.gate(x), dim=-1)
        choice = weights.argmax(dim=-1)
        out = torch.zeros_like(x)
        for k, expert in enumerate(self.experts):
            rows = choice == k
            if rows.any():
                out[rows] = expert(x[rows]) * weights[rows, k:k + 1]
        return out


class MoeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Linear(8, 8)
        self.layers = torch.nn.ModuleList([TopOneExperts() for _ in range(2)])
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


class AdamWZeroFilling(torch.optim.AdamW):
    """torch's AdamW skips a param without a gradient; ZeRO steps it with a
    zero one (its flat gradient buffer), as here."""
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        return super().step(closure)


@pytest.mark.parametrize("leaf", [True, False])
def test_a_leaf_module_is_gathered_whole_and_trains_as_the_plain_model(leaf):
    """DeepSpeed's set_z3_leaf_modules for MoE blocks: a flagged module is
    one stage-3 unit (not a unit per expert) and its params say so; either
    way the model trains as plain PyTorch."""
    from zinf.utils import get_z3_leaf_modules, set_z3_leaf_modules, unset_z3_leaf_modules, z3_leaf_parameter
    model = MoeNet()
    if leaf:
        assert set_z3_leaf_modules(model, [TopOneExperts]) == list(model.layers)
        assert get_z3_leaf_modules(model) == list(model.layers)
    with pytest.raises(ValueError, match="no module of"):
        set_z3_leaf_modules(model, ["Conv2d"])
    config = config_for(3, "cpu", "cpu")
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    names = [u.name for u in engine._units]
    assert ("layers.0" in names) == leaf and ("layers.0.experts.1" in names) == (not leaf), names
    assert z3_leaf_parameter(model.layers[1].experts[2].weight) == leaf
    assert not z3_leaf_parameter(model.head.weight)
    plain = MoeNet()
    params = ADAMW["params"]
    reference = AdamWZeroFilling(plain.parameters(), lr=params["lr"], betas=params["betas"], eps=params["eps"],
                                 weight_decay=params["weight_decay"])
    train_both(engine, plain, reference, 4)
    if leaf:
        unset_z3_leaf_modules(model, [TopOneExperts])
        assert get_z3_leaf_modules(model) == []


def trl_remove_hooks(engine):
    """TRL's remove_hooks for a DeepSpeed ZeRO-3 engine, as it is written."""
    offload = engine.optimizer.parameter_offload
    params = itertools.chain(offload.module.named_parameters(recurse=True), offload.module.ds_external_parameters())
    for _, param in params:
        param.ds_active_sub_modules.clear()
    for hook in offload.forward_hooks:
        hook.remove()
    for hook in offload.backward_hooks:
        hook.remove()
    offload.forward_hooks = []
    offload.backward_hooks = []


def trl_add_hooks(engine):
    offload = engine.optimizer.parameter_offload
    offload._register_deepspeed_module(offload.module)


@pytest.mark.parametrize("how", ["trl", "deepspeed"])
def test_generation_inside_gathered_parameters_keeps_every_param_whole(how):
    """RLHF trainers generate with every param gathered once: TRL inside
    GatheredParameters(model.parameters()) with the stage-3 hooks removed
    through optimizer.parameter_offload, DeepSpeed's
    unwrap_model_for_generation likewise. The forwards there gather nothing
    and release nothing (before, a forward emptied the params the context
    held), give the plain model's outputs, and training goes on after as
    plain training."""
    from zinf.runtime.zero import unwrap_model_for_generation
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(3, "cpu", "cpu"))
    plain = make_model()
    reference = plain_adamw(plain)

    step_both(engine, plain, reference, 0)
    params = list(engine.parameters())
    assert {id(p) for p in params} == {id(p) for p in engine.module.parameters()}
    gathers = engine._engine.stats()["gathers"]
    if how == "trl":
        context = zinf.zero.GatheredParameters(params)
    else:
        context = unwrap_model_for_generation(engine)
    with context, torch.no_grad():
        if how == "trl":
            trl_remove_hooks(engine)
        for token in range(3):
            x, _ = batch(50 + token, 0, 0, 4)
            assert torch.allclose(engine.module(x), plain(x), atol=1e-6)
            assert all(p.numel() == p.ds_numel for p in params)
        if how == "trl":
            trl_add_hooks(engine)
    assert engine._engine.stats()["gathers"] == gathers
    assert all(p.numel() == 0 for p in params if not p.ds_persist)
    for step in range(1, 3):
        step_both(engine, plain, reference, step)
    assert engine._engine.stats()["gathers"] > gathers  # the hooks are back
    assert_state_equals(engine, plain)
    engine.close()


def test_a_forward_inside_gathered_parameters_leaves_the_params_whole():
    """Without removing any hook: a unit's forward inside the context uses
    the held tensors and does not empty them."""
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(3, "cpu", "cpu"))
    params = list(engine.module.parameters())
    x, y = batch(0, 0, 0, 4)
    with torch.no_grad():
        want = engine(x)
    with zinf.zero.GatheredParameters(params):
        with torch.no_grad():
            assert torch.allclose(engine(x), want)
        assert all(p.numel() == p.ds_numel for p in params)
        with zinf.zero.GatheredParameters(params[:2]):  # nested: the inner exit keeps them whole
            pass
        assert all(p.numel() == p.ds_numel for p in params)
    assert all(p.numel() == 0 for p in params if not p.ds_persist)
    engine.close()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_scheduler_built_on_the_clients_optimizer_steers_the_engine(stage, recwarn):
    """A script builds its optimizer and a torch scheduler on it, then hands
    both to initialize (DeepSpeed's ZeRO optimizer shares the client's param
    groups): the schedule's rates, and a rate the script sets on its own
    optimizer by hand, are what the engine steps with (before, the engine
    kept the first rate). torch sees its optimizer step: no warning that the
    scheduler stepped first."""
    model, plain = make_model(), make_model()
    client = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(client, lambda step: 0.5 ** step)
    config = config_for(stage, train_batch_size=4)
    del config["optimizer"]
    engine, _, _, returned = zinf.initialize(model=model, optimizer=client, lr_scheduler=schedule, config=config)
    assert returned is schedule
    reference = torch.optim.AdamW(plain.parameters(), lr=0.02, weight_decay=0.01)
    reference_schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambda step: 0.5 ** step)

    def after_step(step):
        reference_schedule.step()
        assert engine.get_lr() == [reference.param_groups[0]["lr"]]
        if step == 2:  # by hand, on the script's own optimizer
            client.param_groups[0]["lr"] = reference.param_groups[0]["lr"] = 0.03
    train_both(engine, plain, reference, 5, after_step=after_step)
    assert not [w for w in recwarn if "before `optimizer.step()`" in str(w.message)]


def test_the_scheduler_passed_wins_over_the_configs_and_one_without_its_optimizer_is_refused(recwarn):
    """DeepSpeed's order: a scheduler (or a callable building one) passed to
    initialize is used even when the config has a "scheduler" block. A
    scheduler object given without the optimizer object it was built on
    (no optimizer, or a callable) is DeepSpeed's AssertionError: its rates
    would steer an optimizer that never steps."""
    model = make_model()
    client = torch.optim.AdamW(model.parameters(), lr=0.02)
    config = config_for(1, train_batch_size=4, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 9}})
    del config["optimizer"]
    halving = torch.optim.lr_scheduler.LambdaLR(client, lambda step: 0.5 ** step)
    engine, _, _, returned = zinf.initialize(model=model, optimizer=client, lr_scheduler=halving, config=config)
    assert returned is halving
    x, y = batch(0, 0, 0, 4)
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    engine.step()
    assert engine.get_lr() == [0.01]
    engine.close()
    engine, _, _, returned = zinf.initialize(
        model=make_model(), optimizer=lambda params: torch.optim.AdamW(params, lr=0.02), config=config,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=30))
    assert isinstance(returned, torch.optim.lr_scheduler.StepLR) and engine.get_lr() == [0.02]
    engine.close()
    # torch's OneCycleLR, built on the engine's optimizer, cycles beta1: the
    # optimizer's defaults hold every key of its type, as torch's do.
    engine, optimizer, _, returned = zinf.initialize(
        model=make_model(), config=config_for(1, train_batch_size=4),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=20))
    assert optimizer.defaults["betas"] == tuple(ADAMW["params"]["betas"]) and optimizer.defaults["eps"] == 1e-8
    first = optimizer.param_groups[0]["betas"][0]
    engine.backward(torch.nn.functional.mse_loss(engine(x), y))
    engine.step()
    assert optimizer.param_groups[0]["betas"][0] < first
    engine.close()
    # torch sees the returned optimizer step too: no "scheduler stepped first".
    assert not [w for w in recwarn if "before `optimizer.step()`" in str(w.message)]
    unrelated = torch.optim.lr_scheduler.LambdaLR(torch.optim.Adam(make_model().parameters()), lambda step: 1.0)
    config = config_for(1, train_batch_size=4)
    for optimizer in (None, lambda params: torch.optim.AdamW(params)):
        if optimizer is not None:
            del config["optimizer"]
        with pytest.raises(AssertionError, match="lr_scheduler: a scheduler object .LambdaLR. is given but"):
            zinf.initialize(model=make_model(), optimizer=optimizer, lr_scheduler=unrelated, config=config)


def test_an_optimizer_callable_gets_the_param_groups_passed_as_model_parameters():
    """DeepSpeed calls the optimizer callable with model_parameters: a
    script's groups (no decay for biases) reach the optimizer it builds."""
    model = make_model()
    groups = [{"params": [p for name, p in model.named_parameters() if name.endswith("weight")], "weight_decay": 0.1},
              {"params": [p for name, p in model.named_parameters() if name.endswith("bias")], "weight_decay": 0.0}]
    config = config_for(2, train_batch_size=4)
    del config["optimizer"]
    engine, optimizer, _, _ = zinf.initialize(model=model, model_parameters=groups, config=config,
                                              optimizer=lambda params: torch.optim.AdamW(params, lr=0.01))
    assert [group["weight_decay"] for group in optimizer.param_groups] == [0.1, 0.0]
    plain = make_model()
    reference = torch.optim.AdamW([
        {"params": [p for name, p in plain.named_parameters() if name.endswith("weight")], "weight_decay": 0.1},
        {"params": [p for name, p in plain.named_parameters() if name.endswith("bias")], "weight_decay": 0.0}],
        lr=0.01)
    train_both(engine, plain, reference, 3)


def test_what_the_engine_has_not_is_asked_of_its_module():
    """DeepSpeed's engine hands unknown attributes to the module: scripts
    call the model's own methods (generate, gradient_checkpointing_enable)
    on the engine."""
    class WithAMethod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_model()
            self.note = "model's"

        def forward(self, x):
            return self.inner(x)

        def magic(self):
            return 42

    engine, _, _, _ = zinf.initialize(model=WithAMethod(), config=config_for(3, train_batch_size=4))
    assert engine.magic() == 42 and engine.note == "model's"
    assert engine.train_batch_size() == 4  # the engine's own come first
    with pytest.raises(AttributeError, match="nor has its module, a WithAMethod"):
        engine.no_such_thing
    assert not hasattr(engine, "no_such_thing")
    engine.close()


def test_the_config_questions_deepspeed_scripts_ask_the_engine():
    config = config_for(3, "cpu", "cpu", train_batch_size=8, gradient_accumulation_steps=2,
                        fp16={"enabled": True, "initial_scale_power": 10}, wall_clock_breakdown=True,
                        scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 4}})
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    engine, optimizer, _, _ = zinf.initialize(model=HalfParamsFloatMath(), config=config)
    assert engine.get_batch_info() == (8, 4, 2)
    assert engine.optimizer_name() == "AdamW" and engine.optimizer_params()["lr"] == ADAMW["params"]["lr"]
    assert engine.scheduler_name() == "WarmupLR" and engine.scheduler_params() == {"warmup_num_steps": 4}
    assert engine.zero_cpu_offload() and engine.zero_optimization_partition_gradients()
    assert engine.zero_optimization_partition_weights() and engine.zero_gather_16bit_weights_on_model_save()
    assert engine.wall_clock_breakdown() and engine.dynamic_loss_scale()
    assert engine.initial_dynamic_scale() == 1024.0 and optimizer.cur_scale == 1024.0
    # DeepSpeed's optimizers' view of the scale (its fp16 tests read it).
    assert optimizer.dynamic_loss_scale and optimizer.loss_scaler.dynamic
    assert optimizer.loss_scaler.loss_scale == optimizer.loss_scaler.cur_scale == 1024.0
    assert optimizer.loss_scaler.scale_window == 1000 and optimizer.loss_scaler.delayed_shift == 2
    engine.close()
    # A static scale: loss_scale set.
    config["fp16"] = {"enabled": True, "loss_scale": 138.0}
    engine, optimizer, _, _ = zinf.initialize(model=HalfParamsFloatMath(), config=config)
    assert not optimizer.dynamic_loss_scale and not optimizer.loss_scaler.dynamic
    assert optimizer.loss_scaler.loss_scale == 138.0 and not engine.dynamic_loss_scale()
    engine.close()
    model = make_model()
    engine, _, _, _ = zinf.initialize(model=model, optimizer=zinf.ops.adam.FusedAdam(model.parameters()),
                                      config={"train_batch_size": 4, "zero_optimization": {"stage": 1}})
    assert engine.optimizer_name() == "FusedAdam" and engine.scheduler_name() is None
    assert not engine.zero_optimization_partition_gradients() and not engine.dynamic_loss_scale()
    assert not engine.zero_cpu_offload() and not engine.zero_gather_16bit_weights_on_model_save()
    engine.close()


def test_the_zero_getters_give_the_config_or_deepspeeds_defaults(scratch):
    """DeepSpeed's engine getters of the zero_optimization and aio blocks:
    what the config says, else (or for "auto") DeepSpeed's defaults; and
    save_fp16_model, DeepSpeed's older name of save_16bit_model."""
    config = config_for(3, "nvme", nvme=os.path.join(scratch, "nvme"), train_batch_size=4,
                        aio={"block_size": 262144, "queue_depth": "auto"}, dataloader_drop_last=True)
    config["zero_optimization"].update(reduce_bucket_size="auto", overlap_comm=False, stage3_max_live_parameters=3e7)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    assert engine.zero_sub_group_size() == 300 and engine.zero_prefetch_bucket_size() == 700
    assert engine.zero_param_persistence_threshold() == 30 and engine.zero_max_live_parameters() == 30_000_000
    assert engine.zero_reduce_bucket_size() == 500_000_000 and engine.zero_overlap_comm() is False
    assert engine.zero_max_reuse_distance() == 1_000_000_000 and engine.zero_contiguous_gradients() is True
    assert engine.zero_nvme_offload_optimizer() and engine.zero_use_cpu_optimizer() and engine.dataloader_drop_last()
    assert engine.aio_config() == {"block_size": 262144, "queue_depth": 8, "intra_op_parallelism": 1,
                                   "single_submit": False, "overlap_events": True, "use_gds": False}
    engine.save_fp16_model(scratch)
    state = torch.load(os.path.join(scratch, "pytorch_model.bin"))
    assert state.keys() == engine.consolidated_state_dict().keys()
    engine.close()
    engine, _, _, _ = zinf.initialize(model=make_model(), config={"train_batch_size": 4, "zero_optimization": {
        "stage": 2}})
    assert engine.zero_overlap_comm() is False and engine.zero_sub_group_size() == 1_000_000_000
    assert not engine.zero_nvme_offload_optimizer() and not engine.dataloader_drop_last()
    engine.close()


# -- ds_id / ds_status: the check scripts make before reading a stage-3 param ----------------
def test_scripts_that_look_for_ds_id_gather_before_reading_and_save_whole_values():
    """A saving helper as fine-tuning scripts write it: a param with ds_id
    is read inside GatheredParameters, whose values are then whole; others
    are read as they are. At stage 3 every param has ds_id, its ds_status
    says whether its .data is whole now (inside its unit's forward, inside
    GatheredParameters, always for a persistent one), and the helper saves
    the same values as consolidated_state_dict."""
    from zinf.runtime.zero.partition_parameters import ZeroParamStatus
    config = config_for(3, "cpu", train_batch_size=4)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 16  # the biases persist
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    module = engine.module
    seen_in_forward = {}
    first = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_pre_hook(lambda m, i: seen_in_forward.update(weight=m.weight.ds_status))
    for step in range(2):
        x, y = batch(step, 0, 0, 4)
        engine.backward(mse(engine, x, y))
        engine.step()
    assert seen_in_forward["weight"] is ZeroParamStatus.AVAILABLE

    def saved(param):
        if hasattr(param, "ds_id"):
            with zinf.zero.GatheredParameters([param]):
                assert param.ds_status is ZeroParamStatus.AVAILABLE
                return param.data.detach().cpu().clone()
        return param.detach().cpu().clone()

    ids = set()
    for name, p in module.named_parameters():
        ids.add(p.ds_id)
        persistent = p.ds_numel <= 16
        assert p.ds_persist == persistent, name
        assert p.ds_status is (ZeroParamStatus.AVAILABLE if persistent else ZeroParamStatus.NOT_AVAILABLE), name
    assert len(ids) == len(list(module.parameters()))
    want = engine.consolidated_state_dict()
    for name, p in module.named_parameters():
        got = saved(p)
        assert got.shape == p.ds_shape and torch.equal(got, want[name]), name
        assert p.ds_status is (ZeroParamStatus.AVAILABLE if p.ds_persist else ZeroParamStatus.NOT_AVAILABLE), name
    engine.close()


@pytest.mark.parametrize("offload_param", ["none", "cpu", "nvme"])
def test_ds_tensor_is_this_ranks_shard_in_the_training_dtype(scratch, offload_param):
    """param.ds_tensor as DeepSpeed's: the shard of the working copy (bf16
    here), 1-D, on the CPU when offload_param moves it there, read afresh
    after each step (from NVMe with offload_param nvme); a value a script
    assigns comes back; params that are not zinf's stage-3 ones (another
    tensor, a closed engine's) have none."""
    config = config_for(3, "cpu", offload_param, nvme=os.path.join(scratch, "nvme"), train_batch_size=4,
                        bf16={"enabled": True})
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    module = engine.module
    before = {name: p.ds_tensor for name, p in module.named_parameters()}
    for step in range(2):
        x, y = batch(step, 0, 0, 4)
        engine.backward(torch.nn.functional.mse_loss(engine(x.bfloat16()).float(), y))
        engine.step()
    for name, p in module.named_parameters():
        ds_tensor = p.ds_tensor
        assert ds_tensor.shape == (p.ds_numel,) and ds_tensor.ds_numel == p.ds_numel, name
        assert ds_tensor.dtype == torch.bfloat16 and ds_tensor.device.type == "cpu", name
        assert torch.equal(ds_tensor, utils.safe_get_local_fp32_param(p).bfloat16()), name
        assert not torch.equal(ds_tensor, before[name]), f"{name}: the values before the steps"
    weight = module.layers[0].weight
    mine = torch.zeros(3)
    weight.ds_tensor = mine
    assert weight.ds_tensor is mine
    weight.ds_tensor = None
    assert weight.ds_tensor is None
    del weight.ds_tensor
    assert weight.ds_tensor.shape == (weight.ds_numel,)
    assert not hasattr(torch.nn.Parameter(torch.ones(3)), "ds_tensor")
    engine.close()
    assert not hasattr(weight, "ds_tensor")


def test_ds_tensor_under_init_and_below_stage_three():
    """A param built under zinf.zero.Init has its staged shard as ds_tensor
    before any engine; below stage 3 the engine's params have none, as
    DeepSpeed's."""
    with zinf.zero.Init(config_dict_or_path=config_for(3, train_batch_size=4)):
        model = make_model()
    want = make_model()  # make_model seeds itself: Init's shards hold these values
    for (name, p), q in zip(model.named_parameters(), want.parameters()):
        assert torch.equal(p.ds_tensor, q.detach().flatten()), name
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(2, train_batch_size=4))
    assert not any(hasattr(p, "ds_tensor") for p in engine.module.parameters())
    engine.close()


def test_ds_grads_remaining_counts_the_backward_passes_still_to_come():
    """DeepSpeed's module.ds_grads_remaining on each stage-3 unit: one per
    forward with gradients (a forward under no_grad adds none), 0 once
    backward is done, as DeepSpeed's test_zero_multiple_run checks with the
    model called twice; the values train as plain PyTorch's."""
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(3, train_batch_size=4))
    plain = make_model()
    reference = plain_adamw(plain)
    layers = [m for m in engine.module.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(m.ds_grads_remaining == 0 for m in layers)
    for step in range(2):
        x, y = batch(step, 0, 0, 4)
        loss = mse(engine, x, y) + mse(engine, 2 * x, y)
        with torch.no_grad():
            mse(engine, x, y)
        assert all(m.ds_grads_remaining == 2 for m in layers), [m.ds_grads_remaining for m in layers]
        engine.backward(loss)
        assert all(m.ds_grads_remaining == 0 for m in layers)
        engine.step()
        (mse(plain, x, y) + mse(plain, 2 * x, y)).backward()
        reference.step()
        reference.zero_grad()
    assert_state_equals(engine, plain)
    engine.close()


def test_mics_init_builds_as_init_does(caplog):
    """DeepSpeed's MiCS_Init: the model built into shards as under Init
    (every rank's shard; mics_shard_size's groups are not made, which the
    log says), gathered whole by GatheredParameters and empty after, and
    the engine built from it trains from the same values."""
    config = config_for(3, train_batch_size=4)
    config["zero_optimization"]["mics_shard_size"] = 1
    zinf.zero.MiCS_Init._said = False
    with caplog.at_level("INFO", logger="zinf"):
        with zinf.zero.MiCS_Init(config_dict_or_path=config):
            model = make_model()
    assert "mics_shard_size's groups are not made" in caplog.text
    from zinf.runtime.zero import MiCS_Init
    assert MiCS_Init is zinf.zero.MiCS_Init  # DeepSpeed's deepspeed.runtime.zero path too
    weight = model.layers[0].weight
    with zinf.zero.GatheredParameters(list(model.parameters())):
        assert torch.equal(weight, make_model().layers[0].weight)
    assert weight.numel() == 0
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    assert torch.equal(engine.consolidated_state_dict()["layers.0.weight"], make_model().layers[0].weight)
    engine.close()


def test_below_stage_three_params_have_no_ds_id():
    """Below stage 3 params are ordinary tensors, whole all the time: no
    ds_id, so such helpers read them directly, as under DeepSpeed."""
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(2, train_batch_size=4))
    assert not any(hasattr(p, "ds_id") or hasattr(p, "ds_status") for p in engine.module.parameters())
    engine.close()


# -- set_train_batch_size: a batch-size ramp-up ------------------------------------------------
@pytest.mark.parametrize("stage,optimizer_device", [(1, "none"), (3, "cpu")])
def test_a_batch_size_ramp_up_changes_the_window_as_deepspeeds_does(stage, optimizer_device):
    """Two steps of one micro-batch, then set_train_batch_size doubles the
    global batch: two steps of two micro-batches, each window's gradient
    its mean, as plain PyTorch on the same samples. The micro-batch and
    set_train_micro_batch_size's arithmetic are DeepSpeed's."""
    config = config_for(stage, optimizer_device, train_batch_size=4, train_micro_batch_size_per_gpu=4)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    assert engine.zero_optimization() and engine.config["train_batch_size"] == 4
    plain = make_model()
    reference = plain_adamw(plain)
    sample = 0
    for step, window in enumerate([1, 1, 2, 2]):
        if step == 2:
            with pytest.raises(ValueError, match="multiple of train_micro_batch_size_per_gpu 4"):
                engine.set_train_batch_size(6)
            engine.set_train_batch_size(numpy.int64(8))  # any integer, as a ramp-up schedule computes it
            assert (engine.gradient_accumulation_steps(), engine.train_batch_size()) == (2, 8)
        for micro in range(window):
            assert engine.is_gradient_accumulation_boundary() == (micro == window - 1)
            x, y = batch(sample, 0, 0, 4)
            sample += 1
            engine.backward(mse(engine, x, y))
            engine.step()
            (mse(plain, x, y) / window).backward()
        reference.step()
        reference.zero_grad()
    assert engine.global_steps == 4
    assert_state_equals(engine, plain)
    engine.set_train_micro_batch_size(2)
    assert (engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps(),
            engine.train_batch_size()) == (2, 2, 4)
    engine.close()


# -- engine.optimizer.optimizer: the basic optimizer DeepSpeed's rules pick -------------------
def _basic(config_optimizer, zero):
    model = make_model()
    config = {"train_batch_size": 2, "optimizer": config_optimizer, "zero_optimization": zero}
    engine, _, _, _ = zinf.initialize(config=config, model=model, model_parameters=model.parameters())
    basic = engine.optimizer.optimizer
    assert basic.param_groups is engine.optimizer.param_groups  # one set of groups, as DeepSpeed's wrapper has
    engine.close()
    return basic


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("torch_adam", [False, True])
@pytest.mark.parametrize("adam_w_mode", [False, True])
def test_the_basic_optimizer_is_the_one_deepspeed_would_build(kind, offload, torch_adam, adam_w_mode):
    """DeepSpeed's table: torch_adam gives torch's class, offload its CPU
    Adam, else FusedAdam; "AdamW", or "Adam" with adam_w_mode, decouples."""
    from zinf.ops.adam import DeepSpeedCPUAdam, FusedAdam
    basic = _basic({"type": kind, "params": {"lr": 1.5e-4, "torch_adam": torch_adam, "adam_w_mode": adam_w_mode}},
                   {"stage": 2, "offload_optimizer": {"device": "cpu" if offload else "none"}})
    decoupled = kind == "AdamW" or adam_w_mode
    if torch_adam:
        assert type(basic) is (torch.optim.AdamW if decoupled else torch.optim.Adam)
    else:
        assert isinstance(basic, DeepSpeedCPUAdam if offload else FusedAdam)
        assert not isinstance(basic, FusedAdam if offload else DeepSpeedCPUAdam)
        assert basic.adam_w_mode == decoupled
    assert basic.param_groups[0]["lr"] == 1.5e-4


def test_the_basic_optimizer_for_adagrad_lion_and_a_client_optimizer():
    from zinf.ops.adagrad import DeepSpeedCPUAdagrad
    from zinf.ops.lion import DeepSpeedCPULion, FusedLion
    cpu = {"stage": 3, "offload_optimizer": {"device": "cpu"}}
    assert isinstance(_basic({"type": "Lion", "params": {}}, {"stage": 2}), FusedLion)
    assert isinstance(_basic({"type": "Lion", "params": {}}, cpu), DeepSpeedCPULion)
    assert type(_basic({"type": "Adagrad", "params": {}}, {"stage": 1})) is torch.optim.Adagrad
    assert isinstance(_basic({"type": "Adagrad", "params": {}}, cpu), DeepSpeedCPUAdagrad)
    model = make_model()
    client = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine, _, _, _ = zinf.initialize(config={"train_batch_size": 2, "zero_optimization": {"stage": 2}},
                                      model=model, optimizer=client)
    assert engine.optimizer.optimizer is client
    engine.close()


def test_the_model_persistence_budget_bounds_what_persists():
    """stage3_model_persistence_threshold: the params that persist (whole on
    every rank, ds_persist) hold at most that many elements in all; without
    it every param under the per-param threshold does."""
    def persisted(extra):
        config = config_for(3, train_batch_size=4)
        config["zero_optimization"].update({"stage3_param_persistence_threshold": 30}, **extra)
        engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
        sizes = [p.ds_numel for p in engine.module.parameters() if p.ds_persist]
        engine.close()
        return sizes
    unbounded = persisted({})
    assert len(unbounded) == 6 and sum(unbounded) == 24 * 5 + 1  # four biases and the head's weight of 24, its bias
    bounded = persisted({"stage3_model_persistence_threshold": 50})
    assert sorted(bounded) == [1, 24, 24]  # two of 24 fit, the others not; the head's bias of 1 still does


# -- the checkpoint keywords newer DeepSpeed scripts pass --------------------------------------
def test_a_checkpoint_saved_excluding_frozen_parameters_still_resumes_whole(scratch):
    """exclude_frozen_parameters=True (what LoRA trainers pass) is taken;
    zinf's checkpoint keeps the frozen shards anyway, so a fresh engine
    resumes every value. custom_load_fn is refused with the way out."""
    config = config_for(3, "cpu", train_batch_size=4)

    def build(frozen_value=None):
        model = make_model()
        model.embed.weight.requires_grad_(False)
        if frozen_value is not None:
            with torch.no_grad():
                model.embed.weight.fill_(frozen_value)  # so only the checkpoint can bring the saved value back
        return zinf.initialize(model=model, config=config)[0]
    engine = build()
    x, y = batch(0, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    engine.step()
    engine.save_checkpoint(scratch, tag="t", exclude_frozen_parameters=True)
    saved = engine.consolidated_state_dict()
    engine.close()
    fresh = build(frozen_value=0.0)
    with pytest.raises(ValueError, match="custom_load_fn"):
        fresh.load_checkpoint(scratch, tag="t", custom_load_fn=lambda src, dst: None)
    fresh.load_checkpoint(scratch, tag="t")
    got = fresh.consolidated_state_dict()
    assert all(torch.equal(got[name], value) for name, value in saved.items())
    fresh.close()


# -- the dataloader initialize returns, and deepspeed_io ---------------------------------------
@pytest.mark.parametrize("drop_last", [False, True])
def test_training_data_comes_back_as_micro_batches(drop_last):
    """initialize(training_data=) returns a loader of
    train_micro_batch_size_per_gpu samples (the last one short unless
    dataloader_drop_last); deepspeed_io builds the same for other data."""
    data = torch.utils.data.TensorDataset(torch.arange(10.0).view(10, 1))
    config = dict(config_for(1, train_batch_size=4), dataloader_drop_last=drop_last)
    engine, _, loader, _ = zinf.initialize(model=make_model(), config=config, training_data=data,
                                           collate_fn=lambda samples: torch.cat([s[0] for s in samples]))
    assert loader is engine.training_dataloader
    sizes = [len(b) for b in loader]
    assert sizes == ([4, 4] if drop_last else [4, 4, 2])
    seen = torch.cat(list(loader))  # shuffled, as DeepSpeed's RandomSampler for one rank
    assert len(seen) == len(set(seen.tolist())) == (8 if drop_last else 10)
    # Evaluation keeps the order, and initialize's collate_fn is the default.
    assert torch.equal(torch.cat(list(engine.deepspeed_io(data, route="eval"))), torch.arange(8.0 if drop_last
                                                                                              else 10.0))
    assert [len(b[0]) for b in engine.deepspeed_io(data, batch_size=5,
                                                   collate_fn=torch.utils.data.default_collate)] == [5, 5]
    with pytest.raises(ValueError, match="torch.utils.data.Dataset"):
        engine.deepspeed_io([1, 2, 3])
    engine.close()


# -- model_parameters naming part of the model ---------------------------------------------------
@pytest.mark.parametrize("stage", [2, 3])
def test_params_left_out_of_model_parameters_keep_their_values(caplog, stage):
    """Only the first layer handed to the optimizer: it trains as plain
    AdamW over that layer alone, the rest keep their values (DeepSpeed's
    optimizer never steps them), and the log says so."""
    model = make_model()
    chosen = list(model.layers[0].parameters())
    engine, _, _, _ = zinf.initialize(model=model, model_parameters=chosen,
                                      config=config_for(stage, "cpu", train_batch_size=4))
    assert "8 parameter(s) that require a gradient are not in model_parameters" in caplog.text
    plain = make_model()
    params = ADAMW["params"]
    reference = torch.optim.AdamW(plain.layers[0].parameters(), lr=params["lr"], betas=tuple(params["betas"]),
                                  eps=params["eps"], weight_decay=params["weight_decay"])
    train_both(engine, plain, reference, 3)  # equal to plain, whose other params never change
    assert not torch.equal(plain.layers[0].weight, make_model().layers[0].weight)
    with pytest.raises(ValueError, match="not the model's parameters"):
        zinf.initialize(model=make_model(), model_parameters=[torch.nn.Parameter(torch.zeros(2))],
                        config=config_for(stage, train_batch_size=4))


def test_fp16_auto_cast_hands_the_model_half_inputs():
    """fp16.auto_cast: floating positional inputs, nested in tuples, lists
    and dicts, reach the model as fp16 (integer ones untouched); keyword
    arguments pass as given, as DeepSpeed's; without it all come as given."""
    class Records(HalfParamsFloatMath):
        def forward(self, x, extra, labels=None):
            self.seen = (x.dtype, extra["ids"].dtype, extra["pair"][0].dtype, labels.dtype)
            return super().forward(x.float())
    for auto_cast, want in ((True, torch.float16), (False, torch.float32)):
        model = Records()
        config = config_for(2, train_batch_size=4, fp16={"enabled": True, "auto_cast": auto_cast})
        engine, _, _, _ = zinf.initialize(model=model, config=config)
        x, y = batch(0, 0, 0, 4)
        engine(x, {"ids": torch.arange(3), "pair": (torch.ones(2), 1)}, labels=y)
        assert model.seen == (want, torch.int64, want, torch.float32)
        engine.close()


# -- data_types.grad_accum_dtype and amp: refused where DeepSpeed refuses them -----------------
@pytest.mark.parametrize("precision, accumulate, stage, accepted", [
    ("fp32", "fp32", 0, True), ("bf16", "fp32", 0, True), ("fp16", "half", 0, True),
    ("fp32", "bf16", 0, False), ("fp32", "fp16", 0, False), ("fp16", "fp32", 0, False),
    ("bf16", "bf16", 0, False), ("bf16", "float16", 0, False),
    ("fp32", "bf16", 1, True), ("fp16", "bf16", 2, True), ("bf16", "bfloat16", 3, True),
])
def test_grad_accum_dtype_is_refused_without_zero_where_deepspeed_refuses_it(precision, accumulate, stage, accepted):
    """Without ZeRO, DeepSpeed accumulates in the model's dtype (fp32 for a
    bf16 model) and raises NotImplementedError for another; with ZeRO it
    takes any. zinf accumulates in fp32 and accepts what DeepSpeed accepts,
    training as the same config without the key does."""
    def config(with_key):
        extra = {"data_types": {"grad_accum_dtype": accumulate}} if with_key else {}
        if precision != "fp32":
            extra[precision] = {"enabled": True}
        return config_for(stage, "cpu", train_batch_size=4, **extra)
    if not accepted:
        with pytest.raises(NotImplementedError, match="data_types.grad_accum_dtype"):
            zinf.initialize(model=HalfParamsFloatMath(), config=config(True))
        return
    engines = [zinf.initialize(model=HalfParamsFloatMath(), config=config(with_key))[0] for with_key in (True, False)]
    for step in range(2):
        x, y = batch(step, 0, 0, 4)
        for engine in engines:
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
    for got, want in zip(engines[0].module.parameters(), engines[1].module.parameters()):
        assert torch.equal(utils.safe_get_full_fp32_param(got), utils.safe_get_full_fp32_param(want))
    for engine in engines:
        engine.close()


def test_an_unknown_grad_accum_dtype_and_amp_are_config_errors():
    with pytest.raises(zinf.DeepSpeedConfigError, match=r"data_types.grad_accum_dtype: 'int4'"):
        zinf.initialize(model=make_model(), config=config_for(1, "cpu", data_types={"grad_accum_dtype": "int4"}))
    # Apex amp is not zinf's: refused, as DeepSpeed refuses it with ZeRO
    # (an AssertionError there), naming the key and what to use instead.
    for stage in (0, 2):
        with pytest.raises(AssertionError, match="amp.enabled: .* use \"bf16\""):
            zinf.initialize(model=make_model(), config=config_for(stage, "cpu", amp={"enabled": True}))
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config_for(0, "cpu", amp={"enabled": False}))
    engine.close()


# -- nvme_path reused by the next run ------------------------------------------------------
def test_a_run_over_an_earlier_runs_swap_files_starts_afresh(scratch):
    """Scripts keep one nvme_path ("/local_nvme") for every run. The swap
    files an earlier run left, of another model, sub_group_size or state
    format, are reused space (DeepSpeed overwrites its own): before, the
    next run failed on their layout. The run trains as on an empty path;
    small sub-groups (DeepSpeed's tests use 100 elements) commit in batches."""
    def run(nvme, sub_group_size, state_format="fp32"):
        config = config_for(3, "nvme", "nvme", nvme, train_batch_size=4)
        config["zero_optimization"]["sub_group_size"] = sub_group_size
        config["zero_optimization"]["offload_optimizer"]["state_format"] = state_format
        engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
        for step in range(2):
            x, y = batch(step, 0, 0, 4)
            engine.backward(torch.nn.functional.mse_loss(engine(x), y))
            engine.step()
        values = [utils.safe_get_full_fp32_param(p).clone() for p in engine.module.parameters()]
        engine.close()
        return values
    fresh = run(os.path.join(scratch, "fresh"), 100)
    shared = os.path.join(scratch, "shared")
    run(shared, 300, "bf16")
    for got, want in zip(run(shared, 100), fresh):
        assert torch.equal(got, want)


def test_sub_groups_under_min_swap_bytes_stay_in_host_memory(scratch, capfd):
    """sub_group_size 50 (DeepSpeed's tests use 100) with the optimizer on
    NVMe: each sub-group's fp32 params are under 1 MiB, so, as DeepSpeed
    keeps them, their states and gradients stay in host memory (swapped,
    each tensor would be an NVMe request of its own). The engine says so,
    naming the key and the size that would swap; the optimizer moves no
    NVMe bytes, and training equals plain torch."""
    config = config_for(3, "nvme", "none", scratch, train_batch_size=4)
    del config["zero_optimization"]["offload_optimizer"]["min_swap_bytes"]  # the default
    config["zero_optimization"]["sub_group_size"] = 50
    plain = make_model()
    model = make_model()
    model.load_state_dict(plain.state_dict())
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    reference = torch.optim.AdamW(plain.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)

    def no_nvme_traffic(step):
        timings = engine.timings()
        assert timings["nvme_written_bytes"] == 0 and timings["nvme_read_bytes"] == 0, timings

    train_both(engine, plain, reference, 3, after_step=no_nvme_traffic)
    err = capfd.readouterr().err
    groups = -(-sum(p.numel() for p in plain.parameters()) // 50)
    assert f"zero3: {groups} of {groups} sub-groups are under 1 MiB of fp32 each" in err, err
    assert "optimizer states and gradients stay in host memory" in err
    assert "zero_optimization.sub_group_size 262144 or more swaps them" in err


# -- engine.tput_timer: DeepSpeed's ThroughputTimer ---------------------------------------------
def test_the_throughput_timer_counts_steps_and_times_them_from_the_third(capsys):
    """engine.tput_timer as DeepSpeed's: the global batch as batch_size,
    every micro-step counted from forward to step(), global steps at the
    boundaries, and time summed from global step start_step (2) on, so
    avg_samples_per_sec() is -inf until a step after the warm-up was timed.
    The running average goes into the step line."""
    config = config_for(3, "cpu", gradient_accumulation_steps=2, steps_per_print=3)
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    timer = engine.tput_timer
    assert (timer.batch_size, timer.start_step) == (4 * 2, 2)
    assert not timer.initialized and not timer.started
    timer.stop()  # before any start: no effect, as DeepSpeed's
    assert timer.micro_step_count == 0
    for step in range(3):
        for micro in range(2):
            x, y = batch(step, micro, 0, 4)
            loss = mse(engine, x, y)
            assert timer.started
            engine.backward(loss)
            engine.step()
            assert not timer.started
        assert (timer.micro_step_count, timer.global_step_count) == (2 * (step + 1), step + 1)
        if step < 2:
            assert timer.total_elapsed_time == 0 and timer.avg_samples_per_sec() == float("-inf")
    assert timer.total_elapsed_time > 0
    assert timer.avg_samples_per_sec() == pytest.approx(8 / timer.total_elapsed_time)
    assert "samples/s" in capsys.readouterr().out  # step 3's line
    engine.set_train_micro_batch_size(2)
    assert timer.batch_size == engine.train_batch_size() == 4
    engine.destroy()


def test_throughput_timers_config_is_read_and_checked():
    """"timers": {"throughput": {"enabled": false}} turns the timer off (it
    counts nothing); a value that is not a bool is a DeepSpeedConfigError
    naming its key, raised before the model is built."""
    config = config_for(2, timers={"throughput": {"enabled": False, "synchronized": False}})
    engine, _, _, _ = zinf.initialize(model=make_model(), config=config)
    assert not engine.tput_timer.config.enabled and not engine.tput_timer.config.synchronized
    x, y = batch(0, 0, 0, 4)
    engine.backward(mse(engine, x, y))
    engine.step()
    assert engine.tput_timer.micro_step_count == 0 and not engine.tput_timer.initialized
    engine.destroy()
    # Built by a script, as DeepSpeed's: with report_speed, a line at every
    # steps_per_output-th global step after the warm-up.
    from zinf.utils.timer import ThroughputTimer, throughput_config
    lines = []
    timer = ThroughputTimer(throughput_config({}), batch_size=6, start_step=1, steps_per_output=2,
                            logging_fn=lines.append)
    for _ in range(4):
        timer.start()
        timer.stop(global_step=True)
    assert timer.global_step_count == 4 and len(lines) == 2, lines  # steps 2 and 4
    assert lines[-1].startswith("epoch=0/micro_step=4/global_step=4, RunningAvgSamplesPerSec=")
    for timers, key in (({"throughput": {"enabled": "yes"}}, "timers.throughput.enabled"),
                        ({"throughput": []}, "timers.throughput"), (3, "timers")):
        with pytest.raises(zinf.DeepSpeedConfigError, match=key.replace(".", r"\.")):
            zinf.initialize(model=make_model(), config=config_for(2, timers=timers))

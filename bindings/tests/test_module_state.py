"""What a model holds besides its trained parameters survives zinf's saves:
the persistent buffers (a norm's running statistics, a step counter) and
the names a tied weight goes by. save_16bit_model, save_checkpoint /
load_checkpoint and zero_to_fp32 give state dicts that the model loads with
load_state_dict(strict=True), and a resumed model evaluates as the one that
was saved."""
import os

import pytest
import torch

import zinf
from zinf.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, load_state_dict_from_zero_checkpoint


class Tagged(torch.nn.Linear):
    """A module with extra state (get_extra_state / set_extra_state), which
    is not a tensor."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = {"batches": 0}

    def forward(self, x):
        self.seen["batches"] += 1
        return super().forward(x)

    def get_extra_state(self):
        return dict(self.seen)

    def set_extra_state(self, state):
        self.seen = dict(state)


class NormedTied(torch.nn.Module):
    """A batch norm (running statistics), a tied output projection, a
    persistent counter, a non-persistent scratch buffer and a module with
    extra state."""

    def __init__(self, extra_buffer=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = Tagged(6, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 6)
        self.out.weight = self.embed.weight
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        if extra_buffer:
            self.register_buffer("added_later", torch.ones(2))

    def forward(self, x):
        self.calls += 1
        return self.out(torch.tanh(self.norm(self.embed(x))))


def config(stage, scratch):
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if stage == 3:
        zero["offload_param"] = {"device": "nvme", "nvme_path": os.path.join(scratch, "nvme")}
    return {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}, "zero_optimization": zero,
            "steps_per_print": 0}


def trained(stage, scratch, steps=3):
    model = NormedTied()
    engine, _, _, _ = zinf.initialize(model=model, config=config(stage, scratch))
    for step in range(steps):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    return model, engine


def evaluate(engine, x):
    engine.eval()
    with torch.no_grad():
        out = engine(x)
    engine.train()
    return out


@pytest.mark.parametrize("stage", [0, 3])
def test_the_16bit_model_holds_the_buffers_and_every_tied_name(scratch, stage):
    model, engine = trained(stage, scratch)
    assert float(model.calls) == 3 and int(model.norm.num_batches_tracked) == 3
    engine.save_16bit_model(os.path.join(scratch, "bin"))
    saved = torch.load(os.path.join(scratch, "bin", "pytorch_model.bin"))
    fresh = NormedTied()
    fresh.load_state_dict(saved)  # strict: the tied name and the buffers are there
    assert torch.equal(fresh.norm.running_mean, model.norm.running_mean)
    assert float(fresh.calls) == 3 and "scratch" not in saved
    assert fresh.embed.seen == {"batches": 3}
    weights = engine.consolidated_state_dict()
    assert torch.equal(saved["out.weight"], weights["embed.weight"])
    assert engine.module_state_dict().keys() == saved.keys()
    engine.save_16bit_model(os.path.join(scratch, "st"), "model.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(os.path.join(scratch, "st", "model.safetensors"))
    # A tied weight once, as save_pretrained writes it; extra state is no tensor.
    assert set(saved) - set(tensors) == {"out.weight", "embed._extra_state"}
    engine.close()


@pytest.mark.parametrize("stage", [0, 3])
def test_a_resumed_model_evaluates_as_the_saved_one(scratch, stage):
    """Batch norm in eval mode uses its running statistics: a checkpoint
    that lost them would predict differently after resuming."""
    model, engine = trained(stage, scratch)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(99))
    engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    want = evaluate(engine, x)
    engine.close()
    resumed_model = NormedTied()
    resumed, _, _, _ = zinf.initialize(model=resumed_model, config=config(stage, os.path.join(scratch, "resumed")))
    resumed.load_checkpoint(os.path.join(scratch, "ckpt"))
    assert int(resumed_model.norm.num_batches_tracked) == 3 and float(resumed_model.calls) == 3
    assert resumed_model.embed.seen == {"batches": 3}  # extra state, through set_extra_state
    torch.testing.assert_close(evaluate(resumed, x), want, atol=1e-6, rtol=1e-6)
    resumed.close()


def test_zero_to_fp32_gives_a_state_dict_the_model_loads_strictly(scratch):
    model, engine = trained(3, scratch)
    engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    engine.close()
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(scratch, "ckpt"))
    assert state["out.weight"] is state["embed.weight"]
    assert state["norm.running_var"].dtype == torch.float32
    assert state["norm.num_batches_tracked"].dtype == torch.int64
    fresh = NormedTied()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.norm.running_mean, model.norm.running_mean)
    other = load_state_dict_from_zero_checkpoint(NormedTied(), os.path.join(scratch, "ckpt"))
    assert torch.equal(other.norm.running_var, model.norm.running_var) and float(other.calls) == 3


def test_buffers_that_differ_are_named_unless_not_strict(scratch):
    _, engine = trained(0, scratch, steps=1)
    engine.save_checkpoint(os.path.join(scratch, "ckpt"))
    engine.close()
    model = NormedTied(extra_buffer=True)
    resumed, _, _, _ = zinf.initialize(model=model, config=config(0, scratch))
    before = resumed.consolidated_state_dict()
    with pytest.raises(ValueError, match=r"missing \['added_later'\]"):
        resumed.load_checkpoint(os.path.join(scratch, "ckpt"))
    after = resumed.consolidated_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # refused before anything was loaded
    resumed.load_checkpoint(os.path.join(scratch, "ckpt"), load_module_strict=False)
    assert int(model.norm.num_batches_tracked) == 1 and torch.equal(model.added_later, torch.ones(2))
    resumed.close()


def test_below_stage_3_rank_0_alone_may_take_the_module_state(scratch):
    """DeepSpeed's module_state_dict is the module's own state dict:
    scripts call it on rank 0 only. Below stage 3 zinf's needs no
    collective either (two ranks; rank 1 does not call it)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_initialize import launch
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
              "zero_optimization": {"stage": 2}, "steps_per_print": 0}
    codes, errors, result = launch(2, {"config": config, "steps": 2, "module_state_on_rank0": True}, scratch,
                                   timeout=180)
    assert codes == [0, 0], errors
    assert set(result["module_state"]) >= {"layers.0.weight"}

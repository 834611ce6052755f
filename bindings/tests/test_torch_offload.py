"""zinf.torch.offload and zinf.TensorSwapper."""
import gc
import os
import subprocess
import sys

import pytest
import torch

import zinf
import zinf.torch


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                               torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()),
                               torch.nn.Linear(64, 3))


def config(kind, scratch):
    block = {"device": kind}
    if kind == "nvme":
        block["nvme_path"] = scratch
    return {"zero_optimization": {"stage": 3, "offload_param": block}}


@pytest.mark.parametrize("kind", ["nvme", "cpu"])
def test_outputs_and_gradients_equal_the_plain_modules(scratch, kind):
    plain, offloaded = small_model(), small_model()
    handle = zinf.torch.offload(offloaded, config(kind, scratch))
    x = torch.randn(5, 16)
    for _ in range(3):  # the first pass records the order, later ones prefetch
        for m in (plain, offloaded):
            m.zero_grad(set_to_none=True)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = plain(xa), offloaded(xb)
        assert torch.equal(ya, yb)
        (ya ** 2).sum().backward()
        (yb ** 2).sum().backward()
        assert torch.equal(xa.grad, xb.grad)
        for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
            assert torch.equal(a.grad, b.grad), name
    if kind == "nvme":
        assert handle.stats["prefetches"] > 0
    handle.close()


def test_parameters_are_gone_between_uses_and_come_back_for_the_optimizer(scratch):
    model = small_model()
    reference = small_model()
    handle = zinf.torch.offload(model, config("nvme", scratch))
    assert all(p.numel() == 0 for p in model.parameters())
    with torch.no_grad():
        model(torch.randn(2, 16))
    assert all(p.numel() == 0 for p in model.parameters())
    with handle.materialized(), torch.no_grad():
        for a, b in zip(model.parameters(), reference.parameters()):
            assert torch.equal(a, b)
            a.add_(1.0)  # an optimizer step
    assert all(p.numel() == 0 for p in model.parameters())
    with handle.materialized(write_back=False):
        for a, b in zip(model.parameters(), reference.parameters()):
            assert torch.equal(a, b + 1.0)  # the update was stored
    handle.close()


def test_stepping_in_backward_trains_like_adamw_and_keeps_no_gradients(scratch):
    """optimizer= steps each unit as soon as its gradients are in: the
    parameters follow torch.optim.AdamW on the plain model, and no gradient
    outlives the backward pass."""
    plain, offloaded = small_model(), small_model()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    handle = zinf.torch.offload(offloaded, config("nvme", scratch),
                                optimizer=lambda params: zinf.CPUAdam(params, **kwargs))
    reference = torch.optim.AdamW(plain.parameters(), **kwargs)
    generator = torch.Generator().manual_seed(3)
    for step in range(8):
        x = torch.randn(6, 16, generator=generator)
        (plain(x) ** 2).mean().backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
        (offloaded(x) ** 2).mean().backward()
        # Every unit was stepped inside backward.
        assert handle.stats["unit_steps"] == (step + 1) * len(handle.units)
        handle.step_done()
        assert all(p.grad is None for p in offloaded.parameters())
        # The moments are on NVMe between steps too.
        for optimizer in handle._optimizers:
            for state in optimizer.state.values():
                assert state["exp_avg"] is None and state["exp_avg_sq"] is None
        assert all(p.numel() == 0 for p in offloaded.parameters())
    with handle.materialized(write_back=False):
        for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6, msg=name)
    handle.close()


def test_bad_configs_name_the_key(scratch):
    with pytest.raises(ValueError, match="offload_param.device"):
        zinf.torch.offload(small_model(), {"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="zero_optimization.offload_param.nvme_path"):
        zinf.torch.offload(small_model(), {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        zinf.torch.offload(small_model(), {"zero_optimization": {"stage": 9, "offload_param": {"device": "cpu"}}})
    # An nvme_path that cannot be created (under a regular file) names it.
    with open(os.path.join(scratch, "file"), "w"):
        pass
    blocked = os.path.join(scratch, "file", "deeper")
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OSError, match="offload_param.nvme_path.*deeper"):
        zinf.torch.offload(model, config("nvme", blocked))
    # ... and the module is left as it was.
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_pin_memory_false_keeps_cpu_copies_in_ordinary_memory(scratch):
    # Earlier tests' handles may be cyclic garbage holding pinned copies: a
    # collection during this test would lower the count under it.
    gc.collect()
    pinned_before = zinf._zinf.pinned_bytes_in_use()
    settings = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": False}}}
    plain, offloaded = small_model(), small_model()
    handle = zinf.torch.offload(offloaded, settings)
    assert zinf._zinf.pinned_bytes_in_use() == pinned_before
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(offloaded(x), plain(x))
    handle.close()
    pinned = zinf.torch.offload(small_model(), config("cpu", scratch))
    assert zinf._zinf.pinned_bytes_in_use() > pinned_before
    pinned.close()


def test_a_missing_nvme_path_is_created(scratch):
    path = os.path.join(scratch, "missing", "deeper")
    handle = zinf.torch.offload(small_model(), config("nvme", path))
    assert os.path.isdir(path) and len(os.listdir(path)) == 1
    handle.close()
    assert os.listdir(path) == []


def test_offload_directories_go_with_the_handle(scratch):
    """close(), a with block, garbage collection, a failed constructor and
    interpreter exit each remove the handle's zinf-offload.* directory."""
    import gc
    with zinf.torch.offload(small_model(), config("nvme", scratch)) as handle:
        assert len(os.listdir(scratch)) == 1
    assert os.listdir(scratch) == []
    model = small_model()
    zinf.torch.offload(model, config("nvme", scratch))
    assert len(os.listdir(scratch)) == 1
    del model
    gc.collect()
    assert os.listdir(scratch) == []
    # A constructor that fails after creating its directory (a unit list
    # holding a module without parameters is fine; a bad optimizer is not).
    with pytest.raises(RuntimeError, match="no optimizer"):
        zinf.torch.offload(small_model(), config("nvme", scratch),
                           optimizer=lambda params: (_ for _ in ()).throw(RuntimeError("no optimizer")))
    gc.collect()
    assert os.listdir(scratch) == []
    script = ("import sys, torch, zinf.torch\n"
              "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))\n"
              "h = zinf.torch.offload(m, {'zero_optimization': {'stage': 3, 'offload_param': "
              "{'device': 'nvme', 'nvme_path': sys.argv[1]}}})\n"
              "print(len(__import__('os').listdir(sys.argv[1])))\n")
    result = subprocess.run([sys.executable, "-c", script, scratch], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "1"
    assert os.listdir(scratch) == []


def test_tensor_swapper_round_trips_prefetches_and_reopens(scratch):
    swapper = zinf.TensorSwapper(scratch)
    tensors = {"a": torch.randn(3, 1001), "b": torch.arange(10, dtype=torch.int64), "c": torch.randn(7).half()}
    for key, t in tensors.items():
        swapper.swap_out(key, t)
    swapper.commit()
    swapper.prefetch(["a", "c"])
    for key, t in tensors.items():
        back = swapper.swap_in(key)
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
        swapper.release(key)
    assert sorted(swapper.keys()) == ["a", "b", "c"]
    del swapper
    reopened = zinf.TensorSwapper(scratch)
    assert torch.equal(reopened.swap_in("a"), tensors["a"])
    with pytest.raises(KeyError):
        reopened.swap_in("nope")


def test_the_example_trains_to_torchs_loss_within_1e_5(scratch):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "torch_offload_train.py")
    result = subprocess.run([sys.executable, example, "--steps", "50", "--nvme", scratch], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "step 50 loss" in result.stdout


def test_a_parameter_used_outside_its_unit_is_fetched_on_demand(scratch, caplog):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from initialize_model import ReadsItsChildsWeight
    plain = ReadsItsChildsWeight()
    offloaded = ReadsItsChildsWeight()
    handle = zinf.torch.offload(offloaded, {"zero_optimization": {"stage": 3, "offload_param": {
        "device": "nvme", "nvme_path": scratch}}})
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with caplog.at_level("WARNING", logger="zinf"):
        for _ in range(2):
            a, b = plain(ids), offloaded(ids)
            assert torch.equal(a, b)
            a.pow(2).mean().backward()
            b.pow(2).mean().backward()
            assert offloaded.embed.weight.numel() == 0  # dropped once backward is done
        with torch.no_grad():
            assert torch.equal(offloaded(ids), plain(ids))
        assert offloaded.embed.weight.numel() == 0
    for (name, pa), (_, pb) in zip(plain.named_parameters(), offloaded.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)
    said = [r.getMessage() for r in caplog.records if "outside its unit" in r.getMessage()]
    assert len(said) == 1 and "embed.weight" in said[0], said
    handle.close()

"""Checkpoints of an offloaded module: state_dict() and load_state_dict()
see the real values outside materialized(), and a Hugging Face Trainer
saves a model that reloads."""
import os

import pytest
import torch

import zinf.torch

from test_torch_offload import config, small_model


@pytest.mark.parametrize("kind", ["nvme", "cpu"])
def test_state_dict_outside_materialized_holds_the_weights(scratch, kind):
    plain, offloaded = small_model(), small_model()
    handle = zinf.torch.offload(offloaded, config(kind, scratch))
    saved = offloaded.state_dict()
    expected = plain.state_dict()
    assert list(saved) == list(expected)
    for name, value in expected.items():
        assert torch.equal(saved[name], value), name
    # The module's params stay offloaded, and the copies are the caller's.
    assert all(p.numel() == 0 for p in offloaded.parameters())
    saved["0.weight"].add_(1.0)
    with handle.materialized(write_back=False):
        assert torch.equal(offloaded[0].weight, plain[0].weight)
    # A saved file reloads into a plain module with the same outputs.
    path = os.path.join(scratch, "model.pt")
    torch.save(offloaded.state_dict(), path)
    fresh = small_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(torch.load(path))
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), plain(x))
    # Inside materialized() state_dict is the live params.
    with handle.materialized(write_back=False):
        assert torch.equal(offloaded.state_dict()["4.bias"], plain[4].bias.detach())
    # A submodule's state_dict (its own prefix) works too.
    assert torch.equal(offloaded[3].state_dict()["0.weight"], plain[3][0].weight.detach())
    handle.close()


@pytest.mark.parametrize("kind", ["nvme", "cpu"])
def test_load_state_dict_stores_the_new_weights(scratch, kind):
    torch.manual_seed(5)
    source = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                                 torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh()),
                                 torch.nn.Linear(64, 3))
    offloaded = small_model()
    handle = zinf.torch.offload(offloaded, config(kind, scratch))
    offloaded.load_state_dict(source.state_dict())
    assert all(p.numel() == 0 for p in offloaded.parameters())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(offloaded(x), source(x))
    # Shape mismatches are reported as torch reports them.
    bad = source.state_dict()
    bad["0.weight"] = torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match="size mismatch"):
        offloaded.load_state_dict(bad)
    # Loading inside materialized() keeps the params present.
    with handle.materialized():
        offloaded.load_state_dict(small_model().state_dict())
        assert offloaded[0].weight.numel() == 16 * 64
    with torch.no_grad():
        assert torch.equal(offloaded(x), small_model()(x))
    handle.close()


def test_trainer_save_model_reloads_the_offloaded_gpt2(scratch):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed here "
                                       "(scripts/test.sh installs 4.40 into its Debian-torch venv only)")
    config_ = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config_)
    offloaded = transformers.GPT2LMHeadModel(config_)
    offloaded.load_state_dict(plain.state_dict())
    handle = zinf.torch.offload(offloaded, config("nvme", os.path.join(scratch, "nvme")))
    output = os.path.join(scratch, "out")
    args = transformers.TrainingArguments(output_dir=output, report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=offloaded, args=args)
    trainer.save_model(output)
    weights = os.path.join(output, "model.safetensors")
    assert os.path.getsize(weights) > 4 * sum(p.numel() for p in plain.parameters()) // 2
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(output)
    ids = torch.randint(0, 97, (2, 8))
    plain.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, plain(ids).logits)
    handle.close()


def test_a_trainer_trains_the_offloaded_gpt2_as_the_plain_one(scratch):
    """Hugging Face's Trainer with the params on NVMe between steps
    (zinf.torch.offload) and zinf.CPUAdam stepped inside materialized()
    (handle.wrap_optimizer) ends where the same Trainer on the plain model
    ends."""
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed here "
                                       "(scripts/test.sh installs 4.40 into its Debian-torch venv only)")
    config_ = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    plain = transformers.GPT2LMHeadModel(config_)
    offloaded = transformers.GPT2LMHeadModel(config_)
    offloaded.load_state_dict(plain.state_dict())
    initial = {k: v.clone() for k, v in plain.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    samples = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (8, 12), generator=generator)]

    def train(model, optimizer, output):
        args = transformers.TrainingArguments(output_dir=output, report_to=[], use_cpu=True, max_steps=3,
                                              per_device_train_batch_size=2, lr_scheduler_type="constant",
                                              max_grad_norm=1.0, seed=0, save_strategy="no")
        trainer = transformers.Trainer(model=model, args=args, train_dataset=samples, optimizers=(optimizer, None))
        return trainer.train().training_loss

    want = train(plain, zinf.CPUAdam(plain.parameters(), lr=1e-3), os.path.join(scratch, "plain"))
    handle = zinf.torch.offload(offloaded, config("nvme", os.path.join(scratch, "nvme")))
    optimizer = handle.wrap_optimizer(zinf.CPUAdam(offloaded.parameters(), lr=1e-3))
    got = train(offloaded, optimizer, os.path.join(scratch, "offloaded"))
    assert got == pytest.approx(want, rel=1e-6)
    assert all(p.numel() == 0 for unit in handle.units for p in unit.parameters())  # off the module again
    trained = offloaded.state_dict()
    assert not torch.equal(trained["lm_head.weight"], initial["lm_head.weight"])  # it did train
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6, msg=key)
    handle.close()

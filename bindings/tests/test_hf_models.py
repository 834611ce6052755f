"""Hugging Face architectures through zinf.torch.offload: each decoder
layer is a unit, the outputs (ModelOutput objects) and gradients equal the
plain model's, and between uses the layers' parameters are off the module.
Tiny configs of GPT-2 (tied embeddings), Llama (grouped-query attention),
BERT, T5 (encoder-decoder) and Mixtral (mixture of experts)."""
import copy
import os

import pytest
import torch

import zinf
import zinf.torch

transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed here "
                                   "(scripts/test.sh installs 4.40 into its Debian-torch venv only)")


def tiny(name):
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97,
                                                                    n_positions=16))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=97, max_position_embeddings=32))
    if name == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=97,
            max_position_embeddings=32))
    if name == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16, vocab_size=97))
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=97, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "mixtral"])
def test_layers_stream_and_outputs_and_gradients_match(scratch, name):
    torch.manual_seed(0)
    plain = tiny(name)
    plain.eval()
    offloaded = copy.deepcopy(plain)
    handle = zinf.torch.offload(offloaded, {"zero_optimization": {"stage": 3, "offload_param": {
        "device": "nvme", "nvme_path": scratch}}})
    layers = [u for u in handle.units if "Layer" in type(u).__name__ or "Block" in type(u).__name__]
    assert len(layers) >= 2, [type(u).__name__ for u in handle.units]
    for step in range(2):  # the second pass prefetches by the recorded order
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(step))
        extra = {"decoder_input_ids": ids} if name == "t5" else {}
        for model in (plain, offloaded):
            model.zero_grad(set_to_none=True)
        a, b = plain(ids, **extra).logits, offloaded(ids, **extra).logits
        assert torch.equal(a, b)
        a.float().pow(2).mean().backward()
        b.float().pow(2).mean().backward()
        for (key, pa), (_, pb) in zip(plain.named_parameters(), offloaded.named_parameters()):
            assert (pa.grad is None) == (pb.grad is None), key
            if pa.grad is not None:
                torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-7, msg=key)
        # Every unit's parameters are off the module again.
        assert all(p.numel() == 0 for unit in handle.units for p in unit.parameters())
    assert handle.stats["prefetches"] > 0
    # And the weights come back whole in a state_dict.
    saved = offloaded.state_dict()
    for key, value in plain.state_dict().items():
        assert torch.equal(saved[key], value), key
    handle.close()


def without_dropout(model):
    """Dropout off everywhere (modules and the float rates some attention
    classes keep), so two copies of a model compute the same."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in ("dropout", "dropout_rate", "attention_dropout"):
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    return model


def train_like_plain(engine, plain, reference, name="", steps=3):
    """`steps` steps of the engine and of `plain` with `reference` (a torch
    optimizer over plain's trainable params) on the same token batches:
    equal losses each step, then equal parameters. Returns the engine's."""
    for step in range(steps):
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(step))
        extra = {"decoder_input_ids": ids} if name == "t5" else {}
        got = engine(input_ids=ids, labels=ids, **extra).loss
        engine.backward(got)
        engine.step()
        want = plain(input_ids=ids, labels=ids, **extra).loss
        want.backward()
        reference.step()
        reference.zero_grad()
        assert float(got) == pytest.approx(float(want), rel=1e-5), step
    trained = engine.consolidated_state_dict()
    for key, value in plain.named_parameters():
        torch.testing.assert_close(trained[key], value.detach(), rtol=1e-4, atol=1e-5, msg=key)
    return trained


@pytest.mark.parametrize("name,device", [("gpt2", "nvme"), ("llama", "nvme"), ("bert", "nvme"), ("t5", "nvme"),
                                         ("mixtral", "nvme"), ("llama", "cpu"), ("mixtral", "cpu")])
def test_zinf_initialize_stage3_trains_as_plain_pytorch(scratch, name, device):
    """The same models through zinf.initialize (stage 3, params and optimizer
    offloaded): losses and parameters after three AdamW steps equal the plain
    model trained with torch.optim.AdamW."""
    torch.manual_seed(0)
    plain = without_dropout(tiny(name))
    plain.train()
    model = copy.deepcopy(plain)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    for key in ("offload_param", "offload_optimizer"):
        zero[key] = {"device": device, "nvme_path": scratch} if device == "nvme" else {"device": device}
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                        "weight_decay": 0.01}}}
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    layers = [u for u in engine._units if "Layer" in type(u.module).__name__ or "Block" in type(u.module).__name__]
    assert len(layers) >= 2, [u.name for u in engine._units]
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    train_like_plain(engine, plain, reference, name)
    # Between uses the layers hold nothing.
    assert all(p.numel() == 0 for unit in layers for _, p in unit.params)
    engine.close()


def test_the_16bit_export_loads_with_from_pretrained(scratch):
    """zinf.initialize's save_16bit_model next to the model's config is a
    checkpoint Hugging Face loads: the reloaded GPT-2 (tied head included)
    computes what the trained masters, rounded to bf16, compute."""
    torch.manual_seed(0)
    model = without_dropout(tiny("gpt2"))
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "offload_param": {"device": "nvme", "nvme_path": scratch},
                                    "offload_optimizer": {"device": "nvme", "nvme_path": scratch}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
    export = os.path.join(scratch, "export")
    engine.save_16bit_model(export, "model.safetensors")
    model.config.save_pretrained(export)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(export, torch_dtype=torch.bfloat16)
    masters = engine.consolidated_state_dict()
    assert torch.equal(reloaded.transformer.wte.weight, masters["transformer.wte.weight"])
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # tied again
    reloaded.eval()
    engine.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, engine(ids).logits)
    engine.close()


@pytest.mark.parametrize("mode", ["materialized", "optimizer"])
@pytest.mark.parametrize("device", ["nvme", "cpu"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5", "mixtral"])
def test_offload_training_steps_match_plain_training(scratch, name, device, mode):
    """zinf.torch.offload trains each architecture as the plain model does:
    the optimizer stepped inside materialized(), or per unit during backward
    (optimizer=); params (and with nvme the Adam states) offloaded."""
    torch.manual_seed(0)
    plain = without_dropout(tiny(name))
    plain.train()
    offloaded = copy.deepcopy(plain)
    block = {"device": device, "nvme_path": scratch} if device == "nvme" else {"device": device}
    settings = {"zero_optimization": {"stage": 3, "offload_param": block}}
    make = lambda params: zinf.CPUAdam(params, lr=1e-3)  # noqa: E731
    handle = zinf.torch.offload(offloaded, settings, optimizer=make if mode == "optimizer" else None)
    reference = make(list(plain.parameters()))
    optimizer = make(list(offloaded.parameters())) if mode == "materialized" else None
    for step in range(3):
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(step))
        extra = {"decoder_input_ids": ids} if name == "t5" else {}
        want = plain(ids, labels=ids, **extra).loss
        want.backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
        got = offloaded(ids, labels=ids, **extra).loss
        got.backward()
        if mode == "materialized":
            with handle.materialized():
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            handle.step_done()
        assert float(got) == pytest.approx(float(want), rel=1e-5), step
    trained = offloaded.state_dict()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-5, atol=1e-6, msg=key)
    handle.close()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_activation_checkpointing_at_stage3_trains_as_plain_pytorch(scratch, name):
    """gradient_checkpointing_enable() at ZeRO stage 3: the layers are
    recomputed in backward (reentrant in transformers 4.x, through the
    module's hooks; non-reentrant in 5.x, forward alone, and torch checks
    the recomputation saves what the forward saved), with the same losses
    and parameters as the plain model checkpointed the same way."""
    torch.manual_seed(0)
    plain = without_dropout(tiny(name))
    plain.train()
    model = copy.deepcopy(plain)
    for m in (plain, model):
        m.gradient_checkpointing_enable()
        m.config.use_cache = False
    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "offload_param": {"device": "nvme", "nvme_path": scratch},
                                    "offload_optimizer": {"device": "cpu"}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    reference = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.01)
    train_like_plain(engine, plain, reference, name)
    engine.close()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_at_stage3_gives_the_plain_models_tokens(scratch, name):
    """engine.module.generate() (evaluation, RLHF rollouts) at stage 3 with
    params on NVMe: each step's forward gathers and drops the layers around
    it, the tokens are the plain model's, and training goes on after."""
    torch.manual_seed(0)
    plain = without_dropout(tiny(name))
    plain.eval()
    model = copy.deepcopy(plain)
    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "offload_param": {"device": "nvme", "nvme_path": scratch},
                                    "offload_optimizer": {"device": "cpu"}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    engine.eval()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        got = engine.module.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert all(p.numel() == 0 for unit in engine._units for _, p in unit.params if unit.name != "(root)")
    engine.train()
    engine.backward(engine(ids, labels=ids).loss)
    assert engine.step() is None and engine.global_steps == 1
    engine.close()


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_peft_lora_at_stage3_trains_as_plain_pytorch(scratch, name):
    """A PEFT LoRA model (frozen base, adapters trained) at stage 3 with
    params on NVMe: the adapters train as torch.optim.AdamW trains them, the
    base keeps no optimizer state and does not move."""
    peft = pytest.importorskip("peft", reason="peft is not installed here (scripts/test.sh installs it into the "
                               "newest-torch venv)")
    torch.manual_seed(0)
    base = without_dropout(tiny(name))
    targets = ["q_proj", "v_proj"] if name == "llama" else ["c_attn"]
    plain = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    plain.train()
    for key, p in plain.named_parameters():
        if "lora_B" in key:  # zero at init: start it elsewhere, so the base's gradient path matters
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    model = copy.deepcopy(plain)
    config = {"train_micro_batch_size_per_gpu": 2,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "offload_param": {"device": "nvme", "nvme_path": scratch},
                                    "offload_optimizer": {"device": "nvme", "nvme_path": scratch}},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0}}}
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = zinf.initialize(model=model, model_parameters=trainable, config=config)
    reference = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    frozen_start = {k: p.detach().clone() for k, p in plain.named_parameters() if not p.requires_grad}
    trained = train_like_plain(engine, plain, reference, name)
    for key, value in frozen_start.items():
        assert torch.equal(trained[key], value), key
    engine.close()

"""Hugging Face architectures through zinf.torch.offload: each decoder
layer is a unit, the outputs (ModelOutput objects) and gradients equal the
plain model's, and between uses the layers' parameters are off the module.
Tiny configs of GPT-2 (tied embeddings), Llama (grouped-query attention),
BERT, T5 (encoder-decoder) and Mixtral (mixture of experts)."""
import copy

import pytest
import torch

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

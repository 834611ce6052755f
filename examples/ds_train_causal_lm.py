"""A DeepSpeed training script that runs on zinf by its import alone.

A Hugging Face causal LM built from a config (random init, nothing
downloaded) trained with ZeRO stage 3, params and optimizer states on NVMe:

    torchrun --nproc_per_node 2 examples/ds_train_causal_lm.py --nvme /var/tmp/zinf-nvme
    python examples/ds_train_causal_lm.py --offload none      # the same run, nothing offloaded

Prints one line per step (`step N loss L`) on rank 0; --losses FILE also
writes them as JSON. Needs transformers (4.40 with Debian's torch 1.13).
"""
import argparse
import json
import os

import torch

import zinf as deepspeed


def build_model(kind):
    import transformers
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def ds_config(args):
    zero = {"stage": 3, "stage3_param_persistence_threshold": 1000, "sub_group_size": 100000}
    if args.offload != "none":
        for key in ("offload_param", "offload_optimizer"):
            zero[key] = {"device": args.offload}
            if args.offload == "nvme":
                zero[key]["nvme_path"] = args.nvme
    return {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8,
                                                  "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": args.steps, "warmup_num_steps": 2}},
        "zero_optimization": zero,
        "steps_per_print": 0,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--offload", choices=["nvme", "cpu", "none"], default="nvme")
    parser.add_argument("--nvme", default="/var/tmp/zinf-example-nvme")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--losses", help="write rank 0's losses here as JSON")
    args = parser.parse_args()

    deepspeed.init_distributed()
    model = build_model(args.model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(args))
    rank, world = engine.global_rank, engine.world_size
    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    losses = []
    for step in range(args.steps):
        step_loss = 0.0
        for _ in range(engine.gradient_accumulation_steps()):
            ids = torch.randint(0, 256, (args.micro_batch, 32), generator=generator)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            step_loss += float(loss) / engine.gradient_accumulation_steps()
        losses.append(step_loss)
        if rank == 0:
            print(f"step {step} loss {step_loss:.6f} lr {engine.get_lr()[0]:.3g}", flush=True)
    if rank == 0 and args.losses:
        with open(args.losses, "w") as file:
            json.dump({"losses": losses, "world": world, "offload": args.offload}, file)
    engine.close()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

#!/usr/bin/env python3
"""Capacity: a model whose params + gradients + Adam states are larger than
twice this machine's RAM, built under zinf.zero.Init and trained a few steps
by zinf.initialize with params and optimizer states on NVMe.

    /usr/bin/python3 bench/capacity_zero_init.py --nvme /var/tmp --blocks 24 --steps 3 --sub-group 2e7

The model is a stack of MLP blocks (width --width, 4x hidden), between a
token embedding and a head: --blocks 24 at width 4096 is 3.23B params; it
learns one fixed batch, so the loss falls. The
script prints the sizes it reasons with (bf16 params, fp32 gradients and
Adam's fp32 master + two moments: 18 bytes per param as zinf keeps them, 16
as DeepSpeed counts them), each step's time and the engine's timings, and
the process's peak RSS against the machine's RAM, and writes them as JSON
with --json. Run it with torch's python (Debian's: /usr/bin/python3) and
zinf importable (pip install . or PYTHONPATH)."""
import argparse
import json
import os
import resource
import shutil
import sys
import time

import torch

import zinf


def ram_bytes():
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up = torch.nn.Linear(width, 4 * width)
        self.down = torch.nn.Linear(4 * width, width)

    def forward(self, h):
        return h + self.down(torch.nn.functional.gelu(self.up(h)))


class Model(torch.nn.Module):
    def __init__(self, vocab, width, blocks):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvme", default=os.environ.get("ZINF_BENCH_DIR", "/var/tmp"))
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--state-format", default="fp32", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--sub-group", type=float, default=5e7)
    # Adam moves every weight by about lr a step: at width 4096 and 24
    # residual blocks 1e-4 already makes the loss explode.
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    directory = os.path.join(args.nvme, f"zinf-capacity.{os.getpid()}")
    os.makedirs(directory)
    width = args.width
    largest = 4 * width * width
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.0}},
        "steps_per_print": 1,
        "wall_clock_breakdown": True,
        "zero_optimization": {
            "stage": 3,
            "sub_group_size": args.sub_group,
            "stage3_max_live_parameters": 3 * largest,
            "stage3_prefetch_bucket_size": largest,
            "stage3_max_reuse_distance": 0,
            "offload_param": {"device": "nvme", "nvme_path": directory, "buffer_count": 4,
                              "buffer_size": largest, "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": directory, "state_format": args.state_format},
        },
    }
    report = {"ram_bytes": ram_bytes(), "config": config}
    try:
        start = time.perf_counter()
        with zinf.zero.Init(config_dict_or_path=config):
            model = Model(args.vocab, width, args.blocks)
        params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        report["params"] = params
        report["bytes_as_zinf_keeps_them"] = 18 * params   # bf16 param, fp32 grad, fp32 master + 2 moments
        report["bytes_as_deepspeed_counts"] = 16 * params  # 2 + 2 + 12
        report["build_s"] = time.perf_counter() - start
        print(f"model: {params / 1e9:.2f}B params; params + grads + Adam states {18 * params / 1e9:.1f} GB as zinf "
              f"keeps them ({16 * params / 1e9:.1f} GB as DeepSpeed counts them) = "
              f"{18 * params / ram_bytes():.2f}x this machine's RAM ({ram_bytes() / 2**30:.1f} GiB); built under "
              f"zinf.zero.Init in {report['build_s']:.0f} s, peak RSS so far {status('VmHWM:') / 2**30:.2f} GiB",
              flush=True)
        start = time.perf_counter()
        engine, _, _, _ = zinf.initialize(model=model, model_parameters=model.parameters(), config=config)
        report["initialize_s"] = time.perf_counter() - start
        print(f"zinf.initialize: {report['initialize_s']:.0f} s, peak RSS so far {status('VmHWM:') / 2**30:.2f} GiB",
              flush=True)
        # One batch, every step: the loss falls as the model learns it.
        tokens = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=torch.Generator().manual_seed(0))
        report["steps"] = []
        for step in range(args.steps):
            start = time.perf_counter()
            logits = engine(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
            after_forward = status("VmHWM:")
            engine.backward(loss)
            after_backward = status("VmHWM:")
            engine.step()
            seconds = time.perf_counter() - start
            report["steps"].append({"loss": float(loss.detach()), "seconds": seconds, "peak_rss_after_forward":
                                    after_forward, "peak_rss_after_backward": after_backward,
                                    "peak_rss_after_step": status("VmHWM:")})
            print(f"step {step + 1}: loss {float(loss.detach()):.4f}, {seconds:.1f} s, peak RSS after forward "
                  f"{after_forward / 2**30:.2f} GiB, backward {after_backward / 2**30:.2f} GiB, step "
                  f"{status('VmHWM:') / 2**30:.2f} GiB", flush=True)
        report["timings"] = engine.timings()
        engine.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    report["peak_rss_bytes"] = status("VmHWM:")
    report["maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB of {ram_bytes() / 2**30:.1f} GiB RAM "
          f"({report['peak_rss_bytes'] / ram_bytes():.2f}x); the model's states were "
          f"{report['bytes_as_zinf_keeps_them'] / report['peak_rss_bytes']:.1f}x the peak RSS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())

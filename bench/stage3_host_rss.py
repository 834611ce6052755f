#!/usr/bin/env python3
"""Peak RSS of a stage-3 zinf.initialize run on the CPU without offload: what
host memory a CPU trainer pays for the engine's partition, gathers and
optimizer states. Prints one JSON line; run it a few times and take the median.

    python bench/stage3_host_rss.py [--width 2048] [--layers 6] [--steps 2]
"""
import argparse
import json
import resource

import torch

import zinf


class Stack(torch.nn.Module):
    def __init__(self, width, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Stack(args.width, args.layers)
    params = sum(p.numel() for p in model.parameters())
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "steps_per_print": 0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    for _ in range(args.steps):
        x = torch.randn(2, args.width, dtype=torch.bfloat16)
        engine.backward(engine(x).float().square().mean())
        engine.step()
    engine.close()
    print(json.dumps({"params": params, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Thousands of tiny optimizer sub-groups on NVMe: kept in host memory (the
default, DeepSpeed's rule) against swapped (min_swap_bytes 0), in one script.

    /usr/bin/python3 bench/small_sub_groups.py --nvme /var/tmp [--width 2048 --sub-group 100 --steps 3]

The shape of DeepSpeed's NVMe checkpoint unit test: two Linear(width, width)
layers at stage 3 with offload_param and offload_optimizer "nvme" and
sub_group_size 100 (83928 sub-groups for width 2048). Each setting builds
the engine, runs --steps steps and saves a checkpoint; the script prints
the seconds of each phase (a step's: the median after the first) and the
ratio of swapped over resident. Run it with torch's python (Debian's:
/usr/bin/python3) and zinf importable.
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

import zinf


def run(args, swap_all):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.Linear(args.width, args.width))
    scratch = tempfile.mkdtemp(prefix="zinf-small-sub-groups.", dir=args.nvme)
    offload_optimizer = {"device": "nvme", "nvme_path": scratch}
    if swap_all:
        offload_optimizer["min_swap_bytes"] = 0
    config = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 0,
              "optimizer": {"type": "Adam", "params": {"lr": 1.5e-4}},
              "zero_optimization": {"stage": 3, "sub_group_size": args.sub_group,
                                    "stage3_param_persistence_threshold": 0,
                                    "offload_param": {"device": "nvme", "nvme_path": scratch},
                                    "offload_optimizer": offload_optimizer}}
    try:
        start = time.perf_counter()
        engine, _, _, _ = zinf.initialize(model=model, config=config)
        times = {"initialize_s": time.perf_counter() - start}
        steps = []
        for step in range(args.steps):
            x = torch.randn(1, args.width)
            start = time.perf_counter()
            engine.backward(engine(x).square().mean())
            engine.step()
            steps.append(time.perf_counter() - start)
        times["step_s"] = statistics.median(steps[1:] if len(steps) > 1 else steps)
        start = time.perf_counter()
        engine.save_checkpoint(os.path.join(scratch, "checkpoint"))
        times["save_s"] = time.perf_counter() - start
        engine.close()
        return times
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvme", default="/var/tmp", help="directory on the disk to measure")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--sub-group", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    resident = run(args, swap_all=False)
    swapped = run(args, swap_all=True)
    result = {"params": 2 * (args.width * args.width + args.width), "sub_group_size": args.sub_group,
              "resident": resident, "swapped": swapped,
              "swapped_over_resident": {key: swapped[key] / resident[key] for key in resident}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

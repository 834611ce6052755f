#!/usr/bin/env python3
"""zinf.initialize's training step against plain PyTorch, in one script.

    /usr/bin/python3 bench/initialize_step.py --nvme /var/tmp [--width 1024 --blocks 8 --steps 6 --repeat 3]

The model is a stack of MLP blocks (width --width, 4x hidden, GELU); one
process trains it on a tiny batch (--tokens, so the step is not all matmul:
the regime ZeRO-Offload lives in, where the GPU's compute is quick and the
host's work is the step). The reference is the same model with
torch.optim.AdamW in the same interpreter, with as many threads (--threads,
torch's and zinf's optimizer's). Each setting runs
--repeat times, --steps steps each; a run's time is the median of its steps
after the first, the setting's the median over runs; the ratio is that over
plain PyTorch's. Engine timings (the optimizer step, parameter fetches and
bytes written to NVMe per step) come from engine.timings() of the last run.
Run it with torch's python (Debian's: /usr/bin/python3) and zinf importable.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

import zinf


def model(width, blocks):
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)]
    return torch.nn.Sequential(*layers)


def plain_run(args, x, y):
    m = model(args.width, args.blocks)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-4)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        torch.nn.functional.mse_loss(m(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times, {}


def zinf_run(args, x, y, stage, optimizer_device, param_device, gradients=None, *, nvme):
    zero = {"stage": stage}
    if optimizer_device != "none":
        zero["offload_optimizer"] = {"device": optimizer_device, "nvme_path": nvme}
        if gradients:
            zero["offload_optimizer"]["gradients"] = gradients
    if param_device != "none":
        zero["offload_param"] = {"device": param_device, "nvme_path": nvme}
    config = {"train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
              "zero_optimization": zero, "steps_per_print": 0, "zinf": {"optimizer_threads": args.threads}}
    engine, _, _, _ = zinf.initialize(model=model(args.width, args.blocks), config=config)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        times.append(time.perf_counter() - start)
    timings = engine.timings()
    engine.close()
    return times, timings


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nvme", default=os.environ.get("ZINF_BENCH_DIR", "/var/tmp"))
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch's threads and zinf's optimizer threads (default: every CPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(1, args.tokens, args.width, generator=torch.Generator().manual_seed(1))
    y = torch.randn(1, args.tokens, args.width, generator=torch.Generator().manual_seed(2))
    params = sum(p.numel() for p in model(args.width, args.blocks).parameters())
    print(f"{params / 1e6:.1f}M params, {args.tokens} tokens per step, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median step over {args.repeat} runs of {args.steps} steps")
    settings = [("plain PyTorch (AdamW)", None), ("stage 0", (0, "none", "none")), ("stage 2, optimizer cpu",
                (2, "cpu", "none")), ("stage 3, params and optimizer cpu", (3, "cpu", "cpu")),
                ("stage 3, params and optimizer nvme", (3, "nvme", "nvme")),
                ("stage 3 nvme, gradients in host memory", (3, "nvme", "nvme", "cpu"))]
    rows, baseline = [], None
    for label, setting in settings:
        runs, timings = [], {}
        for _ in range(args.repeat):
            scratch = tempfile.mkdtemp(prefix="zinf-bench-step.", dir=args.nvme)
            try:
                if setting is None:
                    times, timings = plain_run(args, x, y)
                else:
                    times, timings = zinf_run(args, x, y, *setting, nvme=scratch)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            runs.append(statistics.median(times[1:]))
        step = statistics.median(runs)
        baseline = baseline or step
        row = {"setting": label, "step_s": step, "runs_s": runs, "vs_plain": step / baseline}
        if timings:
            row["optimizer_step_s"] = timings["optimizer_step_s"]
            row["nvme_written_gb_per_step"] = timings["nvme_written_bytes"] / args.steps / 1e9
        rows.append(row)
        extra = ""
        if timings:
            extra = f"  (last optimizer step {timings['optimizer_step_s']:.3f} s"
            if timings["nvme_written_bytes"]:
                extra += f", NVMe written {row['nvme_written_gb_per_step']:.2f} GB/step"
            extra += ")"
        print(f"{label:38s} {step:7.3f} s/step  x{row['vs_plain']:.2f}  runs "
              f"{' '.join('%.3f' % r for r in runs)}{extra}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"params": params, "tokens": args.tokens, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""zinf's CPU AdamW against torch.optim.AdamW on the same sizes and thread
count, in one script.

    python3 bench/compare_torch_adam.py --sizes 1M 10M 100M --threads 2

zinf's numbers come from `zinf-bench adam --json` (its own memory-bound limit
included); torch's from timing optimizer.step() on fp32 params with fp32
grads, after warm-up steps, median of --repeats. Uses whichever python has
torch (Debian's python3-torch works: /usr/bin/python3). Without torch it
says so and reports zinf alone."""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_count(text):
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def torch_rate(torch, elements, threads, repeats, foreach):
    torch.set_num_threads(threads)
    param = torch.nn.Parameter(torch.full((elements,), 0.5))
    param.grad = torch.full((elements,), -0.01)
    optimizer = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, foreach=foreach)
    for _ in range(2):
        optimizer.step()
    samples = []
    for _ in range(repeats):
        steps = max(1, int(2e8 // elements))
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        samples.append(elements * steps / (time.perf_counter() - start))
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--binary", default=str(ROOT / "build" / "tools" / "zinf-bench"))
    args = parser.parse_args()

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([args.binary, "adam", "--size", *args.sizes, "--threads", str(args.threads),
                        "--repeat", str(args.repeats), "--quick", "--json", out.name],
                       check=True, stdout=subprocess.DEVNULL)
        records = json.load(open(out.name))["records"]
    best_tier = records[0]["tier"]  # zinf-bench measures the best tier first
    zinf = {r["elements_per_tensor"]: r for r in records
            if r["optimizer"] == "adamw" and r["tensors"] == 1 and r["grad"] == "fp32"
            and r["param"] == "fp32" and r["copy"] == "none" and r["tier"] == best_tier}

    try:
        import torch
    except ImportError:
        torch = None
        print(f"torch is not installed for {sys.executable}; reporting zinf alone (Debian's torch is under "
              "/usr/bin/python3)", file=sys.stderr)

    print(f"AdamW fp32, {args.threads} threads, median of {args.repeats}; G params/s; zinf tier {best_tier}")
    print("| elements | zinf | zinf limit | torch (foreach) | torch (for loop) | zinf / torch |")
    print("|---|---|---|---|---|---|")
    for text in args.sizes:
        n = parse_count(text)
        r = zinf.get(n)
        if r is None:
            continue
        row = [f"{n:,}", f"{r['params_per_s'] / 1e9:.3f}", f"{r['limit_params_per_s'] / 1e9:.3f}"]
        if torch is not None:
            t_foreach = torch_rate(torch, n, args.threads, args.repeats, True)
            t_loop = torch_rate(torch, n, args.threads, args.repeats, False)
            best = max(t_foreach, t_loop)
            row += [f"{t_foreach / 1e9:.3f}", f"{t_loop / 1e9:.3f}", f"{r['params_per_s'] / best:.1f}"]
        else:
            row += ["-", "-", "-"]
        print("| " + " | ".join(row) + " |", flush=True)
    if torch is not None:
        print(f"\ntorch {torch.__version__}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A PyTorch training loop on the CPU with zinf: zinf.CPUAdam as the
optimizer and zinf.torch.offload keeping the parameters of a small
transformer on NVMe between uses. It trains the same model twice on the same
synthetic data, once this way and once with torch.optim.AdamW and no
offload, and prints both losses: they agree within 1e-5 (relative).

    venv/bin/python examples/torch_offload_train.py [--steps 50] [--nvme /var/tmp]

Run it with the interpreter zinf is installed for (a venv over Debian's
/usr/bin/python3, see docs/python.md): the python3 on PATH may be another
one, without torch.
"""
import argparse
import sys
import tempfile

try:
    import torch

    import zinf
    import zinf.torch
except ImportError as missing:
    sys.exit(f"{sys.executable} cannot import {missing.name}: run this with the Python that has torch and "
             "zinf installed (docs/python.md), e.g. venv/bin/python")


def make_model(vocab, width, layers):
    torch.manual_seed(0)
    blocks = [torch.nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                               batch_first=True) for _ in range(layers)]
    return torch.nn.Sequential(torch.nn.Embedding(vocab, width), *blocks, torch.nn.LayerNorm(width),
                               torch.nn.Linear(width, vocab))


def batch(step, vocab, context, size):
    generator = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, vocab, (size, 1), generator=generator)
    stride = torch.randint(1, 4, (size, 1), generator=generator)
    tokens = (start + stride * torch.arange(context + 1)) % vocab
    return tokens[:, :-1], tokens[:, 1:]


def train(steps, use_zinf, nvme, vocab=64, width=32, layers=2, context=16, size=8):
    model = make_model(vocab, width, layers)
    kwargs = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    handle = None
    if use_zinf:
        config = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": nvme}},
                  "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1}}
        handle = zinf.torch.offload(model, config)
        optimizer = zinf.CPUAdam(model.parameters(), adamw_mode=True, **kwargs)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), **kwargs)
    losses = []
    for step in range(steps):
        inputs, targets = batch(step, vocab, context, size)
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))
        loss.backward()
        if handle is not None:
            with handle.materialized():
                optimizer.step()
                optimizer.zero_grad()
        else:
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    if handle is not None:
        handle.close()
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--nvme", default="/var/tmp", help="directory for the offloaded parameters")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="zinf-example.", dir=args.nvme) as nvme:
        with_zinf = train(args.steps, True, nvme)
    plain = train(args.steps, False, None)
    for step, (a, b) in enumerate(zip(with_zinf, plain), 1):
        print(f"step {step} loss zinf {a:.6f} torch {b:.6f}")
    relative = abs(with_zinf[-1] - plain[-1]) / abs(plain[-1])
    print(f"final loss: zinf {with_zinf[-1]:.7f}, torch.optim.AdamW {plain[-1]:.7f}, relative difference {relative:.2e}")
    if relative > 1e-5:
        print("FAIL: the losses differ by more than 1e-5", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The models and data of test_initialize.py and test_torch_offload.py: a
small MLP with a layer stack (so stage 3 has several units), deterministic
batches per (step, micro-step, rank), and a model whose parent uses a
child's parameter."""
import torch


class Net(torch.nn.Module):
    def __init__(self, width=24, layers=3, layer=torch.nn.Linear):
        super().__init__()
        self.embed = torch.nn.Linear(8, width)
        self.layers = torch.nn.ModuleList(layer(width, width) for _ in range(layers))
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return self.head(h)


def make_model():
    torch.manual_seed(1234)
    return Net()


def batch(step, micro, rank, size):
    generator = torch.Generator().manual_seed(100000 * step + 1000 * micro + rank)
    x = torch.randn(size, 8, generator=generator)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return x, y


class ReadsItsChildsWeight(torch.nn.Module):
    """A parent that uses a child's parameter in its own forward (a tied
    output projection written by hand)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(11, 6)
        self.mix = torch.nn.Linear(6, 6)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids)))
        return h @ self.embed.weight.t()


def param_groups(model, spec, only=None):
    """torch param groups from a JSON-able spec: each entry of `spec` holds
    the names' "prefix" or "suffix" it takes and its own settings (lr,
    betas, eps, weight_decay); params no entry takes form the first group,
    with the optimizer's settings. `only`: the params to group (the
    trainable ones)."""
    rest, groups = [], [dict(entry, params=[]) for entry in spec]
    for name, p in model.named_parameters():
        if only is not None and not any(p is q for q in only):
            continue
        for group in groups:
            if name.startswith(group.get("prefix", "\0")) or name.endswith(group.get("suffix", "\0")):
                group["params"].append(p)
                break
        else:
            rest.append(p)
    out = [{"params": rest}]
    for group in groups:
        settings = {k: (tuple(v) if k == "betas" else v) for k, v in group.items()
                    if k in ("lr", "betas", "eps", "weight_decay")}
        out.append(dict(settings, params=group["params"]))
    return out


def group_lambdas(count):
    """A LambdaLR schedule of its own for each of `count` param groups."""
    shapes = [lambda step: 1.0 / (1 + step), lambda step: 0.7 ** step, lambda step: 1.0 + 0.5 * step]
    return [shapes[k % len(shapes)] for k in range(count)]


class LoraLinear(torch.nn.Module):
    """A frozen base linear with a trainable low-rank update beside it, as
    LoRA adds one: the base weight is read in backward (for the input's
    gradient) after the adapter's gradients are in."""

    def __init__(self, width, out, rank=2):
        super().__init__()
        self.base = torch.nn.Linear(width, out)
        self.base.requires_grad_(False)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, width) * 0.1)
        self.lora_b = torch.nn.Parameter(torch.randn(out, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def make_lora_model():
    """Net with every layer a LoraLinear; the embedding and head are trained
    whole."""
    torch.manual_seed(99)
    return Net(layer=LoraLinear)

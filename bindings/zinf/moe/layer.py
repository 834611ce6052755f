"""``deepspeed.moe.layer``: MoE, which zinf does not run."""
import torch


class MoE(torch.nn.Module):
    """DeepSpeed's mixture-of-experts layer. zinf has no expert parallelism
    (experts sharded over ranks, all-to-all token routing): building one
    raises, naming what to do instead."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        raise NotImplementedError("zinf has no mixture-of-experts layer (deepspeed.moe.layer.MoE): zinf trains "
                                  "dense models only; keep MoE models on DeepSpeed, or use a dense layer")

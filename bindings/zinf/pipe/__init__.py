"""``deepspeed.pipe``: the names a pipeline-parallel script imports.

zinf has no pipeline parallelism (layers split into stages over ranks,
micro-batches scheduled between them). The layer specs are kept, since they
only describe how to build a module, and scripts (and DeepSpeed's own test
models) import them at the top of files whose other models are dense.
Building a ``PipelineModule`` raises, saying what to do instead.
"""
import torch

__all__ = ["LayerSpec", "TiedLayerSpec", "PipelineModule"]


class LayerSpec:
    """A module type and its constructor arguments, built on ``build()``."""

    def __init__(self, typename, *module_args, **module_kwargs):
        if not (isinstance(typename, type) and issubclass(typename, torch.nn.Module)):
            raise RuntimeError(f"LayerSpec takes a torch.nn.Module subclass, not {typename!r}")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def __repr__(self):
        arguments = [repr(a) for a in self.module_args]
        arguments += [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{self.typename.__name__}({', '.join(arguments)})"

    def build(self, log=False):
        return self.typename(*self.module_args, **self.module_kwargs)


class TiedLayerSpec(LayerSpec):
    """A ``LayerSpec`` whose weights (``tied_weight_attr``) are shared with
    every other spec of the same ``key``, as DeepSpeed's is."""

    def __init__(self, key, typename, *module_args, forward_fn=None, tied_weight_attr=("weight",),
                 **module_kwargs):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key = key
        self.forward_fn = forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


class PipelineModule(torch.nn.Module):
    """DeepSpeed's pipeline-parallel model. Building one raises."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        raise NotImplementedError("zinf has no pipeline parallelism (deepspeed.pipe.PipelineModule): zinf shards "
                                  "a model over data-parallel ranks with ZeRO; build the layers as one "
                                  "torch.nn.Module (LayerSpec.build() makes each) and pass it to "
                                  "zinf.initialize, or keep pipeline training on DeepSpeed")

"""The fp32 weights of a zinf.initialize checkpoint, with no engine and no
process group: DeepSpeed's ``zero_to_fp32`` for zinf's checkpoints.

    from zinf.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state_dict = get_fp32_state_dict_from_zero_checkpoint("ckpt")     # ckpt/latest names the tag
    model.load_state_dict(state_dict)

    python -m zinf.utils.zero_to_fp32 ckpt pytorch_model.bin            # or ckpt/zero_to_fp32.py

Each rank's shards (the fp32 masters in its sub-group files; a frozen
parameter's working copy, widened) are put back together in one process, on
the CPU, at any world size. The function names and arguments are
DeepSpeed's; ``max_shard_size`` is accepted and the result written as one
file.
"""
import argparse
import collections
import itertools
import os

import torch

from .. import _zinf

__all__ = ["get_fp32_state_dict_from_zero_checkpoint", "convert_zero_checkpoint_to_fp32_state_dict",
           "load_state_dict_from_zero_checkpoint"]


def _checkpoint_path(checkpoint_dir, tag):
    """checkpoint_dir/<tag>, the tag read from checkpoint_dir/latest when
    None; checkpoint_dir itself when it is a tag's directory already."""
    if tag is None:
        if os.path.exists(os.path.join(checkpoint_dir, "zinf_checkpoint.json")):
            return checkpoint_dir
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"{checkpoint_dir}: no 'latest' file naming a tag, and no zinf_checkpoint.json: "
                             "pass tag= (a global_step<N> directory)")
        with open(latest) as file:
            tag = file.read().strip()
    path = os.path.join(checkpoint_dir, str(tag))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    return path


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=None, exclude_frozen_parameters=False):
    """The model's state dict in fp32, as DeepSpeed's: every parameter
    whole (in the order the engine registered them), then a tied weight's
    other names (the same tensor) and the persistent buffers (16-bit
    floating ones widened to fp32), so model.load_state_dict(strict=True)
    takes it. `checkpoint_dir` holds `latest` and the tag directories
    save_checkpoint wrote (or is one of them)."""
    out = collections.OrderedDict()

    def sink(name, shape, trainable, view):
        if trainable or not exclude_frozen_parameters:
            out[name] = torch.frombuffer(view, dtype=torch.float32).clone().view(shape)

    path = _checkpoint_path(checkpoint_dir, tag)
    _zinf.consolidate_checkpoint(path, sink)
    engine_state = os.path.join(path, "zinf_engine_state.pt")
    if os.path.exists(engine_state):
        # The trainer's own file (client_state may hold any object).
        state = torch.load(engine_state, weights_only=False)
        for alias, name in state.get("aliases", {}).items():
            if name in out:
                out[alias] = out[name]
        for key, buffer in state.get("buffers", {}).items():  # and modules' extra state
            widen = torch.is_tensor(buffer) and buffer.is_floating_point() and buffer.element_size() < 4
            out[key] = buffer.float() if widen else buffer
    return out


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_dir_or_file, tag=None,
                                               exclude_frozen_parameters=False, safe_serialization=False,
                                               max_shard_size="5GB"):
    """Writes the fp32 state dict: to output_dir_or_file when it names a
    file (.safetensors: safetensors, else torch.save), or into that
    directory as pytorch_model.bin (model.safetensors with
    safe_serialization). Returns the path written."""
    state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag, exclude_frozen_parameters)
    target = output_dir_or_file
    if os.path.isdir(target) or not os.path.splitext(target)[1]:
        os.makedirs(target, exist_ok=True)
        target = os.path.join(target, "model.safetensors" if safe_serialization else "pytorch_model.bin")
    if target.endswith(".safetensors"):
        from safetensors.torch import save_file
        # safetensors refuses shared tensors: a tied weight under its first
        # name only, as Hugging Face's save_pretrained writes it.
        seen = set()
        unique = {}
        for key, value in state_dict.items():
            if torch.is_tensor(value) and id(value) not in seen:  # extra state has no safetensors form
                seen.add(id(value))
                unique[key] = value.contiguous()
        save_file(unique, target, metadata={"format": "pt"})
    else:
        torch.save(state_dict, target)
    return target


def load_state_dict_from_zero_checkpoint(model, checkpoint_dir, tag=None):
    """Moves `model` to the CPU and loads the checkpoint's fp32 weights and
    its buffers into it (params of the model's dtype; what the checkpoint
    does not hold is left); returns the model. The model is no longer a
    zinf engine's."""
    state_dict = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            if name in state_dict:
                tensor.data = state_dict[name].to(tensor.dtype).view(state_dict[name].shape)
        extra = {key: value for key, value in state_dict.items()
                 if key.endswith(torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX)}
        if extra:
            model.load_state_dict(extra, strict=False)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description="The fp32 weights of a zinf checkpoint as one state dict file.")
    parser.add_argument("checkpoint_dir", help="the directory holding 'latest' and the tag directories")
    parser.add_argument("output_dir_or_file", help="a .bin/.pt/.safetensors file, or a directory")
    parser.add_argument("-t", "--tag", default=None, help="the tag (global_step<N>); default: the one in 'latest'")
    parser.add_argument("--exclude_frozen_parameters", action="store_true")
    parser.add_argument("--safe_serialization", action="store_true")
    parser.add_argument("--max_shard_size", default="5GB", help="accepted for DeepSpeed's command line; one file")
    args = parser.parse_args(argv)
    written = convert_zero_checkpoint_to_fp32_state_dict(args.checkpoint_dir, args.output_dir_or_file, args.tag,
                                                         args.exclude_frozen_parameters, args.safe_serialization)
    print(f"zinf: wrote the fp32 weights of {args.checkpoint_dir} to {written}")


if __name__ == "__main__":
    main()

"""``deepspeed.utils.torch``: torch version checks scripts gate features on."""
import re

import torch


def _release(text):
    """The numeric release of a version string: "2.1.0+cu121" -> (2, 1, 0),
    "2.2.0a0" -> (2, 2, 0)."""
    parts = []
    for piece in str(text).split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
        if match.end() != len(piece):  # "0a0", "0rc1": a pre-release ends the release numbers
            break
    return tuple(parts)


def _compare(a, b):
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


def required_torch_version(min_version=None, max_version=None):
    """Whether the running torch is at least `min_version` and at most
    `max_version` (numbers or strings such as 1.8 or "2.1")."""
    if min_version is None and max_version is None:
        raise ValueError("required_torch_version: give min_version or max_version")
    running = _release(torch.__version__)
    if min_version is not None and _compare(running, _release(min_version)) < 0:
        return False
    if max_version is not None and _compare(running, _release(max_version)) > 0:
        return False
    return True


def register_grad_hook(param, hook):
    """Calls hook(param) once param.grad has been accumulated in a backward."""
    if hasattr(param, "register_post_accumulate_grad_hook"):  # torch 2.1 and later
        return param.register_post_accumulate_grad_hook(hook)
    accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
    return accumulator.register_hook(lambda *unused: hook(param))


__all__ = ["required_torch_version", "register_grad_hook"]

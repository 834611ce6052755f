"""``deepspeed.utils.z3_leaf_module``: modules stage 3 gathers whole.

zinf gathers parameters a unit at a time, and picks units by walking into
layer stacks (a decoder's layers, and inside a mixture-of-experts block its
list of experts, each expert a unit). A module flagged as a leaf is not
walked into: it is one unit, all its parameters gathered when it starts.
For an MoE block this is what DeepSpeed's leaf flag is for: the router picks
different experts each batch, and a trace of expert units would change with
every step. Flags are read when ``zinf.initialize`` builds the engine.
"""
import torch

__all__ = ["z3_leaf_module", "z3_leaf_parameter", "get_z3_leaf_modules", "set_z3_leaf_module",
           "set_z3_leaf_modules", "unset_z3_leaf_modules"]


def z3_leaf_module(model):
    """Whether `model` is flagged as a leaf."""
    return bool(getattr(model, "_z3_leaf", False))


def z3_leaf_parameter(param):
    """Whether `param` belongs to a leaf module in an engine (set by
    zinf.initialize at stage 3)."""
    return hasattr(param, "ds_z3_leaf_module")


def get_z3_leaf_modules(model):
    """The modules of `model` flagged as leaves."""
    return [module for module in model.modules() if z3_leaf_module(module)]


def set_z3_leaf_module(model, flag):
    model._z3_leaf = flag


def _flag_classes(model, leaf_module_classes, flag):
    classes = list(leaf_module_classes)
    if not all(isinstance(c, (type, str)) for c in classes):
        raise ValueError(f"leaf_module_classes must be module classes or class names, got {leaf_module_classes!r}")
    flagged = []
    for module in model.modules():
        # The exact class (not subclasses) or its name, as DeepSpeed matches.
        if any(type(module) is c if isinstance(c, type) else type(module).__name__ == c for c in classes):
            module._z3_leaf = flag
            flagged.append(module)
    if not flagged:
        raise ValueError(f"no module of {classes!r} in the model ({type(model).__name__})")
    return flagged


def set_z3_leaf_modules(model: torch.nn.Module, leaf_module_classes):
    """Flags every module of `model` whose class is one of
    `leaf_module_classes` (classes or class names) as a leaf; returns them.
    A ValueError when there is none."""
    return _flag_classes(model, leaf_module_classes, True)


def unset_z3_leaf_modules(model: torch.nn.Module, leaf_module_classes):
    """Clears the flag set_z3_leaf_modules set; returns the modules."""
    return _flag_classes(model, leaf_module_classes, False)

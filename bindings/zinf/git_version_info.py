"""``deepspeed.git_version_info``: the installed version, which ops load
here, and the torch build zinf runs under (what ``ds_report`` and
DeepSpeed's test helpers read)."""
import torch

from ._zinf import __version__ as version
from .ops.op_builder import compatible_ops as _compatible_ops

git_hash = "[none]"  # zinf is installed from a source tree, not a git-stamped build
git_branch = "[none]"
accelerator_name = "cuda" if torch.cuda.is_available() else "cpu"
# zinf's ops are prebuilt in its extension: what loads is what is installed.
compatible_ops = _compatible_ops()
installed_ops = dict(compatible_ops)


def _nccl_version():
    try:
        return ".".join(str(part) for part in torch.cuda.nccl.version())
    except Exception:  # torch built without NCCL (CPU wheels): DeepSpeed reports "0.0" too
        return "0.0"


torch_info = {"version": ".".join(torch.__version__.split("+")[0].split(".")[:2]),
              "cuda_version": ".".join((torch.version.cuda or "0.0").split(".")[:2]),
              "hip_version": ".".join((getattr(torch.version, "hip", None) or "0.0").split(".")[:2]),
              "nccl_version": ".".join(_nccl_version().split(".")[:2])}

__all__ = ["version", "git_hash", "git_branch", "accelerator_name", "compatible_ops", "installed_ops", "torch_info"]

"""examples/ds_train_causal_lm.py, a DeepSpeed script running on zinf by its
import: a Hugging Face causal LM (built from a config) trained on two
torchrun-style ranks with ZeRO stage 3 and params + optimizer states on
NVMe has the losses of the same script with nothing offloaded."""
import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="Hugging Face transformers is not installed here "
                    "(scripts/test.sh installs 4.40 into its Debian-torch venv only)")

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "ds_train_causal_lm.py")


def run(world, args, directory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(directory, "losses-%s.json" % "-".join(args).replace("/", "_"))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, EXAMPLE, "--steps", "5", "--losses", out] + args,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * world, "\n".join(err for _, err in results)
    assert "step 4 loss" in results[0][0]
    with open(out) as file:
        return json.load(file)


@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_nvme_offload_trains_with_the_losses_of_no_offload(scratch, model):
    offloaded = run(2, ["--model", model, "--offload", "nvme", "--nvme", os.path.join(scratch, "nvme")], scratch)
    plain = run(2, ["--model", model, "--offload", "none"], scratch)
    assert offloaded["world"] == 2 and offloaded["offload"] == "nvme"
    assert offloaded["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert offloaded["losses"][-1] != offloaded["losses"][0]


def test_torchrun_launches_it_with_the_losses_of_the_same_ranks_started_by_hand(scratch):
    """Real torchrun (--standalone: its c10d rendezvous, its agent's store)
    starting the script's two ranks: the losses of the ranks started with
    torchrun's variables by hand."""
    import torch
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 0) and sys.version_info >= (3, 11):
        pytest.skip("torch %s's torchrun fails under Python 3.11 before starting any rank "
                    "(its Std enum: 'NoneType' object has no attribute 'get')" % torch.__version__)
    out = os.path.join(scratch, "torchrun.json")
    args = ["--model", "gpt2", "--offload", "nvme", "--nvme", os.path.join(scratch, "nvme-torchrun")]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               EXAMPLE, "--steps", "5", "--losses", out] + args,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1"),
                              capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-4000:]
    with open(out) as file:
        by_torchrun = json.load(file)
    by_hand = run(2, ["--model", "gpt2", "--offload", "nvme", "--nvme", os.path.join(scratch, "nvme-hand")], scratch)
    assert by_torchrun["world"] == 2
    assert by_torchrun["losses"] == pytest.approx(by_hand["losses"], rel=1e-6)

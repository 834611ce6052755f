"""zinf.initialize with the model on a GPU: the model computes there, the
engine keeps its state in host memory and on NVMe (ZeRO-Offload's split);
after K steps the parameters equal plain PyTorch training on the GPU. Skips,
saying so, where torch sees no CUDA device (scripts/gpu-check.sh runs it on
one)."""
import os

import pytest
import torch

import zinf
from test_initialize import ADAMW, config_for, launch, reference
from initialize_model import batch, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device visible to torch: the GPU path runs on a GPU machine "
                                       "(scripts/gpu-check.sh)")


@pytest.mark.parametrize("stage,optimizer_device,param_device", [(0, "none", "none"), (2, "cpu", "none"),
                                                                 (3, "cpu", "cpu"), (3, "nvme", "nvme")])
def test_a_model_on_the_gpu_trains_as_plain_pytorch_on_the_gpu(scratch, stage, optimizer_device, param_device):
    config = config_for(stage, optimizer_device, param_device, nvme=os.path.join(scratch, "nvme"), train_batch_size=4)
    model, plain = make_model().cuda(), make_model().cuda()
    engine, _, _, _ = zinf.initialize(model=model, config=config)
    assert engine.device.type == "cuda"
    reference_optimizer = torch.optim.AdamW(plain.parameters(), **{k: (tuple(v) if k == "betas" else v)
                                                                   for k, v in ADAMW["params"].items()})
    for step in range(3):
        x, y = (t.cuda() for t in batch(step, 0, 0, 4))
        loss = torch.nn.functional.mse_loss(engine(x), y)
        assert loss.device.type == "cuda"
        engine.backward(loss)
        engine.step()
        want = torch.nn.functional.mse_loss(plain(x), y)
        want.backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
        assert float(loss) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    got = engine.consolidated_state_dict()
    for name, value in plain.named_parameters():
        assert torch.allclose(got[name], value.cpu(), atol=2e-5), name
    engine.close()


def test_two_ranks_sharing_a_gpu_under_an_nccl_default_group_reduce_over_gloo(scratch):
    # The script asks deepspeed.init_distributed for NCCL but both ranks
    # compute on GPU 0, which NCCL refuses: zinf's collectives on host
    # memory go over a Gloo group of its own beside it, with a warning.
    config = config_for(3, "cpu", "cpu", gradient_accumulation_steps=2)
    codes, errors, result = launch(2, {"config": config, "steps": 3, "device": "cuda", "backend": "nccl"}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    assert result["collectives"] == "gloo"
    assert "ranks share a GPU" in errors[0]
    state, losses, _ = reference(config, 3, 2)
    for name, value in state.items():
        assert torch.allclose(result["state"][name], value, atol=5e-5), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between ranks needs a GPU per rank: 2 GPUs")
@pytest.mark.parametrize("stage,optimizer_device,param_device", [(2, "cpu", "none"), (3, "nvme", "cpu")])
def test_two_ranks_each_on_its_own_gpu_reduce_over_nccl(scratch, stage, optimizer_device, param_device):
    config = config_for(stage, optimizer_device, param_device, nvme=os.path.join(scratch, "nvme"),
                        gradient_accumulation_steps=2, gradient_clipping=0.05)
    codes, errors, result = launch(2, {"config": config, "steps": 3, "device": "cuda", "backend": "nccl",
                                       "gpu_per_rank": True}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    assert result["collectives"] == "nccl"
    state, losses, _ = reference(config, 3, 2)
    for name, value in state.items():
        assert torch.allclose(result["state"][name], value, atol=5e-5), name


_NCCL_ONE_RANK = r"""
import os, threading, torch, torch.distributed as dist
from zinf.distributed import DeviceCollectives
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%d" % int(os.environ["PORT"]), rank=0, world_size=1)
torch.cuda.set_device(0)
collectives = DeviceCollectives(torch.device("cuda", 0))
results = {}
def calls():  # from a thread of its own, as the engine's worker calls
    send = torch.arange(6, dtype=torch.float32)
    recv = torch.zeros(6)
    collectives.all_gather(memoryview(send.numpy()).cast("B"), memoryview(recv.numpy()).cast("B"), 24)
    results["all_gather"] = recv.tolist()
    mine = torch.zeros(6)
    collectives.reduce_scatter(memoryview(send.numpy()).cast("B"), memoryview(mine.numpy()).cast("B"), 6)
    results["reduce_scatter"] = mine.tolist()
    data = torch.tensor([1.0, -2.0, 3.0])
    collectives.all_reduce(memoryview(data.numpy()).cast("B"), 3, "max")
    results["all_reduce"] = data.tolist()
    payload = torch.tensor([7, 8, 9], dtype=torch.uint8)
    collectives.broadcast(memoryview(payload.numpy()), 3, 0)
    results["broadcast"] = payload.tolist()
    collectives.barrier()
worker = threading.Thread(target=calls)
worker.start(); worker.join()
assert results == {"all_gather": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "reduce_scatter": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
                   "all_reduce": [1.0, -2.0, 3.0], "broadcast": [7, 8, 9]}, results
dist.destroy_process_group()
print("nccl collectives ok")
"""


def test_the_nccl_collectives_stage_host_buffers_through_the_gpu():
    # One rank, so it runs on a one-GPU machine: every call goes through
    # NCCL on device tensors, from a thread other than the one that made
    # the group, and the host buffers hold the results afterwards.
    import subprocess
    import sys
    from test_initialize import free_port
    env = dict(os.environ, PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-c", _NCCL_ONE_RANK], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nccl collectives ok" in done.stdout

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


def test_two_ranks_on_the_gpu_beside_an_nccl_default_group(scratch):
    # The script asks deepspeed.init_distributed for NCCL; zinf's collectives
    # on host memory go over a Gloo group of its own beside it.
    config = config_for(3, "cpu", "cpu", gradient_accumulation_steps=2)
    codes, errors, result = launch(2, {"config": config, "steps": 3, "device": "cuda", "backend": "nccl"}, scratch)
    assert codes == [0, 0], "\n".join(errors)
    state, losses, _ = reference(config, 3, 2)
    for name, value in state.items():
        assert torch.allclose(result["state"][name], value, atol=5e-5), name

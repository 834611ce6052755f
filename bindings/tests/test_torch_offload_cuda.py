"""zinf.torch.offload with the module on a GPU (device="cuda"): the same
outputs, gradients and training as the plain module. Skips, saying so,
where torch sees no CUDA device (scripts/gpu-check.sh runs it on one)."""
import pytest
import torch

import zinf
import zinf.torch

from test_torch_offload import config, small_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device visible to torch: the GPU path runs on a GPU machine "
                                       "(scripts/gpu-check.sh)")


@pytest.mark.parametrize("kind", ["nvme", "cpu"])
def test_outputs_and_gradients_on_the_gpu_equal_the_plain_modules(scratch, kind):
    plain, offloaded = small_model().cuda(), small_model().cuda()
    handle = zinf.torch.offload(offloaded, config(kind, scratch), device="cuda")
    x = torch.randn(5, 16, device="cuda")
    for _ in range(3):
        for m in (plain, offloaded):
            m.zero_grad(set_to_none=True)
        ya, yb = plain(x), offloaded(x)
        assert torch.equal(ya, yb)
        (ya ** 2).sum().backward()
        (yb ** 2).sum().backward()
        for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
            assert torch.equal(a.grad, b.grad), name
    # The host copies of non_blocking transfers are let go once done.
    torch.cuda.synchronize()
    handle._finish_copies()
    assert handle._copies_in_flight == []
    handle.close()


def test_stepping_in_backward_with_gpu_params_tracks_adamw(scratch):
    plain, offloaded = small_model().cuda(), small_model().cuda()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    handle = zinf.torch.offload(offloaded, config("nvme", scratch), device="cuda",
                                optimizer=lambda params: zinf.CPUAdam(params, **kwargs))
    reference = torch.optim.AdamW(plain.parameters(), **kwargs)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(6, 16, generator=generator).cuda()
        (plain(x) ** 2).mean().backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
        (offloaded(x) ** 2).mean().backward()
        handle.step_done()
    with handle.materialized(write_back=False):
        for (name, a), (_, b) in zip(plain.named_parameters(), offloaded.named_parameters()):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-4, atol=1e-5, msg=name)
    handle.close()

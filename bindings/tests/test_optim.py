"""zinf.CPUAdam / CPUAdagrad / CPULion against torch's optimizers.

Tolerances: fp32 params and grads, 10 steps — the kernels compute in fp32
with torch's order of operations, so the results agree to a few ulps:
rtol 1e-6, atol 1e-7. bf16 grads with fp32 params: the kernel widens the
same bf16 values torch sees after .float(), so the same bound holds. bf16
params with fp32 states: torch steps an fp32 copy, which is rounded to bf16
after each step to compare; the kernel rounds to nearest even too, so they
agree within one bf16 ulp (rtol 2**-7).
"""
import pytest
import torch

import zinf


def make_params(seed, shapes=((37, 11), (1000,), (3, 5, 7), (1,))):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in shapes]


def run(optimizer_class, kwargs, params, steps=10, grad_dtype=torch.float32, param_dtype=torch.float32, seed=1,
        widen_grads=False):
    """Steps with random gradients of grad_dtype; a grad_dtype other than the
    params' goes through step(grads=...) (torch refuses such a .grad), or is
    widened back to the params' dtype for a torch optimizer (widen_grads)."""
    params = [torch.nn.Parameter(p.clone().to(param_dtype)) for p in params]
    optimizer = optimizer_class(params, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = {p: torch.randn(p.shape, generator=generator).to(grad_dtype) for p in params}
        if grad_dtype == param_dtype or widen_grads:
            for p in params:
                p.grad = grads[p].to(param_dtype)
            optimizer.step()
        else:
            optimizer.step(grads=grads)
    return [p.detach() for p in params]


def assert_close(got, want, rtol, atol):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adamw_mode_matches_torch_adamw(weight_decay):
    params = make_params(0)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    got = run(zinf.CPUAdam, dict(kwargs, adamw_mode=True), params)
    want = run(torch.optim.AdamW, kwargs, params)
    assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_adam_l2_mode_matches_torch_adam():
    params = make_params(1)
    kwargs = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    got = run(zinf.CPUAdam, dict(kwargs, adamw_mode=False), params)
    want = run(torch.optim.Adam, kwargs, params)
    assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_fp32_params_with_bf16_grads_match_torch_on_the_same_grads():
    params = make_params(2)
    got = run(zinf.CPUAdam, dict(lr=1e-2), params, grad_dtype=torch.bfloat16)
    # torch sees the same bf16 gradients widened to fp32.
    want = run(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.0), params, grad_dtype=torch.bfloat16,
               widen_grads=True)
    assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_bf16_params_keep_fp32_states_and_track_torch_within_a_bf16_ulp():
    params = make_params(3)
    got = run(zinf.CPUAdam, dict(lr=1e-2), params, steps=1, param_dtype=torch.bfloat16,
              grad_dtype=torch.bfloat16)
    masters = [torch.nn.Parameter(p.clone().to(torch.bfloat16).float()) for p in params]
    reference = torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    for p in masters:
        p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16).float()
    reference.step()
    for g, w in zip(got, masters):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.detach().to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-6)


def test_adagrad_matches_torch():
    params = make_params(4)
    kwargs = dict(lr=1e-2, eps=1e-10, weight_decay=0.01)
    assert_close(run(zinf.CPUAdagrad, kwargs, params), run(torch.optim.Adagrad, kwargs, params),
                 rtol=1e-6, atol=1e-7)


def test_lion_matches_the_published_update():
    params = make_params(5)
    lr, beta1, beta2, wd = 1e-3, 0.9, 0.99, 0.1
    got = run(zinf.CPULion, dict(lr=lr, betas=(beta1, beta2), weight_decay=wd), params)
    want = [p.clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    generator = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, m in zip(want, momenta):
            g = torch.randn(p.shape, generator=generator)
            update = torch.sign(beta1 * m + (1 - beta1) * g)
            p.mul_(1 - lr * wd).add_(update, alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
    assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_one_call_per_group_and_params_without_grads_are_skipped():
    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    optimizer = zinf.CPUAdam(params, lr=0.1)
    params[0].grad = torch.ones(4)
    optimizer.step()
    assert not torch.equal(params[0].detach(), torch.ones(4))
    assert torch.equal(params[1].detach(), torch.ones(4))
    assert optimizer.state[params[0]]["step"] == 1 and params[1] not in optimizer.state
    assert optimizer.kernel_tier in ("avx512", "avx2", "scalar")


def test_fp16_param_groups_receive_the_updated_params_rounded():
    params = [torch.nn.Parameter(t) for t in make_params(6)]
    copies = [torch.empty(p.shape, dtype=torch.bfloat16) for p in params]
    optimizer = zinf.CPUAdam(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn(p.shape)
    optimizer.step(fp16_param_groups=[copies])
    for p, c in zip(params, copies):
        assert torch.equal(c, p.detach().to(torch.bfloat16))


def test_a_param_off_the_cpu_is_refused_naming_its_device():
    # The meta device stands in for a GPU here: any non-CPU param is refused.
    p = torch.nn.Parameter(torch.ones(4, device="meta"))
    p.grad = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="steps CPU tensors; param 0 of group 0 is on meta"):
        zinf.CPUAdam([p]).step()


def test_refusals_are_clear():
    with pytest.raises(ValueError, match="amsgrad"):
        zinf.CPUAdam([torch.nn.Parameter(torch.ones(2))], amsgrad=True)
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        zinf.CPUAdam([p]).step(grads={p: torch.ones(5)})
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    p.grad = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        zinf.CPUAdam([p]).step()
    with pytest.raises(ValueError, match="lr"):
        p = torch.nn.Parameter(torch.ones(4))
        p.grad = torch.ones(4)
        zinf.CPUAdam([p], lr=float("nan")).step()
    if torch.cuda.is_available():
        p = torch.nn.Parameter(torch.ones(4, device="cuda"))
        p.grad = torch.ones(4, device="cuda")
        with pytest.raises(AssertionError, match="CPU"):
            zinf.CPUAdam([p]).step()


@pytest.mark.parametrize("torch_kind,zinf_kind,options", [
    (torch.optim.AdamW, zinf.CPUAdam, dict(lr=0.01, weight_decay=0.01)),
    (torch.optim.Adagrad, zinf.CPUAdagrad, dict(lr=0.05)),
])
def test_a_torch_optimizers_state_dict_loads_and_training_goes_on_as_torchs(torch_kind, zinf_kind, options):
    """A trainer moving from torch's optimizer to zinf's (or back) keeps its
    checkpoint: torch's groups lack DeepSpeed's keys (bias_correction) and
    count steps in tensors, Adagrad names its sum "sum"."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(50))
    theirs = torch.nn.Parameter(ours.detach().clone())
    reference = torch_kind([theirs], **options)
    for _ in range(2):
        theirs.grad = torch.randn(50)
        reference.step()
    optimizer = zinf_kind([ours], **options)
    ours.data.copy_(theirs.data)
    optimizer.load_state_dict(reference.state_dict())
    assert optimizer.state[ours]["step"] == 2
    for _ in range(3):
        ours.grad = torch.randn(50)
        theirs.grad = ours.grad.clone()
        optimizer.step()
        reference.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-6)
    if torch_kind is torch.optim.AdamW:  # and back again (torch's Adagrad wants its "sum")
        back = torch_kind([torch.nn.Parameter(ours.detach().clone())], **options)
        back.load_state_dict(optimizer.state_dict())
        assert int(back.state[back.param_groups[0]["params"][0]]["step"]) == 5


def test_a_state_dict_it_cannot_continue_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.randn(4))
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(4)
    sgd.step()
    optimizer = zinf.CPUAdam([p], lr=0.5)
    with pytest.raises(ValueError, match=r"has \['momentum_buffer'\], not \['exp_avg', 'exp_avg_sq'\]"):
        optimizer.load_state_dict(sgd.state_dict())
    amsgrad = torch.optim.Adam([p], amsgrad=True)
    amsgrad.step()
    with pytest.raises(ValueError, match="param group 0 has amsgrad=True"):
        optimizer.load_state_dict(amsgrad.state_dict())
    assert optimizer.param_groups[0]["lr"] == 0.5 and not optimizer.state


def test_16bit_params_keep_fp32_states_through_a_state_dict():
    """torch's load_state_dict casts states to the param's dtype; with
    fp32_optimizer_states the moments must come back in fp32, unrounded."""
    p = torch.nn.Parameter(torch.randn(64).bfloat16())
    optimizer = zinf.CPUAdam([p], lr=0.01)
    for _ in range(2):
        p.grad = torch.randn(64).bfloat16()
        optimizer.step()
    saved = optimizer.state_dict()
    restored = zinf.CPUAdam([p], lr=0.01)
    restored.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert restored.state[p][key].dtype == torch.float32
        assert torch.equal(restored.state[p][key], optimizer.state[p][key])


def test_a_refused_step_changes_no_step_count():
    p, q = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    optimizer = zinf.CPUAdam([{"params": [p]}, {"params": [q]}])
    p.grad, q.grad = torch.randn(5), torch.randn(5)
    optimizer.step()
    before = p.detach().clone()
    p.grad = torch.randn(5)
    with pytest.raises(ValueError, match="has shape"):
        optimizer.step(grads={q: torch.randn(6)})  # the second group's gradient is wrong
    assert optimizer.state[p]["step"] == 1 and optimizer.state[q]["step"] == 1
    assert torch.equal(p.detach(), before)  # the first group was not stepped either

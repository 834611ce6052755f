"""DeepSpeed's op builders (``deepspeed.ops.op_builder``) over zinf's
prebuilt extension: ``AsyncIOBuilder().load().aio_handle(...)``,
``CPUAdamBuilder().load().create_adam(...)`` and the rest work as DeepSpeed's
do, with no compiler and no JIT build at run time. Builders of ops zinf does
not have (GPU kernels) say so: is_compatible() is False and load() raises
an error naming what to use instead."""
import torch

from .. import aio as _aio
from ..optim import adagrad_tuple, cpu_kernel, kernel_tuple


class OpBuilder:
    """What DeepSpeed's builders offer that callers use: NAME, name,
    absolute_name(), is_compatible(verbose), load(verbose), builder()."""
    NAME = ""
    _missing = None  # why the op is not available here, or None

    def __init__(self, name=None):
        self.name = self.NAME if name is None else name

    def absolute_name(self):
        return f"zinf.ops.{self.NAME}"

    def is_compatible(self, verbose=False):
        return self._missing is None

    def load(self, verbose=True):
        if self._missing is not None:
            raise RuntimeError(f"{type(self).__name__}: {self._missing}")
        return self._op()

    jit_load = load

    def builder(self):
        raise RuntimeError(f"{type(self).__name__}: zinf's ops are prebuilt in its extension; there is nothing to "
                           "build (pip install zinf builds them)")

    def _op(self):
        raise NotImplementedError


class AsyncIOBuilder(OpBuilder):
    """async_io: aio_handle, aio_read, aio_write, deepspeed_memcpy, on
    io_uring (or pread/pwrite where io_uring is refused)."""
    NAME = "async_io"

    def _op(self):
        return _aio


class _LoadedCpuOptimizer:
    """The module DeepSpeed's CPU optimizer builders load: optimizers
    created by integer id, then stepped over (params, grads, states) tensors
    in place. Tensors must be CPU tensors of one shape; fp32, bf16 or fp16
    params (fp32 params may have 16-bit gradients); non-contiguous ones are
    stepped through a copy and written back."""

    def __init__(self, kind):
        self._kind = kind
        self._optimizers = {}  # id -> (kernel, options given at creation)

    def _create(self, optimizer_id, options, should_log):
        kernel = cpu_kernel()
        self._optimizers[int(optimizer_id)] = (kernel, options)
        if should_log:
            print(f"zinf CPU {self._kind} optimizer {optimizer_id} created, {kernel.tier} kernels, {options}",
                  flush=True)
        return 0

    def _destroy(self, optimizer_id):
        self._optimizers.pop(int(optimizer_id), None)
        return 0

    def _step(self, optimizer_id, run, params, grads, *states):
        try:
            kernel, options = self._optimizers[int(optimizer_id)]
        except KeyError:
            raise ValueError(f"no CPU {self._kind} optimizer has id {optimizer_id}: call "
                             f"create_{self._kind}({optimizer_id}, ...) first") from None
        keep, writebacks = [], []
        description = kernel_tuple(f"{self._kind}_update", "params", params, grads, states, None, keep, writebacks)
        run(kernel, options, description)
        for original, work in writebacks:
            original.detach().copy_(work)
        return 0


class _LoadedCpuAdam(_LoadedCpuOptimizer):
    def __init__(self):
        super().__init__("adam")

    def create_adam(self, optimizer_id, alpha=1e-3, betta1=0.9, betta2=0.999, eps=1e-8, weight_decay=0,
                    adamw_mode=True, should_log=False):
        return self._create(optimizer_id, dict(adamw_mode=bool(adamw_mode)), should_log)

    def destroy_adam(self, optimizer_id):
        return self._destroy(optimizer_id)

    def adam_update(self, optimizer_id, step, lr, beta1, beta2, epsilon, weight_decay, bias_correction, params,
                    grads, exp_avg, exp_avg_sq):
        """One Adam step at `step` (counted from 1) with these
        hyperparameters; AdamW or L2 decay as create_adam was told."""
        def run(kernel, options, description):
            kernel.adam_step(lr, beta1, beta2, epsilon, weight_decay, options["adamw_mode"], bool(bias_correction),
                             int(step), [description])
        return self._step(optimizer_id, run, params, grads, exp_avg, exp_avg_sq)


class _LoadedCpuAdagrad(_LoadedCpuOptimizer):
    def __init__(self):
        super().__init__("adagrad")

    def create_adagrad(self, optimizer_id, alpha=1e-2, eps=1e-8, weight_decay=0, should_log=False):
        return self._create(optimizer_id, {}, should_log)

    def destroy_adagrad(self, optimizer_id):
        return self._destroy(optimizer_id)

    def adagrad_update(self, optimizer_id, step, lr, epsilon, weight_decay, params, grads, exp_avg_sq):
        def run(kernel, options, description):
            kernel.adagrad_step(lr, epsilon, weight_decay, int(step), [adagrad_tuple(description)])
        return self._step(optimizer_id, run, params, grads, exp_avg_sq)


class _LoadedCpuLion(_LoadedCpuOptimizer):
    def __init__(self):
        super().__init__("lion")

    def create_lion(self, optimizer_id, alpha=1e-3, betta1=0.9, betta2=0.999, weight_decay=0, should_log=False):
        return self._create(optimizer_id, {}, should_log)

    def destroy_lion(self, optimizer_id):
        return self._destroy(optimizer_id)

    def lion_update(self, optimizer_id, step, lr, beta1, beta2, weight_decay, params, grads, exp_avg):
        def run(kernel, options, description):
            kernel.lion_step(lr, beta1, beta2, weight_decay, int(step), [description])
        return self._step(optimizer_id, run, params, grads, exp_avg)


class _LoadedOnce(OpBuilder):
    """A builder whose op is made on the first load() and shared after (the
    optimizers a DeepSpeed optimizer creates by id outlive its builder)."""
    _factory = None

    def _op(self):
        cls = type(self)
        if "_loaded" not in cls.__dict__:
            cls._loaded = cls._factory()
        return cls._loaded


class CPUAdamBuilder(_LoadedOnce):
    NAME = "cpu_adam"
    _factory = _LoadedCpuAdam


class CPUAdagradBuilder(_LoadedOnce):
    NAME = "cpu_adagrad"
    _factory = _LoadedCpuAdagrad


class CPULionBuilder(_LoadedOnce):
    NAME = "cpu_lion"
    _factory = _LoadedCpuLion


def _write_back(pairs):
    """(original, fp32 working copy) pairs: the copies written back where
    they are not the tensors themselves (16-bit tensors)."""
    for original, work in pairs:
        if work is not original:
            original.copy_(work)


class _LoadedFusedAdam:
    """The op FusedAdamBuilder loads: DeepSpeed's multi_tensor_adam over
    torch tensor arithmetic on the tensors' own device (zinf has no CUDA
    kernel of its own for it; zinf.ops.adam.FusedAdam steps through torch's
    fused Adam instead). Math in fp32, written back in each tensor's dtype,
    as DeepSpeed's kernel does."""

    @torch.no_grad()
    def multi_tensor_adam(self, chunk_size, noop_flag, tensor_lists, lr, beta1, beta2, epsilon, step, mode,
                          bias_correction, weight_decay):
        """tensor_lists = [grads, params, exp_avgs, exp_avg_sqs]; mode 0 adds
        the weight decay to the gradient (L2), mode 1 decouples it (AdamW).
        noop_flag is not read, as DeepSpeed's kernel does not read it (it
        lets infinities and NaNs through for the caller to see)."""
        if len(tensor_lists) != 4 or len({len(tensors) for tensors in tensor_lists}) != 1:
            raise ValueError("multi_tensor_adam takes [grads, params, exp_avgs, exp_avg_sqs] of one length")
        correction1 = 1 - beta1 ** step if bias_correction else 1.0
        correction2 = 1 - beta2 ** step if bias_correction else 1.0
        for grad, param, exp_avg, exp_avg_sq in zip(*tensor_lists):
            g = grad.float()
            p, m, v = param.float(), exp_avg.float(), exp_avg_sq.float()  # the tensors themselves when fp32
            if mode == 0:
                g = g + weight_decay * p
            m.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            update = (m / correction1) / ((v / correction2).sqrt_().add_(epsilon))
            if mode != 0:
                update.add_(p, alpha=weight_decay)
            p.add_(update, alpha=-lr)
            _write_back(((param, p), (exp_avg, m), (exp_avg_sq, v)))


class FusedAdamBuilder(_LoadedOnce):
    """fused_adam: multi_tensor_adam on torch arithmetic (see
    _LoadedFusedAdam); zinf.ops.adam.FusedAdam is usable wherever torch is."""
    NAME = "fused_adam"
    _factory = _LoadedFusedAdam


class _LoadedFusedLion:
    """The op FusedLionBuilder loads: DeepSpeed's multi_tensor_lion over
    torch tensor arithmetic on the tensors' own device, fp32 math written
    back in each tensor's dtype. The update's sign is torch.sign's (0 where
    the interpolated momentum is exactly 0, as zinf's CPU Lion and the
    published update; DeepSpeed's kernel steps by +lr there)."""

    @torch.no_grad()
    def multi_tensor_lion(self, chunk_size, noop_flag, tensor_lists, lr, beta1, beta2, step, weight_decay):
        """tensor_lists = [grads, params, exp_avgs]; noop_flag is not read,
        as DeepSpeed's kernel does not read it."""
        if len(tensor_lists) != 3 or len({len(tensors) for tensors in tensor_lists}) != 1:
            raise ValueError("multi_tensor_lion takes [grads, params, exp_avgs] of one length")
        for grad, param, exp_avg in zip(*tensor_lists):
            g = grad.float()
            p, m = param.float(), exp_avg.float()  # the tensors themselves when fp32
            update = (m * beta1).add_(g, alpha=1 - beta1).sign_()
            p.mul_(1 - lr * weight_decay).add_(update, alpha=-lr)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
            _write_back(((param, p), (exp_avg, m)))


class FusedLionBuilder(_LoadedOnce):
    """fused_lion: multi_tensor_lion on torch arithmetic (see
    _LoadedFusedLion), which zinf.ops.lion.FusedLion steps with."""
    NAME = "fused_lion"
    _factory = _LoadedFusedLion


class GDSBuilder(OpBuilder):
    NAME = "gds"
    _missing = ("zinf has no GPUDirect Storage op; GPU tensors go through pinned host memory with "
                "AsyncIOBuilder().load().aio_handle")


class FusedLambBuilder(OpBuilder):
    NAME = "fused_lamb"
    _missing = ("zinf has no LAMB optimizer (its engine steps Adam, AdamW, Adagrad and Lion on the CPU); "
                "use one of those, or keep LAMB training on DeepSpeed")


ALL_BUILDERS = (AsyncIOBuilder, CPUAdamBuilder, CPUAdagradBuilder, CPULionBuilder, FusedAdamBuilder,
                FusedLambBuilder, FusedLionBuilder, GDSBuilder)


def compatible_ops():
    """{NAME: is_compatible()} for every builder."""
    return {builder.NAME: builder().is_compatible() for builder in ALL_BUILDERS}


__all__ = [builder.__name__ for builder in ALL_BUILDERS] + ["OpBuilder", "compatible_ops"]

"""The implementations compared: fastbn, torch's F.batch_norm (on CUDA also with cuDNN turned off:
torch_native), torch.compile of it (inductor), the naive BatchNorm of the classic tutorial, and the
floor (one copy of the input)."""
import os

import torch
import torch.nn.functional as F

from .. import functional as fastbn_functional


def naive_batch_norm(x, running_mean, running_var, weight, bias, training, momentum=0.1, eps=1e-5):
    """BatchNorm as the classic from-scratch tutorial writes it: mean and variance with torch ops,
    then normalize, scale and shift (and update the running statistics when training)."""
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    if training:
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        with torch.no_grad():
            count = x.numel() / x.shape[1]
            running_mean.mul_(1 - momentum).add_(mean.reshape(-1), alpha=momentum)
            running_var.mul_(1 - momentum).add_(var.reshape(-1) * count / (count - 1), alpha=momentum)
    else:
        mean, var = running_mean.view(view), running_var.view(view)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    return weight.view(view) * x_hat + bias.view(view)


def _compiled_batch_norm():
    return torch.compile(F.batch_norm, dynamic=False)


def native_batch_norm(*args, **kwargs):
    """F.batch_norm with cuDNN turned off: torch's own CUDA kernels (backward follows the forward's choice)."""
    with torch.backends.cudnn.flags(enabled=False):
        return F.batch_norm(*args, **kwargs)


PERSISTENT_SWITCH = "FASTBN_CUDA_PERSISTENT"


def _with_persistent_switch(value, step):
    """step with FASTBN_CUDA_PERSISTENT set to `value` around it, the backward included ("1": fastbn's
    persistent CUDA kernels wherever the tensors fit; "0": its two-pass kernels; unset, fastbn
    chooses by shape). Setting the variable costs a call a microsecond or two of host time."""
    def switched():
        before = os.environ.get(PERSISTENT_SWITCH)
        os.environ[PERSISTENT_SWITCH] = value
        try:
            return step()
        finally:
            if before is None:
                del os.environ[PERSISTENT_SWITCH]
            else:
                os.environ[PERSISTENT_SWITCH] = before
    return switched


PEERS = ("torch", "torch_native", "inductor", "naive")
FASTBN_PATHS = {"fastbn_persistent": "1", "fastbn_two_pass": "0"}  # CUDA: one path forced
IMPLS = ("fastbn",) + tuple(FASTBN_PATHS) + PEERS + ("floor",)
CUDA_ONLY = tuple(FASTBN_PATHS) + ("torch_native",)


def default_impls(device):
    """Every implementation; fastbn with a CUDA path forced and torch_native only on CUDA (on the CPU
    they are fastbn and torch)."""
    return [i for i in IMPLS if device == "cuda" or i not in CUDA_ONLY]


def batch_norm_fn(impl):
    """The batch_norm-like callable of an implementation (fresh compile cache for inductor)."""
    if impl == "fastbn":
        return fastbn_functional.batch_norm
    if impl in FASTBN_PATHS:  # make_step sets the path around the whole step
        return fastbn_functional.batch_norm
    if impl == "torch":
        return F.batch_norm
    if impl == "torch_native":
        return native_batch_norm
    if impl == "inductor":
        return _compiled_batch_norm()
    if impl == "naive":
        return naive_batch_norm
    raise ValueError(f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def make_step(impl, op, fn, t):
    """A no-argument callable running `op` once with implementation `impl` on the tensors `t`."""
    if impl in FASTBN_PATHS:
        return _with_persistent_switch(FASTBN_PATHS[impl], _make_step(op, fn, t))
    if impl == "floor":  # one read and one write of the input, into a preallocated output
        return lambda: t["out"].copy_(t["x"])
    return _make_step(op, fn, t)


def _make_step(op, fn, t):
    if op == "train_fwd":
        return lambda: fn(t["x"], t["rm"], t["rv"], t["w"], t["b"], True)
    if op == "eval_fwd":  # inference, as models are run for it
        def eval_fwd():
            with torch.inference_mode():
                fn(t["x"], t["rm"], t["rv"], t["w"], t["b"], False)
        return eval_fwd
    if op == "train_fwd_bwd":
        def train_fwd_bwd():
            x = t["x"].detach().requires_grad_()
            torch.autograd.backward(fn(x, t["rm"], t["rv"], t["w"], t["b"], True), t["grad"])
        return train_fwd_bwd
    raise ValueError(f"unknown op {op!r}")

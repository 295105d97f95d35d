"""Loads the compiled ops (torch.ops.fastbn.*) and gives them fake kernels.

The schemas are declared in csrc/ops.cpp; this file is the only Python that knows about them. The
ops' autograd is in C++ (csrc/autograd.cpp): through Python it cost 30 us per call.
"""
import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.fastbn)

# The overloads themselves: calling them skips the OpOverloadPacket's per-call overload lookup.
batch_norm_train = torch.ops.fastbn.batch_norm_train.default
batch_norm_eval = torch.ops.fastbn.batch_norm_eval.default
batch_norm_backward = torch.ops.fastbn.batch_norm_backward.default
update_running_stats = torch.ops.fastbn.update_running_stats.default
batch_norm_act_train = torch.ops.fastbn.batch_norm_act_train.default
batch_norm_act_eval = torch.ops.fastbn.batch_norm_act_eval.default
batch_norm_act_backward = torch.ops.fastbn.batch_norm_act_backward.default
batch_norm_stats = torch.ops.fastbn.batch_norm_stats.default
batch_norm_backward_elemt = torch.ops.fastbn.batch_norm_backward_elemt.default


def acc_dtype(dtype):
    """The dtype of batch statistics and of the kernels' accumulation."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_memory_format(x):
    """Mirror of kernel_memory_format in csrc/batch_norm_common.cpp: the layout outputs get."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channel_stat(x):
    return x.new_empty((x.shape[1],), dtype=acc_dtype(x.dtype))


# ---- fake kernels (shapes, dtypes and strides for torch.compile / export) ---------------------

@torch.library.register_fake("fastbn::batch_norm_train")
def _(input, weight, bias, eps):
    output = torch.empty_like(input, memory_format=kernel_memory_format(input))
    return output, _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fastbn::batch_norm_eval")
def _(input, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(input, memory_format=kernel_memory_format(input))


def _backward_grads(input, output_mask):
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    grad_input = (torch.empty_like(input, memory_format=kernel_memory_format(input)) if output_mask[0]
                  else input.new_empty((0,)))
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=acc)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=acc)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("fastbn::batch_norm_backward")
def _(grad_output, input, weight, mean, var, eps, training, output_mask):
    return _backward_grads(input, output_mask)


@torch.library.register_fake("fastbn::batch_norm_act_train")
def _(input, weight, bias, residual, eps, activation, activation_param, memory_efficient):
    output = torch.empty_like(input, memory_format=kernel_memory_format(input))
    return output, _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fastbn::batch_norm_act_eval")
def _(input, weight, bias, residual, running_mean, running_var, eps, activation, activation_param, memory_efficient):
    return torch.empty_like(input, memory_format=kernel_memory_format(input))


@torch.library.register_fake("fastbn::batch_norm_act_backward")
def _(grad_output, saved, saved_is_output, weight, bias, residual, mean, var, eps, training, activation,
      activation_param, output_mask):
    grad_input, grad_weight, grad_bias = _backward_grads(saved, output_mask[:3])
    grad_residual = (torch.empty_like(saved, memory_format=kernel_memory_format(saved)) if output_mask[3]
                     else saved.new_empty((0,)))
    return grad_input, grad_weight, grad_bias, grad_residual


@torch.library.register_fake("fastbn::batch_norm_stats")
def _(input):
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fastbn::batch_norm_backward_elemt")
def _(grad_output, input, weight, mean, var, eps, mean_dy, mean_dy_xhat):
    return torch.empty_like(input, memory_format=kernel_memory_format(input))


@torch.library.register_fake("fastbn::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    return None

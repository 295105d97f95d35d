"""Loads the compiled ops (torch.ops.fastbn.*) and gives them fake kernels and autograd.

The schemas are declared in csrc/ops.cpp; this file is the only Python that knows about them.
"""
import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.fastbn)

# The overloads themselves: calling them skips the OpOverloadPacket's per-call overload lookup.
batch_norm_train = torch.ops.fastbn.batch_norm_train.default
batch_norm_eval = torch.ops.fastbn.batch_norm_eval.default
batch_norm_backward = torch.ops.fastbn.batch_norm_backward.default
update_running_stats = torch.ops.fastbn.update_running_stats.default
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


@torch.library.register_fake("fastbn::batch_norm_backward")
def _(grad_output, input, weight, mean, var, eps, training, output_mask):
    channels = input.shape[1]
    acc = acc_dtype(input.dtype)
    grad_input = (torch.empty_like(input, memory_format=kernel_memory_format(input)) if output_mask[0]
                  else input.new_empty((0,)))
    grad_weight = input.new_empty((channels if output_mask[1] else 0,), dtype=acc)
    grad_bias = input.new_empty((channels if output_mask[2] else 0,), dtype=acc)
    return grad_input, grad_weight, grad_bias


@torch.library.register_fake("fastbn::batch_norm_stats")
def _(input):
    return _channel_stat(input), _channel_stat(input)


@torch.library.register_fake("fastbn::batch_norm_backward_elemt")
def _(grad_output, input, weight, mean, var, eps, mean_dy, mean_dy_xhat):
    return torch.empty_like(input, memory_format=kernel_memory_format(input))


@torch.library.register_fake("fastbn::update_running_stats")
def _(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    return None


# ---- autograd ----------------------------------------------------------------------------------

def _param_grads(ctx, grad_input, grad_weight, grad_bias):
    """Drops grads nobody asked for and returns parameter grads in the parameters' own dtypes."""
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (grad_input if need_input else None,
            grad_weight.to(ctx.weight_dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None)


def _save_param_dtypes(ctx, weight, bias):
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _train_setup_context(ctx, inputs, output):
    input, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(input, weight, mean, var)
    ctx.eps = eps
    _save_param_dtypes(ctx, weight, bias)
    # The statistics are for the running averages and for backward, not for differentiating:
    # they need no detach() before the update op, and get no zero-filled grads here.
    ctx.mark_non_differentiable(mean, var)


def _train_backward(ctx, grad_output, grad_mean, grad_var):
    input, weight, mean, var = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = batch_norm_backward(grad_output, input, weight, mean, var, ctx.eps, True, mask)
    return (*_param_grads(ctx, *grads), None)


def _eval_setup_context(ctx, inputs, output):
    input, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(input, weight, running_mean, running_var)
    ctx.eps = eps
    _save_param_dtypes(ctx, weight, bias)


def _eval_backward(ctx, grad_output):
    input, weight, running_mean, running_var = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = batch_norm_backward(grad_output, input, weight, running_mean, running_var, ctx.eps, False, mask)
    return (*_param_grads(ctx, *grads), None, None, None)


torch.library.register_autograd("fastbn::batch_norm_train", _train_backward, setup_context=_train_setup_context)
torch.library.register_autograd("fastbn::batch_norm_eval", _eval_backward, setup_context=_eval_setup_context)

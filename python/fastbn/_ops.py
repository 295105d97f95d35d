"""Loads the compiled ops (torch.ops.fastbn.*) and gives them fake kernels, and the fused ops autograd.

The schemas are declared in csrc/ops.cpp; this file is the only Python that knows about them. The
plain ops' autograd is in C++ (csrc/autograd.cpp): through Python it cost 30 us per call.
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


# ---- autograd of the fused ops -----------------------------------------------------------------

def _param_grads(ctx, grad_input, grad_weight, grad_bias):
    """Drops grads nobody asked for and returns parameter grads in the parameters' own dtypes."""
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (grad_input if need_input else None,
            grad_weight.to(ctx.weight_dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None)


def _save_param_dtypes(ctx, weight, bias):
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


# Standard mode saves the input (and the residual, to recompute the pre-activation). Memory-efficient
# mode saves the output instead, from which the backward recovers x = (act^-1(y) - bias - residual)
# / scale + mean. Where |weight| is 0, or small next to |bias| (the recovery would lose more than
# 4 bits), that channel's input is kept as well and its grads are computed from it.
_RECOVERY_MARGIN = 16.0


def _kept_channels(weight, bias):
    """Channels whose input memory-efficient mode keeps: weight 0, or |bias| / |weight| > 16."""
    if weight is None:
        return None
    small = weight == 0
    if bias is not None:
        small = small | (bias.abs() > _RECOVERY_MARGIN * weight.abs())
    return small.nonzero().flatten()


def _act_setup_context(ctx, input, weight, bias, residual, mean, var, output, eps, activation, param,
                       memory_efficient):
    # Which channels keep their input depends on the weight's values, which a compiled graph cannot size:
    # under torch.compile memory-efficient mode saves the input, as standard mode does.
    memory_efficient = memory_efficient and not torch.compiler.is_compiling()
    ctx.eps, ctx.activation, ctx.param, ctx.memory_efficient = eps, activation, param, memory_efficient
    _save_param_dtypes(ctx, weight, bias)
    kept = _kept_channels(weight, bias) if memory_efficient else None
    kept_input = input.index_select(1, kept) if kept is not None and kept.numel() > 0 else None
    ctx.save_for_backward(output if memory_efficient else input, weight, bias, residual, mean, var, kept, kept_input)


def _act_backward(ctx, grad_output, training):
    saved, weight, bias, residual, mean, var, kept, kept_input = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    grads = list(batch_norm_act_backward(grad_output, saved, ctx.memory_efficient, weight, bias, residual, mean, var,
                                         ctx.eps, training, ctx.activation, ctx.param, mask))
    if kept_input is not None:  # those channels again, from their input
        residual_kept = residual.index_select(1, kept) if residual is not None else None
        bias_kept = bias[kept] if bias is not None else None
        subset = batch_norm_act_backward(grad_output.index_select(1, kept), kept_input, False, weight[kept], bias_kept,
                                         residual_kept, mean[kept], var[kept], ctx.eps, training, ctx.activation,
                                         ctx.param, mask)
        for k, (full, part) in enumerate(zip(grads, subset)):
            if mask[k]:
                grads[k] = full.index_copy(0 if full.dim() == 1 else 1, kept, part)
    grad_input, grad_weight, grad_bias = _param_grads(ctx, *grads[:3])
    return grad_input, grad_weight, grad_bias, grads[3] if mask[3] else None


def _act_train_setup_context(ctx, inputs, output):
    input, weight, bias, residual, eps, activation, param, memory_efficient = inputs
    out, mean, var = output
    _act_setup_context(ctx, input, weight, bias, residual, mean, var, out, eps, activation, param, memory_efficient)
    ctx.mark_non_differentiable(mean, var)


def _act_train_backward(ctx, grad_output, grad_mean, grad_var):
    return (*_act_backward(ctx, grad_output, True), None, None, None, None)


def _act_eval_setup_context(ctx, inputs, output):
    input, weight, bias, residual, running_mean, running_var, eps, activation, param, memory_efficient = inputs
    _act_setup_context(ctx, input, weight, bias, residual, running_mean, running_var, output, eps, activation, param,
                       memory_efficient)


def _act_eval_backward(ctx, grad_output):
    return (*_act_backward(ctx, grad_output, False), None, None, None, None, None, None)


torch.library.register_autograd("fastbn::batch_norm_act_train", _act_train_backward,
                                setup_context=_act_train_setup_context)
torch.library.register_autograd("fastbn::batch_norm_act_eval", _act_eval_backward,
                                setup_context=_act_eval_setup_context)

"""SyncBatchNorm's maths on torch.distributed (the module is fastbn.SyncBatchNorm): batch statistics
over every process's batch, for CPU tensors (gloo) as well as CUDA ones (NCCL).

Forward: each process reduces its batch to (count, mean, variance) per channel with the fused kernel,
one all_gather shares them, every process merges them exactly (Chan's formula, in float64, in rank
order, so all processes hold bit-identical statistics; no round trip through invstd as in torch's)
and normalizes with the fused kernel.
Backward: the per-channel sum(dy) and sum(dy * x_hat) are one all_reduce, then one fused pass
computes the input gradient. Weight and bias gradients stay local, as in torch's SyncBatchNorm:
DistributedDataParallel reduces them with every other parameter gradient.
"""
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ._ops import (batch_norm_backward, batch_norm_backward_elemt, batch_norm_eval, batch_norm_stats,
                   update_running_stats)
from .functional import _values_per_channel

__all__ = ["sync_batch_norm"]


def sync_batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group,
                    world_size):
    """Training BatchNorm over the batches of every process in `group` (of `world_size` > 1 processes);
    running statistics, when given, are updated with the global ones on every process."""
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                        eps, group, world_size)


def _all_gather(tensor, group, world_size):
    """(world_size, *tensor.shape): every process's tensor, in rank order."""
    gathered = tensor.new_empty(world_size * tensor.numel())  # the concatenated form: gloo takes no other
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in 2.13
    gather_single(gathered, tensor, group=group)
    return gathered.view(world_size, *tensor.shape)


def _save_param_dtypes(ctx, weight, bias):
    ctx.weight_dtype = weight.dtype if weight is not None else None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _param_grads(ctx, grad_input, grad_weight, grad_bias):
    """Drops grads nobody asked for and returns parameter grads in the parameters' own dtypes."""
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (grad_input if need_input else None,
            grad_weight.to(ctx.weight_dtype) if need_weight else None,
            grad_bias.to(ctx.bias_dtype) if need_bias else None)


# Counts travel as two numbers below 2**24, so they stay exact in float32 (2**48 values per channel).
_COUNT_SPLIT = 2**24


def _pack_moments(count, mean, var):
    """One process's row: count (split in two exact parts), mean and biased variance per channel,
    in the statistics' own dtype (float32, or float64 for float64 input): 2C + 2 values."""
    parts = mean.new_tensor([count // _COUNT_SPLIT, count % _COUNT_SPLIT])
    return torch.cat([parts, mean, var])


def _merge_moments(gathered, channels):
    """Chan's merge of every process's row, all at once and in float64: the exact mean first, then
    M2 = sum(n_r var_r + n_r (mean_r - mean)^2). Empty processes (n_r = 0) contribute nothing.
    Returns the total count (a 1-element tensor), the mean and the biased variance."""
    rows = gathered.double()
    counts = rows[:, :1] * _COUNT_SPLIT + rows[:, 1:2]
    means, variances = rows[:, 2:channels + 2], rows[:, channels + 2:]
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp(min=1)
    m2 = (counts * (variances + (means - mean) ** 2)).sum(0)
    return total, mean, m2 / total.clamp(min=1)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training forward and backward across processes. The collectives cannot live inside the ops,
    so they are sequenced here, between fastbn's fused ops."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, group,
                world_size):
        channels = input.shape[1]
        local_mean, local_var = batch_norm_stats(input)
        local = _pack_moments(_values_per_channel(input.shape), local_mean, local_var)
        total, mean, var = _merge_moments(_all_gather(local, group, world_size), channels)
        # The Bessel correction and torch's check need the global count on the host: free on the CPU,
        # one synchronization on CUDA (torch's SyncBatchNorm synchronizes there too).
        count = int(total.item())
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {count} across "
                             f"{world_size} processes (input size {tuple(input.shape)} on this one)")
        mean, var = mean.to(local_mean.dtype), var.to(local_mean.dtype)
        if running_mean is not None:
            update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count)
        ctx.save_for_backward(input, weight, mean, var)
        ctx.eps, ctx.count, ctx.group, ctx.world_size = eps, count, group, world_size
        _save_param_dtypes(ctx, weight, bias)
        return batch_norm_eval(input, weight, bias, mean, var, ctx.eps)

    @staticmethod
    @once_differentiable  # grads of grads raise (torch's SyncBatchNorm has none either)
    def backward(ctx, grad_output):
        input, weight, mean, var = ctx.saved_tensors
        # Local sum(dy * x_hat) and sum(dy): the eval-mode parameter grads at the global statistics.
        _, sum_dy_xhat, sum_dy = batch_norm_backward(grad_output, input, weight, mean, var, ctx.eps, False,
                                                     [False, True, True])
        grad_input = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / ctx.count).chunk(2)
            grad_input = batch_norm_backward_elemt(grad_output, input, weight, mean, var, ctx.eps, mean_dy,
                                                   mean_dy_xhat)
        return (*_param_grads(ctx, grad_input, sum_dy_xhat, sum_dy), None, None, None, None, None, None, None)

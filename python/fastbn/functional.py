"""Functional BatchNorm with the signature and semantics of torch.nn.functional.batch_norm."""
import math

from ._ops import batch_norm_eval, batch_norm_train, update_running_stats

__all__ = ["batch_norm"]


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Drop-in for :func:`torch.nn.functional.batch_norm`, computed by fastbn's fused kernels.

    In training the batch statistics normalize the input and, when ``running_mean`` and
    ``running_var`` are given, update them in place with ``momentum``; otherwise the running
    statistics are used. Differentiable in both modes, works under ``torch.compile``.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _values_per_channel(size):
    """N times the spatial sizes: how many values each channel's statistics are taken over."""
    return size[0] * math.prod(size[2:]) if len(size) >= 2 else None


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked=None):
    """batch_norm plus what the modules need: momentum=None (cumulative average over
    num_batches_tracked) and the num_batches_tracked counter, updated by the same op."""
    count = _values_per_channel(input.size())
    if training:
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("batch_norm: running_mean and running_var must be given together (or both be None)")

    if not training:
        if running_mean is None:
            raise RuntimeError("running_mean must be defined in evaluation mode")
        return batch_norm_eval(input, weight, bias, running_mean, running_var, eps)

    output, mean, var = batch_norm_train(input, weight, bias, eps)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count)
    return output

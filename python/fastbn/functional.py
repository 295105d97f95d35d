"""Functional BatchNorm with the signature and semantics of torch.nn.functional.batch_norm."""
import math

from ._ops import batch_norm_act_eval, batch_norm_act_train, batch_norm_eval, batch_norm_train, update_running_stats

__all__ = ["batch_norm", "batch_norm_act"]

# name: (code in the op schemas, default parameter or None when it takes none)
ACTIVATIONS = {"identity": (0, None), "relu": (1, None), "leaky_relu": (2, 0.01), "elu": (3, 1.0), "silu": (4, None)}


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Drop-in for :func:`torch.nn.functional.batch_norm`, computed by fastbn's fused kernels.

    In training the batch statistics normalize the input and, when ``running_mean`` and
    ``running_var`` are given, update them in place with ``momentum``; otherwise the running
    statistics are used. Differentiable in both modes, works under ``torch.compile``.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def batch_norm_act(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5,
                   activation="relu", activation_param=None, residual=None, memory_efficient=False):
    """act(batch_norm(input) + residual) in one fused pass forward and backward.

    Arguments as :func:`batch_norm`, plus:
        activation: ``"identity"``, ``"relu"``, ``"leaky_relu"`` (activation_param: negative slope,
            default 0.01), ``"elu"`` (activation_param: alpha, default 1.0) or ``"silu"``.
        residual: a tensor of the input's shape and dtype added before the activation, or None.
        memory_efficient: save only the output for backward (plus the residual, which a ResNet keeps
            anyway) and recover the input from it: identity and leaky_relu with a positive slope only.
    """
    epilogue = _epilogue(activation, activation_param, memory_efficient)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       epilogue=(residual, *epilogue))


def _epilogue(activation, activation_param, memory_efficient):
    """Checks the activation arguments; returns (activation code, parameter, memory_efficient)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, not {activation!r}")
    code, default = ACTIVATIONS[activation]
    if default is None and activation_param is not None:
        raise ValueError(f"activation {activation!r} takes no activation_param (got {activation_param!r})")
    param = float(activation_param if activation_param is not None else default or 0.0)
    if memory_efficient:
        if activation in ("relu", "elu", "silu"):
            why = {"relu": "relu(z) is 0 for every z <= 0, where the input cannot be told apart",
                   "elu": "elu saturates at -alpha, where the input cannot be told apart",
                   "silu": "silu is not monotonic"}[activation]
            raise ValueError(f"memory_efficient=True recovers the input from the output, which {activation!r} does "
                             f"not allow ({why}); use 'leaky_relu' or 'identity', or memory_efficient=False")
        if activation == "leaky_relu" and not param > 0:
            raise ValueError(f"memory_efficient=True needs a positive leaky_relu slope to invert it, got {param}")
    return code, param, bool(memory_efficient)


def _values_per_channel(size):
    """N times the spatial sizes: how many values each channel's statistics are taken over."""
    return size[0] * math.prod(size[2:]) if len(size) >= 2 else None


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked=None,
                epilogue=None):
    """batch_norm plus what the modules need: momentum=None (cumulative average over
    num_batches_tracked) and the num_batches_tracked counter, updated by the same op; with an
    epilogue (residual, activation code, parameter, memory_efficient), the fused ops."""
    if training:
        count = _values_per_channel(input.size())
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
        if epilogue:
            return batch_norm_act_eval(input, weight, bias, epilogue[0], running_mean, running_var, eps, *epilogue[1:])
        return batch_norm_eval(input, weight, bias, running_mean, running_var, eps)

    if epilogue:
        output, mean, var = batch_norm_act_train(input, weight, bias, epilogue[0], eps, *epilogue[1:])
    else:
        output, mean, var = batch_norm_train(input, weight, bias, eps)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count)
    return output

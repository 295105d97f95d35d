"""Drop-in BatchNorm modules (subclasses of torch's) and convert(), which swaps them into a model."""
from torch import nn

from .functional import _batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _FastBatchNorm:
    """The forward of torch's _BatchNorm, computed by fastbn. Constructor, buffers, state_dict,
    input checks and error messages are torch's own (inherited)."""

    def forward(self, input):
        self._check_input_dim(input)
        # As in torch: normalize with batch statistics when training or when no running stats exist;
        # update the running stats only when training and tracking them.
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        counter = self.num_batches_tracked if self.training and self.track_running_stats else None
        return _batch_norm(input,
                           self.running_mean if use_running else None,
                           self.running_var if use_running else None,
                           self.weight, self.bias, bn_training, self.momentum, self.eps, counter)


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """fastbn's :class:`torch.nn.BatchNorm1d` for (N, C) and (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """fastbn's :class:`torch.nn.BatchNorm2d` for (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """fastbn's :class:`torch.nn.BatchNorm3d` for (N, C, D, H, W) input, NCDHW or channels_last_3d."""


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def _replacement(bn):
    fast = _REPLACEMENTS[type(bn)](bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                   device="meta")
    # Share the very same Parameters and buffers, so optimizers and references stay valid.
    for name in ("weight", "bias"):
        setattr(fast, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(fast, name, getattr(bn, name))
    fast.train(bn.training)
    return fast


def convert(module):
    """Replaces every torch ``BatchNorm1d/2d/3d`` in ``module`` by fastbn's, in place.

    Parameters and buffers are shared, not copied; training flags, devices and dtypes are kept.
    Returns the model (or, given a bare BatchNorm module, the fastbn module replacing it).
    Subclasses of torch's BatchNorm (fastbn's own included) are left alone.
    """
    if type(module) in _REPLACEMENTS:
        return _replacement(module)
    for name, child in module.named_children():
        converted = convert(child)
        if converted is not child:
            setattr(module, name, converted)
    return module

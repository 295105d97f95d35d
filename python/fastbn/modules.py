"""Drop-in BatchNorm modules (subclasses of torch's) and convert(), which swaps them into a model."""
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import _batch_norm
from .sync import sync_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]


class _FastBatchNorm:
    """The forward of torch's _BatchNorm, computed by fastbn. Constructor, buffers, state_dict,
    input checks and error messages are torch's own (inherited)."""

    def _batch_norm_args(self):
        """As in torch: normalize with batch statistics when training or when no running stats exist;
        update the running stats (and the counter) only when training and tracking them."""
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        counter = self.num_batches_tracked if self.training and self.track_running_stats else None
        return (bn_training, self.running_mean if use_running else None, self.running_var if use_running else None,
                counter)

    def forward(self, input):
        self._check_input_dim(input)
        bn_training, running_mean, running_var, counter = self._batch_norm_args()
        return _batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, self.momentum,
                           self.eps, counter)


class BatchNorm1d(_FastBatchNorm, nn.BatchNorm1d):
    """fastbn's :class:`torch.nn.BatchNorm1d` for (N, C) and (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, nn.BatchNorm2d):
    """fastbn's :class:`torch.nn.BatchNorm2d` for (N, C, H, W) input, NCHW or channels_last."""


class BatchNorm3d(_FastBatchNorm, nn.BatchNorm3d):
    """fastbn's :class:`torch.nn.BatchNorm3d` for (N, C, D, H, W) input, NCDHW or channels_last_3d."""


class SyncBatchNorm(_FastBatchNorm, nn.SyncBatchNorm):
    """fastbn's :class:`torch.nn.SyncBatchNorm`: same constructor, buffers and state_dict, for input of
    rank 2 to 5 on CPU (gloo) or CUDA (NCCL). It synchronizes only when training in a process group of
    more than one process; otherwise it is fastbn's plain BatchNorm and communicates nothing."""

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        bn_training, running_mean, running_var, counter = self._batch_norm_args()
        if self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
            if world_size > 1:
                return sync_batch_norm(input, self.weight, self.bias, running_mean, running_var, counter,
                                       self.momentum, self.eps, group, world_size)
        return _batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, self.momentum,
                           self.eps, counter)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Returns `module` with every BatchNorm1d/2d/3d (torch's or fastbn's) and every torch
        SyncBatchNorm replaced by fastbn's SyncBatchNorm, sharing Parameters and buffers and keeping
        training flags; as :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
            sync = _replacement(module, cls)
            sync.process_group = process_group or getattr(module, "process_group", None)
            if hasattr(module, "qconfig"):
                sync.qconfig = module.qconfig
            return sync
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                setattr(module, name, converted)
        return module


_REPLACEMENTS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d,
                 nn.SyncBatchNorm: SyncBatchNorm}


def _replacement(bn, cls=None):
    """A fastbn module (of class `cls`, by default the one replacing bn's) sharing bn's state."""
    fast = (cls or _REPLACEMENTS[type(bn)])(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                            device="meta")
    if isinstance(bn, nn.SyncBatchNorm):
        fast.process_group = bn.process_group
    # Share the very same Parameters and buffers, so optimizers and references stay valid.
    for name in ("weight", "bias"):
        setattr(fast, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(fast, name, getattr(bn, name))
    fast.train(bn.training)
    return fast


def convert(module):
    """Replaces every torch ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` in ``module`` by fastbn's, in place.

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

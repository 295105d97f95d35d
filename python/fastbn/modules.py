"""Drop-in BatchNorm modules (subclasses of torch's) and convert(), which swaps them into a model."""
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .functional import ACTIVATIONS, _batch_norm, _epilogue
from .sync import sync_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d",
           "SyncBatchNorm", "convert"]


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


class _BatchNormAct:
    """fastbn's BatchNorm followed by a residual add and an activation, fused: forward(x, residual=None)
    is act(BN(x) + residual). Same buffers, parameters and state_dict keys as the BatchNorm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation="relu", activation_param=None, memory_efficient=False, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _, param, _ = _epilogue(activation, activation_param, memory_efficient)  # checks them now
        self.activation = activation
        self.activation_param = None if ACTIVATIONS[activation][1] is None else param
        self.memory_efficient = memory_efficient

    def forward(self, input, residual=None):
        self._check_input_dim(input)
        bn_training, running_mean, running_var, counter = self._batch_norm_args()
        epilogue = _epilogue(self.activation, self.activation_param, self.memory_efficient)
        return _batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, self.momentum,
                           self.eps, counter, epilogue=(residual, *epilogue))

    def extra_repr(self):
        param = "" if self.activation_param is None else f", activation_param={self.activation_param}"
        return (super().extra_repr() + f", activation={self.activation!r}{param}"
                + (", memory_efficient=True" if self.memory_efficient else ""))


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """:class:`BatchNorm1d` fused with a residual add and an activation."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """:class:`BatchNorm2d` fused with a residual add and an activation."""


class BatchNormAct3d(_BatchNormAct, BatchNorm3d):
    """:class:`BatchNorm3d` fused with a residual add and an activation."""


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


def _replacement(bn, cls=None, **options):
    """A fastbn module (of class `cls`, by default the one replacing bn's, built with `options`)
    sharing bn's state."""
    fast = (cls or _REPLACEMENTS[type(bn)])(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                            device="meta", **options)
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

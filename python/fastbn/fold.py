"""fold(): every BatchNorm that directly follows a Conv, ConvTranspose or Linear folded into it, for inference.

In eval mode BatchNorm is the per-channel affine map y = scale * x + shift with
scale = weight / sqrt(running_var + eps) and shift = bias - running_mean * scale; applied to the output
of a linear layer it can live in that layer's weights (W' = scale * W per output channel) and bias
(b' = scale * b + shift). The BatchNorm module is then replaced by nn.Identity.
"""
import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .modules import _BatchNormAct

__all__ = ["fold", "FoldReport"]

log = logging.getLogger(__name__)

_PRODUCERS = (_ConvNd, nn.Linear)  # _ConvNd covers Conv1d/2d/3d and ConvTranspose1d/2d/3d


@dataclass
class FoldReport:
    """What fold() did: `folded` holds (batch norm, layer it went into) names, `left` holds
    (batch norm, reason) for those kept; `trace_error` says why torch.fx could not be used, if it could not."""
    folded: list = field(default_factory=list)
    left: list = field(default_factory=list)
    trace_error: str = None

    def __str__(self):
        how = f"nn.Sequential adjacency (torch.fx failed: {self.trace_error})" if self.trace_error else "torch.fx"
        lines = [f"fold ({how}): {len(self.folded)} folded, {len(self.left)} left"]
        lines += [f"  folded {bn} into {layer}" for bn, layer in self.folded]
        lines += [f"  left   {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every BatchNorm (torch's, fastbn's, any subclass) a single node."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def fold(model, inplace=False, example_inputs=None, return_report=False):
    """Folds BatchNorm into the Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear producing its input.

    A BatchNorm (torch's or fastbn's, any rank, affine or not) is folded when its input is exactly the
    output of such a layer, that output is used nowhere else, each module is called once, and the
    BatchNorm normalizes with running statistics. The patterns are found with torch.fx (fastbn's
    modules are leaves); for a model fx cannot trace, adjacent modules of an nn.Sequential are used.
    The folding is computed in float64 and cast back; a bias is created where the layer had none.

    Args:
        model: the model; it is put in eval mode.
        inplace: change `model` itself; by default a deep copy is folded and `model` is left untouched.
        example_inputs: optional tuple of inputs; with it, shapes are propagated and a fold is made
            only where the layer's output really has its channels in dimension 1 as BatchNorm reads them
            (without it, a Linear feeding a BatchNorm is assumed to see 2-D input, as in an MLP).
        return_report: also return a :class:`FoldReport`. The same report is logged on the
            ``fastbn.fold`` logger (INFO).

    Returns:
        The folded eval-mode model, or ``(model, report)`` with ``return_report=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold() expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    report = FoldReport()
    try:
        graph = _LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...) for untraceable code
        report.trace_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _fold_sequential(model, report)
    else:
        _fold_graph(model, graph, example_inputs, report)
    log.info("%s", report)
    return (model, report) if return_report else model


def _fold_graph(model, graph, example_inputs, report):
    modules = dict(model.named_modules(remove_duplicate=False))
    calls = Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp
        with torch.no_grad():
            ShapeProp(torch.fx.GraphModule(model, graph)).propagate(*example_inputs)
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn = modules[node.target]
        source = node.args[0] if node.args else node.kwargs.get("input")
        producer = modules[source.target] if isinstance(source, torch.fx.Node) and source.op == "call_module" else None
        if not isinstance(producer, _PRODUCERS):
            reason = ("its input is not the output of a Conv, ConvTranspose or Linear but of "
                      + _describe(source, modules))
        elif len(source.users) > 1:
            reason = f"the output of {source.target} is used {len(source.users)} times"
        elif calls[id(producer)] > 1 or calls[id(bn)] > 1:
            reason = f"{source.target if calls[id(producer)] > 1 else node.target} is called more than once"
        else:
            reason = _cannot_fold(producer, bn) or _shape_mismatch(producer, source)
        if reason:
            report.left.append((node.target, reason))
            continue
        _fold_into(producer, bn)
        model.set_submodule(node.target, nn.Identity())
        report.folded.append((node.target, source.target))
    _report_unseen(model, report)


def _describe(source, modules):
    if not isinstance(source, torch.fx.Node):
        return repr(source)
    if source.op == "call_module":
        return f"{type(modules[source.target]).__name__} {source.target}"
    if source.op in ("call_function", "call_method"):
        return getattr(source.target, "__name__", str(source.target)) + "()"
    return f"{source.op} {source.target}"


def _fold_sequential(model, report):
    """The fallback for models torch.fx cannot trace: inside an nn.Sequential the output of one
    module is the input of the next and nothing else, so (layer, BatchNorm) neighbours can fold."""
    names = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (layer_name, layer), (bn_name, bn) in zip(children, children[1:]):
            if not isinstance(bn, _BatchNorm) or not isinstance(layer, _PRODUCERS):
                continue
            reason = _cannot_fold(layer, bn)
            if not reason and (len(names[id(layer)]) > 1 or len(names[id(bn)]) > 1):
                reason = "the module is registered more than once in the model"
            full = f"{seq_name}.{bn_name}" if seq_name else bn_name
            if reason:
                report.left.append((full, reason))
                continue
            _fold_into(layer, bn)
            setattr(seq, bn_name, nn.Identity())
            report.folded.append((full, f"{seq_name}.{layer_name}" if seq_name else layer_name))
    _report_unseen(model, report, "not preceded by a Conv, ConvTranspose or Linear inside an nn.Sequential")


def _report_unseen(model, report, reason="torch.fx never saw it called (inside a leaf module?)"):
    """Every BatchNorm still in the model gets a line in the report."""
    seen = {name for name, _ in report.left}
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm) and name not in seen:
            report.left.append((name, reason))


def _out_channels(layer):
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _cannot_fold(layer, bn):
    """Why `bn` cannot fold into `layer` whatever the input, or None."""
    if isinstance(bn, _BatchNormAct):
        return f"it is fused with a residual add and {bn.activation!r}, which are not affine"
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False), so eval mode uses batch statistics"
    if isinstance(layer.weight, nn.parameter.UninitializedParameter) or isinstance(
            bn.running_mean, nn.parameter.UninitializedBuffer):
        return "a lazy module is not initialized yet"
    if bn.num_features != _out_channels(layer):
        return f"{bn.num_features} features but the layer has {_out_channels(layer)} output channels"
    if not layer.weight.is_floating_point():
        return f"the layer's weight is {layer.weight.dtype}"
    return None


def _shape_mismatch(layer, source):
    """With propagated shapes: why the layer's output does not have its channels where BatchNorm reads
    them (dimension 1 of a batched tensor), or None. Without shapes, None."""
    meta = source.meta.get("tensor_meta")
    if meta is None:
        return None
    rank = len(meta.shape)
    expected = 2 if isinstance(layer, nn.Linear) else layer.weight.dim()  # conv: N, C and the kernel dims
    if rank != expected:
        return f"the layer's output has shape {tuple(meta.shape)}: its channels are not BatchNorm's dimension 1"
    return None


@torch.no_grad()
def _fold_into(layer, bn):
    """layer's weight and bias take on bn's affine map, computed in float64 and cast back."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    weight = layer.weight.double()
    if isinstance(layer, _ConvTransposeNd):
        # weight is (in, out / groups, *kernel); output channel g * out/groups + j lives in group g, column j.
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        weight = (grouped * scale.view(groups, 1, -1, *[1] * (weight.dim() - 2))).reshape(weight.shape)
    else:
        weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))  # (out, ...) for Conv and Linear
    bias = layer.bias.double() * scale + shift if layer.bias is not None else shift
    layer.weight.copy_(weight)
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.copy_(bias)
